"""A training run on disk: the folder it fills (renamed into place when whole), its
checkpoints, resuming it, and the files it ends with (delta, card, curves)."""

from __future__ import annotations

import dataclasses
import shutil
import signal
from datetime import datetime
from pathlib import Path

from accelerate.utils import broadcast_object_list
from rich.console import Console
from rich.progress import Progress

from deltacli import plots
from deltacli.errors import DeltacliError
from deltacli.files.outputs import CHECKPOINTS, Scratch, check_apart, check_output, has_checkpoint
from deltacli.models.loading import resolve
from deltacli.recipe import Recipe, dump_recipe, load_recipe, recipe_to_dict
from deltacli.storage.delta_folder import LOG_FILE, RECIPE_FILE, save_delta, write_initial
from deltacli.training.checkpoints import (
    checkpoint_name,
    checkpoints,
    find_run,
    write_checkpoint,
    write_random_state,
)
from deltacli.training.interrupts import Interrupted, Stopped
from deltacli.training.logs import MetricsLog, flat_config
from deltacli.training.trainer import Trainer

TRACKERS = "trackers"  # inside a run's folder: what experiment trackers write
CURVES = "curves.png"  # a run's training loss and eval metric per step


@dataclasses.dataclass
class TrainResult:
    output: Path
    recipe: Recipe
    metrics: dict


def default_output(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"


# Recipe keys a resumed run may not change: the model and how it is stored, what it learns,
# the data and its order, the deltas. (Other `train.*` may change, e.g. a lower learning rate
# after a diverged run.) The data itself is checked by its fingerprint (`Trainer._restore`).
_FIXED_ON_RESUME = (
    "model",
    "task",
    "head",
    "base_dtype",
    "quantize",
    "data",
    "deltas",
    "train.seed",
    "train.batch_size",
    "train.grad_accum",
)


def train(
    recipe: Recipe,
    output: Path | None = None,
    overwrite: bool = False,
    console: Console | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train `recipe`'s deltas and save the best epoch's delta to `output`, checkpointing
    as `train.save_every` asks so that `resume` can continue an interrupted run. With
    `progress` (a sweep's), the run's bar joins it instead of drawing its own."""
    output = output or default_output(recipe)
    check_output(output, overwrite)
    check_apart(output, [("base model", recipe.model)])
    return _run(recipe, output, overwrite=overwrite, console=console, progress=progress)


def resume(
    output: Path,
    overrides: list[str] = (),
    console: Console | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Continue the run that was writing `output` from its newest checkpoint, with the
    recipe it saved (`train.*` overrides allowed)."""
    keys = [o.split("=")[0].strip() for o in overrides]
    fixed = [k for k in keys if any(k == f or k.startswith(f + ".") for f in _FIXED_ON_RESUME)]
    if fixed:
        raise DeltacliError(
            f"--resume continues the run's own recipe; {fixed[0]!r} would change its model, "
            "its precision, its data or their order, or its deltas (other train.* settings "
            "may change)"
        )
    folder, checkpoint = find_run(output)
    recipe = load_recipe(folder / RECIPE_FILE, list(overrides))
    interrupted = InterruptedRun(folder, checkpoint)
    return _run(
        recipe, output, overwrite=True, console=console, progress=progress, resuming=interrupted
    )


@dataclasses.dataclass(frozen=True)
class InterruptedRun:
    """The run `--resume` continues: its scratch folder and its newest checkpoint."""

    folder: Path
    checkpoint: Path


def _run(
    recipe: Recipe,
    output: Path,
    *,
    overwrite: bool,
    console: Console | None,
    progress: Progress | None,
    resuming: InterruptedRun | None = None,
) -> TrainResult:
    trainer = Trainer(recipe, console, resuming.checkpoint if resuming else None)
    run = RunFolder.open(trainer, output, overwrite, resuming)
    try:
        with MetricsLog(run.log_path(trainer.log_bytes), trainer.accelerator) as log:
            before = trainer.preview()
            metrics = trainer.fit(log, run, progress)
            if before:
                after = trainer.preview()
                metrics["preview"] = [
                    {"prompt": p, "before": b, "after": a, "reference": r}
                    for (p, r), b, a in zip(trainer.data.prompts, before, after, strict=False)
                ]
            run.finish(trainer, metrics)
    except (Stopped, KeyboardInterrupt) as stop:
        run.abandon()
        kept = checkpoints(run.path) if run.scratch is not None else []
        if not kept:
            raise
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} before the step finished; the run's "
            f"last checkpoint ({kept[-1].name}) is kept: continue it with {run.resume_hint()}",
            signum,
        ) from None
    except BaseException:
        run.abandon()
        raise
    return TrainResult(output, trainer.recipe, metrics)


class RunFolder:
    """Where a run writes: the scratch folder that becomes the delta directory, and its
    checkpoints. Every process knows its path (they all save random state into
    checkpoints); only the main process writes the rest."""

    def __init__(self, trainer: Trainer, scratch: Scratch | None, path: Path) -> None:
        self.accelerator = trainer.accelerator
        self.scratch, self.path = scratch, path
        self.recipe = trainer.recipe
        self.save_every = trainer.recipe.train.save_every
        self.keep = trainer.recipe.train.keep_checkpoints
        self.target = scratch.target if scratch else None

    @classmethod
    def open(
        cls, trainer: Trainer, output: Path, overwrite: bool, resuming: InterruptedRun | None
    ) -> RunFolder:
        scratch = None
        if resuming:  # every process has read the checkpoint before its folder is renamed
            trainer.accelerator.wait_for_everyone()
        if trainer.accelerator.is_main_process:
            notice = trainer.notice
            if resuming:
                scratch = Scratch.adopt(output, resuming.folder, overwrite)
            else:
                scratch = Scratch.create(output, overwrite, notice)
                try:
                    (scratch.path / RECIPE_FILE).write_text(dump_recipe(trainer.recipe), "utf-8")
                    write_initial(scratch.path, trainer.initial)
                except BaseException:
                    scratch.discard()
                    raise
        path = broadcast_object_list([scratch.path if scratch else None])[0]
        if trainer.recipe.train.report_to:
            trainer.accelerator.project_configuration.logging_dir = str(path / TRACKERS)
            trainer.accelerator.init_trackers(
                trainer.recipe.name, flat_config(recipe_to_dict(trainer.recipe))
            )
        return cls(trainer, scratch, path)

    def log_path(self, keep_bytes: int | None) -> Path | None:
        """The training log (main process); a resumed run first drops what the interrupted
        one logged after its checkpoint."""
        if self.scratch is None:
            return None
        log = self.path / LOG_FILE
        if keep_bytes is not None and log.is_file():
            with log.open("r+b") as file:
                file.truncate(keep_bytes)
        return log

    def due(self, step: int) -> bool:
        return self.save_every is not None and step % self.save_every == 0

    def save(self, trainer: Trainer, log: MetricsLog) -> Path:
        """A checkpoint of the trainer as it stands (every process takes part)."""
        write_random_state(self.path, self.accelerator.process_index)
        self.accelerator.wait_for_everyone()
        saved = self.path / CHECKPOINTS / checkpoint_name(trainer.step)
        # Every process builds the state: under FSDP the delta and its optimizer moments are
        # gathered whole from all of them (collectives). The main process writes it.
        tensors, state = trainer.checkpoint_state(log_bytes=log.size() if self.scratch else 0)
        if self.accelerator.is_main_process:
            saved = write_checkpoint(self.path, trainer.step, tensors, state, self.keep)
        self.accelerator.wait_for_everyone()
        return saved

    def resume_hint(self) -> str:
        return f"deltacli train --resume {self.target or '<output>'}"

    def close_trackers(self) -> None:
        """Finish the experiment trackers, and only them: `Accelerator.end_training` also
        destroys the process group that the closing barrier of `finish` still needs."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []

    def finish(self, trainer: Trainer, metrics: dict) -> None:
        """Write the delta, drop the checkpoints, and rename the folder into place (every
        process gathers its share of a sharded delta; the main one writes)."""
        self.close_trackers()  # they close their files before the rename
        base = resolve(trainer.recipe.model)
        if self.scratch is None:
            save_delta(None, trainer.deltas, trainer.recipe, base, metrics)
        else:
            try:
                save_delta(self.path, trainer.deltas, trainer.recipe, base, metrics, self.target)
            except OSError as error:
                kept = checkpoints(self.path)
                where = (
                    f"; its last checkpoint is kept: free space and run {self.resume_hint()}"
                    if kept
                    else ""
                )
                raise DeltacliError(
                    f"cannot write the trained delta to {self.path} ({error.strerror}){where}"
                ) from None
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)
            if plots.available():
                metric = trainer.recipe.train.best_metric
                plots.curves(
                    {trainer.recipe.name: self.path / LOG_FILE}, metric, self.path / CURVES
                )
            self.scratch.publish("delta")
        self.accelerator.wait_for_everyone()

    def abandon(self) -> None:
        """After a failure: keep the folder if a checkpoint can resume it, else remove it."""
        self.close_trackers()
        if self.scratch is not None and not has_checkpoint(self.path):
            self.scratch.discard()
