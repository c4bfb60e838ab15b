"""Dense updates to deltas: a LoRA from the SVD of each changed matrix's ΔW (`extract`), or
every changed tensor as it is (`dense_delta`, what `merge --as-delta` writes without a rank).

The counterpart of `sparsify`: where it keeps the largest entries, `extract` keeps the
largest singular directions. ΔW = W_tuned - W_base comes from a fully fine-tuned (or merged)
model directory, or from base + any delta that folds into weights (SIFT, IA3, a LoRA of
another rank ...). Each changed linear matrix becomes B·A with B = U_r·√S_r and A = √S_r·V_rᵀ
and scaling 1 (alpha = r), so PEFT loads the folder as an ordinary LoRA; the task head rides
along dense. The share of ‖ΔW‖ (Frobenius) each matrix keeps is √(Σ_{i≤r} s_i² / Σ s_i²).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from deltacli.build import save_values
from deltacli.commands.evaluate import score_delta
from deltacli.commands.merge import merge
from deltacli.commands.sparsify import MatrixReport, TunedModel, open_tuned, score_tuned
from deltacli.config.sections import DataConfig
from deltacli.deltas.lora import LoraConfig
from deltacli.deltas.specify import ModulesConfig
from deltacli.deltas.targets import is_transposed, minimal_suffixes, modules_by_name
from deltacli.errors import DeltacliError
from deltacli.files.outputs import atomic_dir, check_apart, check_output, notice_on
from deltacli.models.loading import local_dir
from deltacli.recipe import Recipe


@dataclasses.dataclass
class ExtractReport:
    output: str
    rank: int
    matrices: list[MatrixReport]  # `kept`: the rank kept in that matrix
    norm_kept: float  # share of the targeted matrices' update norm kept
    norm_kept_overall: float  # share of the whole update's norm (every changed tensor)
    dropped: list[str]  # changed tensors neither targeted nor part of the head
    note: str | None
    scores: dict[str, dict] | None = None


def extract(
    base: str,
    tuned: str,
    output: Path,
    rank: int,
    *,
    targets: list[str] | None = None,
    eval_data: str | None = None,
    columns: dict[str, str | None] | None = None,
    overwrite: bool = False,
    console: Console | None = None,
) -> ExtractReport:
    """Write the rank-`rank` LoRA closest to the tuned weights' change of every targeted
    matrix; with `eval_data`, score it beside the dense tuned model."""
    if rank < 1:
        raise DeltacliError(f"--rank must be at least 1, got {rank}")
    check_output(output, overwrite)
    check_apart(output, [("base model", base), ("tuned model", tuned)])
    base_dir = local_dir(base)
    source = open_tuned(tuned, base_dir)
    try:
        report = _extract(base, source, output, rank, targets, overwrite, console)
    finally:
        source.close()
    if eval_data:
        report.scores = {
            "low-rank": score_delta(output, eval_data, str(base_dir), columns),
            "dense": score_tuned(tuned, eval_data, base_dir, columns),
        }
    return report


def low_rank(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, share of ‖update‖ kept) of the best rank-`rank` approximation (Eckart-Young),
    the singular values split evenly between the factors; a matrix narrower than `rank` is
    padded with zero directions so every target has the same r."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    kept = min(rank, len(s))
    root = s[:kept].sqrt()
    b = torch.zeros(update.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, update.shape[1], dtype=torch.float64)
    b[:, :kept] = u[:, :kept] * root
    a[:kept] = root[:, None] * vh[:kept]
    total = float(s.square().sum())
    share = math.sqrt(float(s[:kept].square().sum()) / total) if total > 0 else 1.0
    return b.float(), a.float(), share


def _extract(base, source, output, rank, targets, overwrite, console) -> ExtractReport:
    modules = modules_by_name(source.model)
    matrices = source.targeted(targets)
    head = source.head()
    update = source.update
    values: dict[str, torch.Tensor] = {}
    reports, kept_norm, full_norm = [], 0.0, 0.0
    with Progress(console=console, disable=console is None, transient=True) as progress:
        for name in progress.track(matrices, description="extract"):
            module = name.removesuffix(".weight")
            change = update(name)
            change = change.T if is_transposed(modules[module]) else change  # GPT-2's Conv1D
            b, a, share = low_rank(change, rank)
            values[f"{module}.lora_A.weight"], values[f"{module}.lora_B.weight"] = a, b
            norm = float(change.norm())
            reports.append(
                MatrixReport(module, change.numel(), min(rank, min(change.shape)), share)
            )
            kept_norm += (share * norm) ** 2
            full_norm += norm**2
    values |= {name: source.read(name) for name in sorted(head)}
    dropped = sorted(source.changed(skip=set(matrices) | head))
    dropped_norm = sum(float(update(name).norm()) ** 2 for name in dropped)
    targeted = [m.removesuffix(".weight") for m in matrices]
    lora = LoraConfig(r=rank, alpha=float(rank), targets=minimal_suffixes(targeted, list(modules)))
    recipe = Recipe(
        name=f"extracted-r{rank}",
        model=base,
        task=source.task,
        head=bool(head),
        data=DataConfig(labels=source.labels),
        deltas=[lora],
    )
    with atomic_dir(output, overwrite, "low-rank delta", notice_on(console)) as scratch:
        save_values(scratch, recipe, values, {"extract": {"rank": rank}}, output)
    whole = full_norm + dropped_norm
    return ExtractReport(
        output=str(output),
        rank=rank,
        matrices=reports,
        norm_kept=math.sqrt(kept_norm / full_norm) if full_norm else 1.0,
        norm_kept_overall=math.sqrt(kept_norm / whole) if whole else 1.0,
        dropped=dropped,
        note=source.note,
    )


def dense_delta(base: str, tuned: Path, output: Path, overwrite: bool = False) -> int:
    """Every tensor `tuned` (a model directory) changes from `base`, as one `modules` delta
    of their new values; returns how many tensors it holds."""
    source = TunedModel(tuned, local_dir(base))
    try:
        changed = sorted(source.changed(skip=set()))
        if not changed:
            raise DeltacliError("the combined deltas change no tensor of the base")
        values = {name: source.read(name) for name in changed}
        recipe = Recipe(
            name="combined",
            model=base,
            task=source.task,
            head=False,  # a changed head is one of the tensors
            data=DataConfig(labels=source.labels),
            deltas=[ModulesConfig(targets=changed)],
        )
        with atomic_dir(output, overwrite, "combined delta") as scratch:
            save_values(scratch, recipe, values, {"combined": {"tensors": len(changed)}}, output)
    finally:
        source.close()
    return len(changed)


def combined_delta(
    base: str,
    deltas: list[Path],
    output: Path,
    *,
    rank: int | None,
    overwrite: bool = False,
    console: Console | None = None,
    **merge_options,
) -> ExtractReport | int:
    """`merge --as-delta`: the combined model is written beside OUT, streamed as `merge`
    streams it, then turned into a delta — the changed tensors as they are (returns their
    count), or with `rank` a LoRA from their SVD (returns its report)."""
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}-") as scratch:
        combined = Path(scratch) / "combined"
        merge(base, deltas, combined, **merge_options)
        if rank is None:
            return dense_delta(base, combined, output, overwrite)
        return extract(base, str(combined), output, rank, overwrite=overwrite, console=console)
