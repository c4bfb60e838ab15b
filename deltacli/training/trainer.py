"""The one trainer: accelerate, AdamW, linear warmup and decay, clipping, eval, keep best.

It never asks which delta kinds it trains. A `DeltaSet` hands it parameters and later the
tensors to save; the same loop runs on one CPU, one GPU, or many processes under
`accelerate launch`, where only the main process writes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from accelerate.utils import DistributedType, ProjectConfiguration, send_to_device
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from deltacli.build import parameter_counts, start_from_saved
from deltacli.config.sections import TrainConfig
from deltacli.deltas.base import sharded_like, whole
from deltacli.errors import DeltacliError
from deltacli.recipe import Recipe
from deltacli.tasks.evaluation import evaluate, generate
from deltacli.tasks.fused_loss import ChunkedHeadLoss, with_kernel
from deltacli.tasks.metrics import oriented
from deltacli.tasks.registry import CAUSAL_LM
from deltacli.tasks.scoring import reported_metrics
from deltacli.tasks.tables import TaskData, data_fingerprint
from deltacli.training.checkpoints import read_checkpoint, restore_random_state
from deltacli.training.compiling import compile_layers
from deltacli.training.interrupts import Interrupted, StopRequest, stop_requests
from deltacli.training.logs import MetricsLog, progress_bars, trackers
from deltacli.training.preference import PreferenceStep
from deltacli.training.runtime import peak_memory, reset_peak_memory, versions
from deltacli.training.session import open_session
from deltacli.training.steps import StepPlan, adamw, linear_schedule


class Checkpoints(Protocol):
    """Where `fit` writes checkpoints (a run's folder: `runs.RunFolder`)."""

    def due(self, step: int) -> bool: ...

    def save(self, trainer: Trainer, log: MetricsLog) -> Path: ...

    def resume_hint(self) -> str: ...


class Trainer:
    """Set-up in `__init__` (cheap checks first, then data, model, optimisation; the state
    of a checkpoint when resuming), then `fit`."""

    def __init__(self, recipe: Recipe, console: Console | None, checkpoint: Path | None = None):
        self.started = time.perf_counter()
        reset_peak_memory()
        config = recipe.train
        session = open_session(
            recipe,
            before_model=_check_best_metric,
            log_with=trackers(config.report_to),
            # Where trackers write is the run's folder, set once it exists (runs.RunFolder).
            project_config=ProjectConfiguration(logging_dir="trackers"),
        )
        self.accelerator, self.recipe, self.task = session.accelerator, session.recipe, session.task
        self.console = console if self.accelerator.is_main_process else None
        self.tokenizer, self.data = session.tokenizer, session.data
        self.model, self.deltas, self.session = session.model, session.deltas, session
        if self.task.generative:
            # No cache while training: it only costs memory, and transformers keeps packed
            # examples apart (block-diagonal attention) only without one.
            self.model.config.use_cache = False
        if config.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad (the base is frozen).
            self.model.gradient_checkpointing_enable({"use_reentrant": False})
        self.pairs = PreferenceStep(self.deltas, config) if self.task.pairs else None
        if self.pairs is not None:
            # The reference is the base: computed before a saved delta is loaded into it.
            collate = self.task.collate(self.tokenizer, self.data.train)
            self.data = self.pairs.prepare(
                self.model, self.data, collate, config.eval_batch_size, self.accelerator
            )
        self._setup_optimisation()
        self.step, self.epoch, self.position = 0, 1, 0
        self._since: tuple[float, int] | None = None  # when plain progress lines began
        self.meter, self.history, self.best = Throughput(), [], None
        self.step_stats: dict[str, torch.Tensor] = {}
        self.best_state: dict[str, torch.Tensor] = {}
        self.epoch_order = self.order.get_state()
        self.log_bytes: int | None = None
        self.initial: dict[str, torch.Tensor] = {}  # the delta as it starts (a fresh run)
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            start_from_saved(self.deltas, self.recipe, self.notice)
            # Deltas that look at data first (SIFT picks its entries) do so on the plain module.
            unwrapped = self.accelerator.unwrap_model(self.model)
            self.deltas.calibrate(unwrapped, self._calibration_batches(), self.accelerator)
            self.epoch_order = self.order.get_state()
            self.initial = self.deltas.export_initial()
        self._fast_step(config)
        self._announce(checkpoint)

    @functools.cached_property
    def fingerprint(self) -> dict[str, str]:
        """What a resumed run must not change, by name: the tokenised data (hashed when a
        checkpoint is first written or read, not at every start) and how the base is held."""
        return {
            "training data": data_fingerprint(self.data.train),
            "eval data": data_fingerprint(self.data.eval),
            "base_dtype": str(self.recipe.base_dtype),
            "quantize": str(self.recipe.quantize),
        }

    def _setup_optimisation(self) -> None:
        config = self.recipe.train
        groups = self._parameter_groups()
        self.param_names = [name for group in groups for name in group.pop("names")]
        optimizer = adamw(groups, config.lr, config.fused_adamw)
        # Draws each epoch's order (the same on every process); a checkpoint keeps its state.
        self.order = torch.Generator().manual_seed(config.seed)
        self.plan = StepPlan(
            len(self.data.train),
            config.batch_size,
            config.grad_accum,
            self.accelerator.num_processes,
            self.accelerator.process_index,
        )
        # Loss terms per training example: every process knows every step's count, so the
        # step's loss is its sum over all micro-batches and processes divided by one number.
        self.units = [self.task.units(x) for x in self.data.train[self.task.units_column]]
        self.collate = self.task.collate(self.tokenizer, self.data.train)
        eval_batches = self.session.batches(self.data.eval, config.eval_batch_size)
        self._refuse_what_cannot_train()
        self.model, self.optimizer, self.eval_batches = self.accelerator.prepare(
            self.model, optimizer, eval_batches
        )
        # FSDP swaps the parameters for sharded ones (same names): follow them.
        self.deltas.follow_sharded(self.accelerator.unwrap_model(self.model))
        params = self.deltas.parameters()
        self.steps_per_epoch = self.plan.steps
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.steps_per_epoch)
        self.scheduler = linear_schedule(
            optimizer, round(config.warmup_ratio * self.total_steps), self.total_steps
        )
        self.params = list(params.values())

    def _parameter_groups(self) -> list[dict]:
        """AdamW's groups: weight decay on matrices only, and each delta's own `lr` where it
        sets one (the head and the rest: train.lr). Their order, and the names in it, are the
        optimizer state's keys in a checkpoint."""
        config = self.recipe.train
        rate = {}
        for delta in self.deltas.members:
            for name, lr in delta.learning_rates(delta.config.lr or config.lr).items():
                rate.setdefault(name, lr)
        params = self.deltas.parameters()
        groups: dict[tuple[bool, float], dict] = {}
        for matrix in (True, False):
            for name, param in params.items():
                if (param.ndim >= 2) == matrix:
                    decay = config.weight_decay if matrix else 0.0
                    group = groups.setdefault(
                        (matrix, rate[name]),
                        {"params": [], "names": [], "lr": rate[name], "weight_decay": decay},
                    )
                    group["params"].append(param)
                    group["names"].append(name)
        return list(groups.values())

    @property
    def sharded(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    def _refuse_what_cannot_train(self) -> None:
        """Deltas that write into base weights cannot train on FSDP's shards; ZeRO-3
        partitions parameters in a way deltacli does not gather yet; torch's FlexAttention
        has no backward pass on a CPU (it would fail at the first step, in a traceback)."""
        if self.recipe.attention == "flex_attention" and self.accelerator.device.type == "cpu":
            raise DeltacliError(
                "attention: flex_attention cannot train on a CPU (torch's FlexAttention has "
                "no backward pass there); use sdpa or eager"
            )
        if self.sharded:
            for delta in self.deltas.deltas:
                if not delta.shardable:
                    raise DeltacliError(
                        f"{delta.kind} writes into the base weights, which FSDP shards; "
                        "train it without FSDP (DDP: accelerate launch --multi_gpu)"
                    )
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            raise DeltacliError(
                "DeepSpeed ZeRO-3 is not supported yet; use FSDP for a base beyond one GPU "
                "(examples/accelerate/fsdp.yaml) or ZeRO stage 1-2"
            )

    def _fast_step(self, config: TrainConfig) -> None:
        """The chunked loss where the logits are a plain causal-LM head's, and the compiled
        layers where the recipe asks (both after the deltas attached and calibrated)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        chunked = config.fused_loss and self.task is CAUSAL_LM
        self.head_loss = ChunkedHeadLoss.in_run(self.model, self.accelerator) if chunked else None
        if self.head_loss is not None:
            self.head_loss, why = with_kernel(self.head_loss, config.loss_kernel)
            if why:
                self.notice(f"train.loss_kernel={config.loss_kernel}: {why}; the chunked loss runs")
        if config.compile:
            compiled = compile_layers(unwrapped)
            self.notice(
                f"train.compile: {compiled} layers compile during the first steps"
                if compiled
                else "train.compile: this model lists no repeated layers; it runs uncompiled"
            )

    def notice(self, line: str) -> None:
        if self.console:
            self.console.print(f"[yellow]{escape(line)}[/]")

    def _announce(self, checkpoint: Path | None) -> None:
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
                self.notice(
                    f"{self.data.truncated:,} examples were cut at "
                    f"data.max_length={self.recipe.data.max_length} tokens"
                )
            if self.pairs is not None and self.pairs.held_bytes:
                self.notice(
                    f"the reference keeps the base's values of what the deltas train "
                    f"({self.pairs.held_bytes / 2**20:,.1f} MiB more memory; "
                    "train.reference=precomputed avoids it)"
                )
            if checkpoint is not None:
                self.notice(f"resumed from {checkpoint} (step {self.step} of {self.total_steps})")

    def fit(
        self, log: MetricsLog, run: Checkpoints | None = None, progress: Progress | None = None
    ) -> dict:
        """Train for the recipe's budget, evaluating after every epoch; return the metrics of
        the best epoch (the last, without `keep_best`), with that epoch's delta loaded.

        With a run folder, checkpoints are written as the recipe asks and at every epoch's
        end, and a stop signal ends the run at the next step with a checkpoint."""
        self.model.train()
        self.meter.resume()
        shared = progress is not None
        bars = contextlib.nullcontext(progress) if shared else progress_bars(self.console)
        with bars as progress, stop_requests() as stop:
            bar = progress.add_task(
                self.recipe.name if shared else "train",
                total=self.total_steps, completed=self.step, loss=0.0, lr=0.0, speed=0.0,
            )  # fmt: skip
            while self.step < self.total_steps:
                if not self._train_epoch(log, run, stop, progress, bar):
                    break  # the budget ran out inside the epoch
                self.meter.pause()
                self._evaluate_epoch(log)
                self.meter.resume()
                self.epoch, self.position = self.epoch + 1, 0
                self.epoch_order = self.order.get_state()
                if run and self.step < self.total_steps:
                    self._checkpoint(log, run, self._agreed(stop.signum))
            if not self.history or self.history[-1]["step"] != self.step:
                self.meter.pause()
                self._evaluate_epoch(log)
            if shared:
                progress.remove_task(bar)
        self.deltas.set_values(self.best_state)
        return self._summary()

    def _train_epoch(
        self, log: MetricsLog, run: Checkpoints | None, stop: StopRequest, progress, bar
    ) -> bool:
        """One pass over the epoch's steps, from `self.position` on (a resumed run skips
        those it trained on); False if the step budget ran out first."""
        order = self.epoch_permutation()
        for index in range(self.position, self.plan.steps):
            local = self._step(order, index)
            self.position = index + 1
            self.scheduler.step()
            self.step += 1
            loss = self._summed_over_processes(local)
            self.meter.add(len(self.plan.step_examples(order, index)), loss)
            lr = self.scheduler.get_last_lr()[0]
            progress.update(bar, advance=1, loss=self.meter.loss, lr=lr, speed=self.meter.rate)
            if self.step % self.recipe.train.log_every == 0:
                log.write(
                    step=self.step, epoch=self.epoch, loss=self.meter.loss, lr=lr,
                    **self._step_metrics(),
                )  # fmt: skip
                self._plain_progress()
            stopping = self._agreed(stop.signum)
            if not math.isfinite(loss):
                raise DeltacliError(
                    f"the training loss became {loss} at step {self.step} (a lower train.lr, "
                    "or train.max_grad_norm, usually helps); the run stopped, and its last "
                    "checkpoint, if it wrote one, is kept"
                )
            if self.step >= self.total_steps:
                return False
            if run and (run.due(self.step) or stopping):
                self._checkpoint(log, run, stopping)
        return True

    def _plain_progress(self) -> None:
        """Where the console is not a terminal (CI, nohup, a log file) the live bar shows
        nothing until the end: a plain line every `train.log_every` steps instead."""
        if self.console is None or self.console.is_terminal:
            return
        if self._since is None:
            self._since = (time.perf_counter(), self.step)
            eta = "…"
        else:
            started, first = self._since
            per_step = (time.perf_counter() - started) / max(self.step - first, 1)
            eta = _duration(per_step * (self.total_steps - self.step))
        self.console.print(
            f"{self.recipe.name} step {self.step}/{self.total_steps} · loss {self.meter.loss:.4f}"
            f" · {self.meter.rate:.0f} samples/s · ETA {eta}",
            highlight=False,
            soft_wrap=True,
        )

    def _checkpoint(self, log: MetricsLog, run: Checkpoints, signum: int) -> None:
        """Save a checkpoint; after a stop signal, end the run saying how to continue it."""
        self.meter.pause()
        saved = run.save(self, log)
        self.meter.resume()
        if signum:
            raise Interrupted(
                f"stopped at step {self.step} of {self.total_steps}; checkpoint saved in "
                f"{saved}; continue with: {run.resume_hint()}",
                signum,
            )

    def _agreed(self, signum: int | None) -> int:
        """The stop signal any process received: every process must stop at the same step
        (one small all-reduce, only with several)."""
        if self.accelerator.num_processes == 1:
            return signum or 0
        value = torch.tensor([float(signum or 0)], device=self.accelerator.device)
        return int(self.accelerator.reduce(value, reduction="max").item())

    def _summed_over_processes(self, share: float) -> float:
        """The step's loss from each process's share of its weighted mean (one small
        all-reduce, only with several): the same number on every process."""
        if self.accelerator.num_processes == 1:
            return share
        value = torch.tensor([share], device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.reduce(value, reduction="sum").item())

    def _calibration_batches(self) -> Iterator[dict]:
        """This process's training micro-batches in the order of a first epoch (on its
        device): what kinds that look at data before training read. They draw the order
        as training would, and training then draws the next."""
        order = self.epoch_permutation()
        for index in range(self.plan.steps):
            for batch, counts in self.micro_batches(order, index):
                if counts:  # what the model takes (a preference batch also holds reference values)
                    yield {k: v for k, v in batch.items() if k != "reference_logps"}

    def epoch_permutation(self) -> list[int]:
        """The epoch's order of the training rows, drawn from the generator as the epoch
        began (so a resumed run draws the same)."""
        self.order.set_state(self.epoch_order)
        return torch.randperm(self.plan.examples, generator=self.order).tolist()

    def micro_batches(self, order: list[int], index: int) -> list[tuple[dict, bool]]:
        """This process's micro-batches of step `index`, collated and on its device."""
        device = self.accelerator.device
        return [
            (send_to_device(self.collate([self.data.train[i] for i in micro.indices]), device),
             micro.counts)
            for micro in self.plan.micro_batches(order, index)
        ]  # fmt: skip

    def _evaluate_epoch(self, log: MetricsLog) -> None:
        """Score the eval set; remember this epoch's delta if it is the best so far."""
        scores = evaluate(
            self.model, self.eval_batches, self.accelerator, self.task, self.data.labels,
            self.recipe.train,
        )  # fmt: skip
        self.history.append({"epoch": self.epoch, "step": self.step, **scores})
        log.write(step=self.step, epoch=self.epoch, eval=scores)
        if self.best is None or not self.recipe.train.keep_best or self._better(scores, self.best):
            self.best = self.history[-1]
            self.best_state = {
                name: tensor.to("cpu", copy=True)
                for name, tensor in self.deltas.state_dict().items()
            }

    def _better(self, scores: dict, best: dict) -> bool:
        """Higher on the recipe's metric (lower, for loss); on a tie, lower eval loss."""
        metric = self.recipe.train.best_metric
        return (oriented(metric, scores[metric]), -scores["loss"]) > (
            oriented(metric, best[metric]),
            -best["loss"],
        )

    def preview(self) -> list[str]:
        """Generations for the first `train.preview` eval prompts (main process only)."""
        count = self.recipe.train.preview
        if not (count and self.data.prompts and self.accelerator.is_main_process):
            return []
        prompts = [prompt for prompt, _ in self.data.prompts[:count]]
        return generate(self.accelerator.unwrap_model(self.model), self.tokenizer, prompts)

    def _step(self, order: list[int], index: int) -> float:
        """One optimizer step: every micro-batch's summed loss over the step's count of loss
        terms (all micro-batches, all processes), backward, then one update. Gradients are
        synchronised on the last micro-batch only; DDP and FSDP average them over processes,
        which the factor `processes` undoes. Returns this process's share of the step's mean
        loss; its only waits for the device are at its end."""
        step = self.plan.step_examples(order, index)
        count = max(sum(self.units[i] for i in step), 1)
        scale = self.accelerator.num_processes / count
        micro_batches = self.micro_batches(order, index)
        total = torch.zeros((), device=self.accelerator.device)
        stats: dict[str, torch.Tensor] = {}
        for number, (batch, counts) in enumerate(micro_batches):
            last = number == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
            weight = 1.0 if counts else 0.0
            with sync:
                summed, extra = self._summed_loss(batch)
                summed = summed * weight
                self.accelerator.backward(summed * scale)
            total += summed.detach()
            for name, value in extra.items():
                stats[name] = stats.get(name, 0.0) + value * weight
        if self.recipe.train.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, self.recipe.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_stats = {name: value / count for name, value in stats.items()}
        return (total / count).item()

    def _summed_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The task's loss of one micro-batch, summed over its loss terms, and what else the
        step reports, summed the same way (a preference run's rewards). The model sees the
        labels only where it needs them to run (a seq2seq decoder's inputs)."""
        if self.pairs is not None:
            return self.pairs(self.model, batch)
        labels = batch["labels"]
        inputs = batch if self.task.labels_in_forward else {
            k: v for k, v in batch.items() if k != "labels"
        }  # fmt: skip
        if self.head_loss is not None:
            return self.head_loss.of_batch(self.model, inputs, labels, self.accelerator), {}
        return self.task.loss(self.model(**inputs).logits, labels), {}

    def _step_metrics(self) -> dict[str, float]:
        """The last step's other metrics, each its mean over the step's pairs (summed over
        processes: every process calls this at the same step)."""
        if not self.step_stats:
            return {}
        names = sorted(self.step_stats)
        values = torch.stack([torch.as_tensor(self.step_stats[n]).double() for n in names])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values.to(self.accelerator.device), "sum")
        return dict(zip(names, values.tolist(), strict=True))

    def checkpoint_state(self, log_bytes: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything but the random generators that a resumed run needs, whole (every
        process calls this: under FSDP the delta and AdamW's moments are gathered from all);
        `log_bytes`: how long the training log is now (a resumed run cuts it back to that)."""
        optimizer = self.optimizer.state_dict()
        tensors = {f"delta.{k}": v for k, v in self.deltas.checkpoint_state().items()}
        tensors |= {f"best.{k}": v for k, v in self.best_state.items()}
        tensors["order"] = self.epoch_order
        for index, state in optimizer["state"].items():
            name = self.param_names[index]
            tensors |= {f"optimizer.{name}.{k}": whole(v) for k, v in state.items()}
        groups = [
            {k: v for k, v in group.items() if k != "params"} | {"params": group["params"]}
            for group in optimizer["param_groups"]
        ]
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "processes": self.accelerator.num_processes,
            "param_names": self.param_names,
            "optimizer_groups": groups,
            "scheduler": self.scheduler.state_dict(),
            "meter": self.meter.state(),
            "history": self.history,
            "best": self.best,
            "fingerprint": self.fingerprint,
            "log_bytes": log_bytes,
        }
        return tensors, state

    def _restore(self, checkpoint: Path) -> None:
        """Put the trainer back where `checkpoint` left it."""
        tensors, state = read_checkpoint(
            checkpoint, self.accelerator.process_index, self.accelerator.num_processes
        )
        if state["param_names"] != self.param_names:
            raise DeltacliError(f"{checkpoint} does not belong to this recipe's deltas")
        changed = [k for k, v in state.get("fingerprint", {}).items() if self.fingerprint[k] != v]
        if changed:
            raise DeltacliError(
                f"the {changed[0]} changed since {checkpoint} was written; resuming would mix "
                "two runs: restore it, or start a new run"
            )
        if self.total_steps < state["step"]:
            raise DeltacliError(
                f"the run is {self.total_steps} steps long with these settings, but its "
                f"checkpoint is at step {state['step']}: raise train.max_steps or train.epochs"
            )
        self.deltas.restore_checkpoint(_prefixed(tensors, "delta."))
        self.best_state = _prefixed(tensors, "best.")
        self.epoch_order = tensors["order"]
        optimizer_state = {}
        params = self.deltas.parameters()
        for index, name in enumerate(self.param_names):
            moments = _prefixed(tensors, f"optimizer.{name}.")
            if moments:  # a moment of a sharded parameter is sharded like it
                optimizer_state[index] = {
                    k: v if v.ndim == 0 else sharded_like(params[name], v)
                    for k, v in moments.items()
                }
        self.optimizer.load_state_dict(
            {"state": optimizer_state, "param_groups": state["optimizer_groups"]}
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.meter.restore(state["meter"])
        self.history, self.best = state["history"], state["best"]
        self.log_bytes = state["log_bytes"]
        restore_random_state(checkpoint, self.accelerator.process_index)

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
            "data": {  # the counts `deltacli data preview` reports before training
                "train_rows": len(self.data.train),
                "eval_examples": len(self.data.eval),
                "loss_tokens": sum(self.units),
                "truncated": self.data.truncated,
            },
            "reference_bytes": self.pairs.held_bytes if self.pairs else 0,
            "optimizer_state_bytes": sum(
                t.numel() * t.element_size()
                for state in self.optimizer.state.values()
                for t in state.values()
                if torch.is_tensor(t)
            ),
            "wall_seconds": round(time.perf_counter() - self.started, 2),
            "world_size": self.accelerator.num_processes,
            "device": str(self.accelerator.device),
            **peak_memory(),
            "versions": versions(),
        }


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


class Throughput:
    """Samples per second of training time (evaluation excluded) and a running loss."""

    def __init__(self) -> None:
        self.samples, self.seconds, self.loss = 0, 0.0, math.nan
        self._since: float | None = time.perf_counter()  # None while paused

    def state(self) -> dict:
        return {"samples": self.samples, "seconds": self.seconds, "loss": self.loss}

    def restore(self, state: dict) -> None:
        self.samples, self.seconds, self.loss = state["samples"], state["seconds"], state["loss"]

    def add(self, samples: int, loss: float) -> None:
        self.samples += samples
        self.loss = loss if math.isnan(self.loss) else 0.9 * self.loss + 0.1 * loss

    @property
    def rate(self) -> float:
        running = 0.0 if self._since is None else time.perf_counter() - self._since
        elapsed = self.seconds + running
        return self.samples / elapsed if elapsed > 0 else 0.0

    def pause(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        self._since = time.perf_counter()


def _duration(seconds: float) -> str:
    """`1h02m`, `3m12s`, `45s`: an ETA a person reads at a glance."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _check_best_metric(recipe: Recipe, data: TaskData) -> None:
    """F1 of the positive class needs two labels; weighted F1 more (both are reported only
    then): checked once the data is read, before the model is."""
    labels, metric = data.labels, recipe.train.best_metric
    if labels is not None and metric not in reported_metrics(len(labels)):
        raise DeltacliError(
            f"train.best_metric={metric} is not reported for {len(labels)} labels; "
            f"choose one of {', '.join(reported_metrics(len(labels)))}"
        )
