"""The one trainer: accelerate, AdamW, linear warmup and decay, clipping, eval, keep best.

It never asks which delta kinds it trains. A `DeltaSet` hands it parameters and later the
tensors to save; the same loop runs on one CPU, one GPU, or many processes under
`accelerate launch`, where only the main process writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from datetime import datetime
from pathlib import Path

import torch
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_linear_schedule_with_warmup

from deltacli.build import check_attaches, parameter_counts, prepare_model
from deltacli.data import batches
from deltacli.evaluate import evaluate, generate
from deltacli.models import load_tokenizer, resolve
from deltacli.recipe import Recipe
from deltacli.runtime import make_accelerator, versions
from deltacli.store import LOG_FILE, atomic_dir, check_output, save_delta


@dataclasses.dataclass
class TrainResult:
    output: Path
    recipe: Recipe
    metrics: dict


def default_output(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"


def train(
    recipe: Recipe,
    output: Path | None = None,
    overwrite: bool = False,
    console: Console | None = None,
) -> TrainResult:
    """Train `recipe`'s deltas and save the best epoch's delta to `output`."""
    output = output or default_output(recipe)
    check_output(output, overwrite)
    trainer = Trainer(recipe, console)
    main = trainer.accelerator.is_main_process
    with (
        atomic_dir(output, overwrite) if main else contextlib.nullcontext() as scratch,
        MetricsLog(scratch / LOG_FILE if scratch else None) as log,
    ):
        before = trainer.preview()
        metrics = trainer.fit(log)
        if before:
            after = trainer.preview()
            metrics["preview"] = [
                {"prompt": p, "before": b, "after": a, "reference": r}
                for (p, r), b, a in zip(trainer.data.prompts, before, after, strict=False)
            ]
        if scratch:
            save_delta(scratch, trainer.deltas, trainer.recipe, resolve(recipe.model), metrics)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(output, trainer.recipe, metrics)


class MetricsLog:
    """JSON lines of training figures, written by the main process only."""

    def __init__(self, path: Path | None) -> None:
        self.file = path.open("a", encoding="utf-8") if path else None

    def write(self, **record) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Trainer:
    """Set-up in `__init__` (cheap checks first, then data, model, optimisation), then `fit`."""

    def __init__(self, recipe: Recipe, console: Console | None) -> None:
        self.started = time.perf_counter()
        config = recipe.train
        self.accelerator = make_accelerator(
            cpu=config.cpu,
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
        )
        self.console = console if self.accelerator.is_main_process else None
        check_attaches(recipe)
        set_seed(config.seed)
        self.tokenizer = load_tokenizer(recipe.model)
        self.task = recipe.task_entry
        self.data = self.task.load_data(
            recipe.data, self.tokenizer, config.seed, config.mask_prompt
        )
        self.recipe = dataclasses.replace(
            recipe, data=dataclasses.replace(recipe.data, labels=self.data.labels)
        )
        self.model, self.deltas = prepare_model(self.recipe)
        if self.task.generative:
            # No cache while training: it only costs memory, and transformers keeps packed
            # examples apart (block-diagonal attention) only without one.
            self.model.config.use_cache = False
        if config.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad (the base is frozen).
            self.model.gradient_checkpointing_enable({"use_reentrant": False})
        self._setup_optimisation()
        self._announce()

    def _setup_optimisation(self) -> None:
        config = self.recipe.train
        params = list(self.deltas.parameters().values())
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
        collate = self.task.collate(self.tokenizer, self.data.train)
        train_batches = batches(self.data.train, collate, config.batch_size, True, config.seed)
        eval_collate = self.task.collate(self.tokenizer, self.data.eval)
        eval_batches = batches(self.data.eval, eval_collate, config.eval_batch_size, False)
        self.model, self.optimizer, self.train_batches, self.eval_batches = (
            self.accelerator.prepare(self.model, optimizer, train_batches, eval_batches)
        )
        # Deltas that look at data first (SIFT picks its entries) do so on the plain module.
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.deltas.calibrate(unwrapped, self.train_batches, self.accelerator)
        self.steps_per_epoch = math.ceil(len(self.train_batches) / config.grad_accum)
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.steps_per_epoch)
        self.scheduler = get_linear_schedule_with_warmup(
            optimizer, round(config.warmup_ratio * self.total_steps), self.total_steps
        )
        self.params = params

    def _announce(self) -> None:
        counts = parameter_counts(self.model)
        self.counts = counts
        if self.console:
            self.console.print(
                f"[bold]{self.recipe.name}[/] on {self.recipe.model} · "
                f"{counts['trainable']:,} of {counts['total']:,} parameters train "
                f"({counts['trainable_percent']:.3f}%) · {len(self.data.train):,} train / "
                f"{len(self.data.eval):,} eval examples · {self.accelerator.device} × "
                f"{self.accelerator.num_processes} process(es)"
            )
            if self.data.truncated:
                self.console.print(
                    f"[yellow]{self.data.truncated:,} examples were cut at "
                    f"data.max_length={self.recipe.data.max_length} tokens[/]"
                )

    def fit(self, log: MetricsLog) -> dict:
        """Train for the recipe's budget, evaluating after every epoch; return the metrics of
        the best epoch (the last, without `keep_best`), with that epoch's delta loaded."""
        self.log, self.meter, self.step, self.history = log, Throughput(), 0, []
        self.best: dict | None = None
        self.model.train()
        with self._progress() as progress:
            bar = progress.add_task("train", total=self.total_steps, loss=0.0, lr=0.0, speed=0.0)
            epoch = 0
            while self.step < self.total_steps:
                epoch += 1
                self._train_epoch(epoch, progress, bar)
                self.meter.pause()
                self._evaluate_epoch(epoch)
                self.meter.resume()
        self.deltas.load_state_dict(self.best_state)
        return self._summary()

    def _train_epoch(self, epoch: int, progress: Progress, bar: int) -> None:
        for batch in self.train_batches:
            loss = self._step(batch)
            self.meter.add(len(batch["labels"]) * self.accelerator.num_processes, loss)
            if not self.accelerator.sync_gradients:
                continue
            self.scheduler.step()
            self.step += 1
            lr = self.scheduler.get_last_lr()[0]
            progress.update(bar, advance=1, loss=self.meter.loss, lr=lr, speed=self.meter.rate)
            if self.step % self.recipe.train.log_every == 0:
                self.log.write(step=self.step, epoch=epoch, loss=self.meter.loss, lr=lr)
            if self.step >= self.total_steps:
                return

    def _evaluate_epoch(self, epoch: int) -> None:
        """Score the eval set; remember this epoch's delta if it is the best so far."""
        scores = evaluate(self.model, self.eval_batches, self.accelerator, self.task)
        self.history.append({"epoch": epoch, "step": self.step, **scores})
        self.log.write(step=self.step, epoch=epoch, eval=scores)
        if self.best is None or not self.recipe.train.keep_best or self._better(scores, self.best):
            self.best = self.history[-1]
            self.best_state = {
                name: tensor.to("cpu", copy=True)
                for name, tensor in self.deltas.state_dict().items()
            }

    def _better(self, scores: dict, best: dict) -> bool:
        """Higher on the recipe's metric (lower, for loss); on a tie, lower eval loss."""
        metric = self.recipe.train.best_metric
        sign = -1 if metric == "loss" else 1
        return (sign * scores[metric], -scores["loss"]) > (sign * best[metric], -best["loss"])

    def preview(self) -> list[str]:
        """Generations for the first `train.preview` eval prompts (main process only)."""
        count = self.recipe.train.preview
        if not (count and self.data.prompts and self.accelerator.is_main_process):
            return []
        prompts = [prompt for prompt, _ in self.data.prompts[:count]]
        return generate(self.accelerator.unwrap_model(self.model), self.tokenizer, prompts)

    def _step(self, batch: dict) -> float:
        with self.accelerator.accumulate(self.model):
            loss = self.model(**batch).loss
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.recipe.train.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.params, self.recipe.train.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _progress(self) -> Progress | contextlib.nullcontext:
        return Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("lr {task.fields[lr]:.2e}"),
            TextColumn("{task.fields[speed]:.0f} samples/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=self.console is None,
        )

    def _summary(self) -> dict:
        best, meter = self.best, self.meter
        return {
            "recipe": self.recipe.name,
            "model": self.recipe.model,
            "params": self.counts,
            "eval": {k: v for k, v in best.items() if k not in ("epoch", "step")},
            "best_epoch": best["epoch"],
            "history": self.history,
            "train": {
                "steps": self.step,
                "samples": meter.samples,
                "seconds": round(meter.seconds, 2),
                "samples_per_second": round(meter.rate, 2),
                "loss": meter.loss,
            },
            "optimizer_state_bytes": sum(
                t.numel() * t.element_size()
                for state in self.optimizer.state.values()
                for t in state.values()
                if torch.is_tensor(t)
            ),
            "wall_seconds": round(time.perf_counter() - self.started, 2),
            "world_size": self.accelerator.num_processes,
            "device": str(self.accelerator.device),
            "versions": versions(),
        }


class Throughput:
    """Samples per second of training time (evaluation excluded) and a running loss."""

    def __init__(self) -> None:
        self.samples, self.seconds, self.loss = 0, 0.0, math.nan
        self._since = time.perf_counter()

    def add(self, samples: int, loss: float) -> None:
        self.samples += samples
        self.loss = loss if math.isnan(self.loss) else 0.9 * self.loss + 0.1 * loss

    @property
    def rate(self) -> float:
        elapsed = self.seconds + time.perf_counter() - self._since
        return self.samples / elapsed if elapsed > 0 else 0.0

    def pause(self) -> None:
        self.seconds += time.perf_counter() - self._since

    def resume(self) -> None:
        self._since = time.perf_counter()
