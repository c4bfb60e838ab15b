"""Dense updates to sparse deltas, and SIFT masks from gradients.

`sparsify` keeps, per matrix or over all of them, the largest |W_tuned - W_base| entries of
the targeted matrices and writes them as a SIFT delta (flat indices + values), the task head
riding along dense. The tuned weights come from a fully fine-tuned (or merged) model directory,
or from base + a delta that folds into weights (a LoRA is densified to B·A first, so the
sparse result approximates it). Checkpoints are read tensor by tensor, never whole.

`masks_from_gradients` runs SIFT's selection on a few batches and saves the chosen indices as
an untrained SIFT delta, which `train --mask DIR` reuses and `inspect` shows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from deltacli.build import save_values
from deltacli.commands.evaluate import score_delta, score_model
from deltacli.commands.merge import Plan, apply_increments, plan_increments
from deltacli.config.schema import DENSITY
from deltacli.config.sections import DataConfig
from deltacli.deltas.sift import SiftConfig, increment, sift_targets
from deltacli.deltas.targets import minimal_suffixes, modules_by_name
from deltacli.errors import DeltacliError
from deltacli.files.outputs import atomic_dir, check_apart, check_output, notice_on
from deltacli.models.loading import (
    build_on_meta,
    config_labels,
    head_modules,
    load_config,
    local_dir,
)
from deltacli.models.weights import Checkpoint
from deltacli.recipe import Recipe
from deltacli.storage.delta_folder import is_delta_dir, read_delta, write_delta
from deltacli.tasks.registry import DEFAULT, inferred
from deltacli.training.session import open_session

_BUCKETS = 1 << 16  # |Δ| histogram buckets: the top 16 bits of a float32


@dataclasses.dataclass
class MatrixReport:
    name: str
    size: int
    kept: int
    norm_kept: float  # share of this matrix's update L2 norm kept


@dataclasses.dataclass
class SparsifyReport:
    output: str
    density: float
    by: str
    matrices: list[MatrixReport]
    norm_kept: float  # share of the targeted matrices' update norm kept
    norm_kept_overall: float  # share of the whole update's norm (every changed tensor)
    dropped: list[str]  # changed tensors neither targeted nor part of the head
    note: str | None
    scores: dict[str, dict] | None = None


class Tuned:
    """What both sources of tuned weights answer: a tensor's update, the targeted matrices
    (or one line when the tuning changed none), and the task head's tensors."""

    model: torch.nn.Module
    base: Checkpoint
    tensors: set[str]

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def matrices(self, targets: list[str] | None) -> list[str]:
        raise NotImplementedError

    def update(self, name: str) -> torch.Tensor:
        before = self.base.read(name).float() if name in self.base.keys else 0.0
        return self.read(name) - before

    def targeted(self, targets: list[str] | None) -> list[str]:
        matrices = self.matrices(targets)
        if not matrices:
            raise DeltacliError("the tuned weights change none of the targeted matrices")
        return matrices

    def head(self) -> set[str]:
        modules = modules_by_name(self.model)
        return {
            name
            for module in head_modules(self.model)
            for name, _ in modules[module].named_parameters(prefix=module)
            if name in self.tensors
        }


class TunedModel(Tuned):
    """Tuned weights from a whole model directory (a task model, or a bare body such as a
    domain-adapted sentence encoder: then only the tensors both checkpoints have count)."""

    note = None

    def __init__(self, folder: Path, base: Path) -> None:
        config = load_config(str(folder))
        self.labels = config_labels(config)
        self.task = inferred(config) or DEFAULT
        self.model = build_on_meta(str(folder), self.task, self.labels)
        self.checkpoint = Checkpoint(folder, self.model)
        self.base = Checkpoint(base, self.model)
        self.tensors = set(self.checkpoint.keys)

    def matrices(self, targets: list[str] | None) -> list[str]:
        """The targeted weight matrices (every linear layer by default) that both have."""
        chosen = sift_targets(self.model, targets or ["all-linear"])
        both = set(self.checkpoint.keys) & set(self.base.keys)
        return [f"{name}.weight" for name in chosen if f"{name}.weight" in both]

    def read(self, name: str) -> torch.Tensor:
        return self.checkpoint.read(name).float()

    def changed(self, skip: set[str]) -> set[str]:
        """Tensors the tuning changed, leaving out `skip` (already read for the sparse delta)."""
        return {
            name
            for name in self.checkpoint.keys
            if name not in skip
            and (
                name not in self.base.keys
                or not torch.equal(self.base.read(name), self.checkpoint.read(name))
            )
        }

    def close(self) -> None:
        self.checkpoint.close()
        self.base.close()


class TunedDelta(Tuned):
    """Tuned weights as base + a delta that folds into them (what `merge` would write)."""

    def __init__(self, folder: Path, base: Path) -> None:
        saved = read_delta(folder, model=str(base))
        self.plan: Plan = plan_increments([saved], [1.0])
        self.task, self.labels = saved.recipe.task, saved.recipe.data.labels
        # The base's own modules (the plan's model also holds the delta's, e.g. lora_A).
        self.model = build_on_meta(str(base), self.task, self.labels)
        self.base = Checkpoint(base, self.model)
        self.tensors = set(self.base.keys) | set(self.plan.increments)
        kinds = ", ".join(sorted({delta.kind for delta in saved.recipe.deltas}))
        # A delta that only replaces weights (full fine-tuning) is the tuned model itself.
        self.note = (
            f"densified from a {kinds} delta first: the result approximates it"
            if self.plan.needs_base
            else None
        )

    def read(self, name: str) -> torch.Tensor:
        if name in self.base.keys:
            before = self.base.read(name)
        else:
            before = torch.zeros(self.plan.shapes[name])
        changes = self.plan.increments.get(name)
        return apply_increments(before, changes) if changes else before.float()

    def matrices(self, targets: list[str] | None) -> list[str]:
        """The targeted weight matrices; by default the ones the delta changes (a LoRA's
        budget is not spent on matrices it never touched)."""
        changed = set(self.plan.increments)
        if targets:
            return [f"{n}.weight" for n in sift_targets(self.model, targets)]
        linear = sift_targets(self.model, ["all-linear"])
        return [f"{name}.weight" for name in linear if f"{name}.weight" in changed]

    def changed(self, skip: set[str]) -> set[str]:
        return set(self.plan.increments) - skip

    def close(self) -> None:
        self.base.close()


def open_tuned(tuned: str, base_dir: Path) -> Tuned:
    """The tuned weights `tuned` names: base + a delta folder, or a whole model directory."""
    if is_delta_dir(Path(tuned)):
        return TunedDelta(Path(tuned), base_dir)
    return TunedModel(local_dir(tuned), base_dir)


def score_tuned(
    tuned: str, data: str, base_dir: Path, columns: dict[str, str | None] | None
) -> dict:
    """The dense tuned weights' scores on `data`: what a sparse or low-rank delta is
    compared with."""
    if is_delta_dir(Path(tuned)):
        return score_delta(Path(tuned), data, str(base_dir), columns)
    return score_model(tuned, data, columns, tokenizer_from=str(base_dir))


def sparsify(
    base: str,
    tuned: str,
    output: Path,
    density: float,
    *,
    by: str = "matrix",
    targets: list[str] | None = None,
    eval_data: str | None = None,
    columns: dict[str, str | None] | None = None,
    overwrite: bool = False,
    console: Console | None = None,
) -> SparsifyReport:
    """Keep the top |W_tuned - W_base| entries of every targeted matrix as a sparse delta;
    with `eval_data`, score it beside the dense tuned model (`columns` names the columns)."""
    if density not in DENSITY:
        raise DeltacliError(f"--density must be {DENSITY}, got {density}")
    if by not in ("matrix", "global"):
        raise DeltacliError(f"--by must be matrix or global, got {by!r}")
    check_output(output, overwrite)
    check_apart(output, [("base model", base), ("tuned model", tuned)])
    base_dir = local_dir(base)
    source = open_tuned(tuned, base_dir)
    try:
        report = _sparsify(base, source, output, density, by, targets, overwrite, console)
    finally:
        source.close()
    if eval_data:
        dense = score_tuned(tuned, eval_data, base_dir, columns)
        sparse = score_delta(output, eval_data, str(base_dir), columns)
        report.scores = {"sparse": sparse, "dense": dense}
    return report


def _sparsify(base, source, output, density, by, targets, overwrite, console) -> SparsifyReport:
    modules = modules_by_name(source.model)
    matrices = source.targeted(targets)
    head = source.head()
    update = source.update
    kept = _select(matrices, update, density, by, console)
    values: dict[str, torch.Tensor] = {}
    reports, kept_norm, full_norm = [], 0.0, 0.0
    for name, (indices, kept_values, norm) in kept.items():
        module = name.removesuffix(".weight")
        values |= increment(module, indices, kept_values)
        share = float(kept_values.norm()) / norm if norm > 0 else 1.0
        reports.append(MatrixReport(module, modules[module].weight.numel(), len(indices), share))
        kept_norm += float(kept_values.norm()) ** 2
        full_norm += norm**2
    values |= {name: source.read(name) for name in sorted(head)}
    dropped = sorted(source.changed(skip=set(matrices) | head))
    dropped_norm = sum(float(update(name).norm()) ** 2 for name in dropped)
    sift = SiftConfig(
        density=density,
        targets=minimal_suffixes([m.removesuffix(".weight") for m in matrices], list(modules)),
        select="magnitude",
        counts=[len(kept[m][0]) for m in matrices] if by == "global" else None,
    )
    recipe = _recipe(base, source, sift, bool(head))
    with atomic_dir(output, overwrite, "sparse delta", notice_on(console)) as scratch:
        sparsified = {"sparsify": {"density": density, "by": by}}
        save_values(scratch, recipe, values, sparsified, output)
    return SparsifyReport(
        output=str(output),
        density=density,
        by=by,
        matrices=reports,
        norm_kept=math.sqrt(kept_norm / full_norm) if full_norm else 1.0,
        norm_kept_overall=(
            math.sqrt(kept_norm / (full_norm + dropped_norm)) if full_norm + dropped_norm else 1.0
        ),
        dropped=dropped,
        note=source.note,
    )


def _select(
    matrices: list[str],
    update: Callable[[str], torch.Tensor],
    density: float,
    by: str,
    console: Console | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Flat indices (sorted), their values and the update's full norm, for every matrix."""
    with Progress(console=console, disable=console is None, transient=True) as progress:
        if by == "global":
            return _select_global(matrices, update, density, progress)
        kept = {}
        for name in progress.track(matrices, description="sparsify"):
            delta = update(name).reshape(-1)
            k = math.ceil(density * delta.numel())
            indices = torch.topk(delta.abs(), k).indices.sort().values
            kept[name] = (indices, delta[indices].clone(), float(delta.norm()))
        return kept


def _select_global(
    matrices: list[str], update: Callable[[str], torch.Tensor], density: float, progress: Progress
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The K = ceil(density × Σ sizes) largest |Δ| over all matrices, in two streaming passes:
    a histogram of |Δ| by the top bits of its float32 pattern finds the bucket holding the
    K-th largest; then everything above that bucket is kept, and the largest of the bucket."""
    counts = torch.zeros(_BUCKETS, dtype=torch.long)
    total = 0
    for name in progress.track(matrices, description="sparsify: sizing"):
        magnitude = update(name).reshape(-1).abs()
        counts += torch.bincount(_bucket(magnitude), minlength=_BUCKETS)
        total += magnitude.numel()
    budget = math.ceil(density * total)
    at_or_above = torch.cumsum(counts.flip(0), 0).flip(0)
    edge = int((at_or_above >= budget).nonzero().max())
    need = budget - (int(at_or_above[edge + 1]) if edge + 1 < _BUCKETS else 0)
    above, ties = {}, []
    for name in progress.track(matrices, description="sparsify: choosing"):
        delta = update(name).reshape(-1)
        buckets = _bucket(delta.abs())
        above[name] = ((buckets > edge).nonzero().squeeze(1), delta, float(delta.norm()))
        tied = (buckets == edge).nonzero().squeeze(1)
        ties.extend((float(delta[i].abs()), name, int(i)) for i in tied)
    ties.sort(key=lambda tie: -tie[0])
    extra: dict[str, list[int]] = {}
    for _, name, index in ties[:need]:
        extra.setdefault(name, []).append(index)
    kept = {}
    for name, (chosen, delta, norm) in above.items():
        indices = (
            torch.cat([chosen, torch.tensor(extra.get(name, []), dtype=torch.long)]).sort().values
        )
        kept[name] = (indices, delta[indices].clone(), norm)
    return kept


def _bucket(magnitude: torch.Tensor) -> torch.Tensor:
    """Non-negative float32s order like their bit patterns: the top 16 bits bucket them."""
    return (magnitude.float().contiguous().view(torch.int32) >> 16).long()


def _recipe(base: str, source: TunedModel | TunedDelta, sift: SiftConfig, head: bool) -> Recipe:
    return Recipe(
        name=f"sparse-{sift.density:g}",
        model=base,
        task=source.task,
        head=head,
        data=DataConfig(labels=source.labels),
        deltas=[sift],
    )


def mask_recipe(
    model: str,
    data: str,
    density: float,
    select_batches: int = 1,
    targets: list[str] | None = None,
    columns: dict[str, str | None] | None = None,
) -> Recipe:
    """What `masks_from_gradients` runs: one SIFT delta choosing by gradient on `data`."""
    sift = SiftConfig(
        density=density, targets=targets, select="gradient", select_batches=select_batches
    )
    chosen = {key: value for key, value in (columns or {}).items() if value}
    data_config = DataConfig(train=data, eval=None, **chosen)
    return Recipe(name="masks", model=model, head=False, data=data_config, deltas=[sift])


def masks_from_gradients(recipe: Recipe, output: Path, overwrite: bool = False) -> dict[str, float]:
    """Run SIFT's selection (`recipe`'s first batches' gradients) and save the indices as an
    untrained SIFT delta; returns the density per matrix. No optimizer, no schedule: the
    model, the data and one `calibrate` call."""
    check_output(output, overwrite)
    check_apart(output, [("base model", recipe.model)])
    session = open_session(recipe)
    accelerator, deltas = session.accelerator, session.deltas
    loader = session.batches(session.data.train, recipe.train.batch_size, shuffle=True)
    model, loader = accelerator.prepare(session.model, loader)
    deltas.calibrate(accelerator.unwrap_model(model), loader, accelerator)
    configs, tensors = deltas.export()
    with atomic_dir(output, overwrite, "SIFT masks") as scratch:
        masks = dataclasses.replace(session.recipe, deltas=configs)
        write_delta(scratch, masks, tensors, None, home=output)
    return deltas.densities()
