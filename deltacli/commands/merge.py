"""Folding deltas into base weights, one safetensors shard at a time.

Peak memory is about one tensor plus the deltas, never the whole model: each base shard is
read tensor by tensor, every delta that changes a tensor adds its increment (`W + w·ΔW`, in
fp32), and the tensor is appended to its output shard before the next is read (`shards`).
The output is a plain Hugging Face directory for the delta's task: config, tokenizer and
generation files copied, the shard layout kept, the index rewritten. Only deltas linear in
the weights can be folded; the others are refused before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import shutil
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from deltacli.build import saved_on_meta
from deltacli.commands.combine import METHODS, Combination
from deltacli.commands.verify import verify_merge
from deltacli.deltas import DeltaSet
from deltacli.errors import DeltacliError
from deltacli.files.memory import return_large_buffers
from deltacli.files.outputs import atomic_dir, check_apart, check_output, notice_on
from deltacli.models.loading import load_config, local_dir
from deltacli.models.shards import ShardWriter, TensorInfo
from deltacli.models.weights import INDEX_FILE, Checkpoint
from deltacli.storage.delta_folder import SavedDelta, read_delta, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Files of a model directory that hold weights: replaced by the merged shards, never copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


@dataclasses.dataclass
class MergeReport:
    output: str
    deltas: list[str]
    weights: list[float]
    dtype: str
    shards: int
    tensors_changed: int
    tensors_added: int
    bytes_written: int
    seconds: float
    max_logit_difference: float | None = None
    method: str | None = None  # None: the deltas added in order


@dataclasses.dataclass
class Plan:
    """What to add to which tensor of the task model (by its parameter names)."""

    model: nn.Module
    increments: dict[str, list[tuple[int, float, Callable]]]  # (delta index, weight, ΔW)
    shapes: dict[str, torch.Size]
    needs_base: set[str]


def merge(
    base: str,
    deltas: list[Path],
    output: Path,
    dtype: str = "same",
    weights: list[float] | None = None,
    verify: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    method: str | None = None,
    densities: list[float] | None = None,
    seed: int = 0,
) -> MergeReport:
    """Write `base` with every delta in `deltas` folded in to `output`: in order, or
    combined by a merge `method` (`combine.METHODS`) with per-delta `densities`."""
    started = time.perf_counter()
    return_large_buffers()  # freed tensors go back to the OS, not to a growing heap
    if dtype != "same" and dtype not in DTYPES:
        raise DeltacliError(f"--dtype must be same, {', '.join(DTYPES)}; got {dtype!r}")
    weights = weights or [1.0] * len(deltas)
    if len(weights) != len(deltas):
        raise DeltacliError(f"{len(weights)} weights given for {len(deltas)} deltas")
    if not all(math.isfinite(w) for w in weights):
        raise DeltacliError(f"--weights must be finite numbers, got {weights}")
    if verify and any(w != 1.0 for w in weights):
        raise DeltacliError(
            "--verify compares with the deltas attached live, which has no weights; "
            "drop --weights or --verify"
        )
    combination = _combination(method, densities, weights, len(deltas), seed, verify)
    check_output(output, overwrite)
    check_apart(output, [("base model", base), *(("delta", d) for d in deltas)])
    base_dir = local_dir(base)
    if getattr(load_config(str(base_dir)), "quantization_config", None):
        raise DeltacliError(
            f"{base} is stored quantised; merging rounds the delta into 4- or 8-bit weights "
            "and loses it: merge onto the full-precision base it was quantised from"
        )
    saved = [read_delta(folder, model=str(base_dir)) for folder in deltas]
    plan = plan_increments(saved, weights)
    with Checkpoint(base_dir, plan.model) as checkpoint:
        report = MergeReport(
            str(output),
            [str(d) for d in deltas],
            weights,
            dtype,
            len(checkpoint.files),
            0,
            0,
            0,
            0.0,
            method=method,
        )
        with (
            _out_of_space(output, checkpoint),
            atomic_dir(output, overwrite, "merged model", notice_on(console)) as scratch,
        ):
            weight_map = _write_shards(
                checkpoint, plan, scratch, dtype, report, console, combination
            )
            if checkpoint.index is not None:
                total = sum((scratch / f).stat().st_size for f in set(weight_map.values()))
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                write_json(scratch / INDEX_FILE, index)
            _copy_side_files(base_dir, scratch)
            config = plan.model.config
            if dtype != "same":
                config.dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
            config.to_json_file(scratch / "config.json")
            if verify:
                report.max_logit_difference = verify_merge(base_dir, saved, scratch)
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def _combination(
    method: str | None,
    densities: list[float] | None,
    weights: list[float],
    count: int,
    seed: int,
    verify: bool,
) -> Combination | None:
    """The merge method as asked, checked before anything is read."""
    if method is None:
        if densities is not None:
            raise DeltacliError("--density needs --method ties, dare_linear or dare_ties")
        return None
    if method not in METHODS:
        raise DeltacliError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if verify:
        raise DeltacliError(
            "--verify compares with the deltas attached live, which add up in order; "
            f"a {method} merge has no live counterpart: drop --verify"
        )
    densities = densities or [1.0]
    if len(densities) == 1:
        densities = densities * count
    if len(densities) != count:
        raise DeltacliError(f"{len(densities)} densities given for {count} deltas")
    outside = [d for d in densities if not (0 < d <= 1)]
    if outside:
        raise DeltacliError(f"--density must lie in (0, 1]; got {outside[0]}")
    return Combination(method, weights, densities, seed)


@contextlib.contextmanager
def _out_of_space(output: Path, checkpoint: Checkpoint) -> Iterator[None]:
    """A full disk is one line that says how much the merge needs (nothing is left behind:
    the scratch folder is gone by the time this runs)."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        size = sum(info.nbytes for info in map(checkpoint.info, checkpoint.keys))
        raise DeltacliError(
            f"no space left on the device while writing {output}: the merged model needs "
            f"about {size / 2**20:,.1f} MB free; nothing was written"
        ) from None


def plan_increments(saved: list[SavedDelta], weights: list[float]) -> Plan:
    """Attach every delta on the meta device, refuse what cannot fold, collect increments."""
    model, first = saved_on_meta(saved[0])
    params = dict(model.named_parameters())
    increments: dict[str, list[tuple[int, float, Callable]]] = {}
    needs_base: set[str] = set()
    for index, (delta_dir, weight) in enumerate(zip(saved, weights, strict=True)):
        own, attached = (model, first) if delta_dir is saved[0] else saved_on_meta(delta_dir)
        _refuse_unmergeable(attached, delta_dir)
        values = delta_dir.values_for(attached)
        own_shapes = {name: p.shape for name, p in own.named_parameters()}
        for delta in attached.members:
            for name, increment in delta.delta_weights(values).items():
                _refuse_other_shape(name, own_shapes, params, delta_dir, saved[0])
                increments.setdefault(name, []).append((index, weight, increment))
                if delta.needs_base:
                    needs_base.add(name)
    shapes = {name: p.shape for name, p in params.items()}
    return Plan(model, increments, shapes, needs_base)


def _refuse_other_shape(
    name: str,
    shapes: dict[str, torch.Size],
    first: dict[str, torch.Tensor],
    saved: SavedDelta,
    first_saved: SavedDelta,
) -> None:
    """Deltas combine only where the tensors they change have one shape: a head for other
    labels (two classes and four) or another base's layers would not add up."""
    if name in first and name in shapes and first[name].shape != shapes[name]:
        raise DeltacliError(
            f"{saved.folder} changes {name} of shape {tuple(shapes[name])}, "
            f"{first_saved.folder}'s base has it of shape {tuple(first[name].shape)}: deltas "
            "of different shapes do not combine (a head for other labels? merge the deltas "
            "without their heads)"
        )


def _check_base_has(plan: Plan, names: set[str]) -> None:
    """An increment to a weight the checkpoint lacks is an error, unless every delta that
    touches it replaces it outright (a task head new to this base)."""
    missing = sorted(n for n in plan.increments if n not in names and n in plan.needs_base)
    if missing:
        raise DeltacliError(
            f"the base checkpoint has no tensor {missing[0]}, which the delta changes; "
            "is this the delta's base model?"
        )


def _refuse_unmergeable(deltas: DeltaSet, saved: SavedDelta) -> None:
    for delta in deltas.members:
        if not delta.mergeable:
            raise DeltacliError(
                f"{saved.folder} holds a {delta.kind} delta, which is not linear in the base "
                "weights and cannot be merged; load it with the base model instead"
            )


def _write_shards(
    checkpoint: Checkpoint,
    plan: Plan,
    scratch: Path,
    dtype: str,
    report: MergeReport,
    console: Console | None,
    combination: Combination | None = None,
) -> dict[str, str]:
    """Stream every shard through the plan, tensor by tensor; tensors the base lacks (a new
    task head) join the last shard in the base's floating dtype."""
    _check_base_has(plan, set(checkpoint.keys))
    infos = {name: checkpoint.info(name) for name in checkpoint.keys}
    floating = next((i.dtype for i in infos.values() if i.dtype.is_floating_point), None)
    added = {
        name: TensorInfo(floating or torch.float32, tuple(plan.shapes[name]))
        for name in plan.increments
        if name not in infos
    }
    weight_map: dict[str, str] = {}
    with _progress(console) as progress:
        bar = progress.add_task("merge", total=sum(i.nbytes for i in infos.values()))
        for file, reader in zip(checkpoint.files, checkpoint.readers, strict=True):
            names = checkpoint.names_in(reader)
            extra = added if reader is checkpoint.readers[-1] else {}
            layout = {name: _out_info(infos[name], dtype) for name in names}
            layout |= {name: _out_info(info, dtype) for name, info in extra.items()}
            with ShardWriter(scratch / file, layout, reader.metadata or {"format": "pt"}) as writer:
                for name in names:
                    key = checkpoint.keys[name][1]
                    if name in plan.increments:
                        tensor = reader.read(key).float()  # the stored copy freed at once
                        _check_shape(name, tensor, plan)
                        tensor = apply_increments(tensor, plan.increments[name], name, combination)
                        writer.write(name, tensor.to(layout[name].dtype))
                        report.tensors_changed += 1
                    elif layout[name] == infos[name]:
                        writer.copy(name, reader, key)
                    else:
                        writer.write(name, reader.read(key).to(layout[name].dtype))
                    progress.advance(bar, infos[name].nbytes)
                for name, info in extra.items():
                    tensor = apply_increments(
                        torch.zeros(info.shape), plan.increments[name], name, combination
                    )
                    writer.write(name, tensor.to(layout[name].dtype))
                    report.tensors_added += 1
            report.bytes_written += (scratch / file).stat().st_size
            weight_map.update(dict.fromkeys(layout, file))
    return weight_map


def _out_info(info: TensorInfo, dtype: str) -> TensorInfo:
    """The merged tensor's dtype: the requested one (`same`: the base's); integers keep theirs."""
    if dtype == "same" or not info.dtype.is_floating_point:
        return info
    return TensorInfo(DTYPES[dtype], info.shape)


def apply_increments(
    tensor: torch.Tensor,
    changes: list[tuple[int, float, Callable]],
    name: str = "",
    combination: Combination | None = None,
) -> torch.Tensor:
    """Without a merge method, deltas in order, each on the result of the last:
    W <- W + w·ΔW(W), in fp32. A LoRA increment does not depend on W, so LoRAs add up; a
    specified tensor with weight 1 simply takes the delta's value, as it does when the deltas
    are attached one after another. With one, every ΔWᵢ is taken against the base and the
    method combines them (`combine`)."""
    merged = tensor.float()
    if combination is None:
        for _, weight, increment in changes:
            merged.add_(increment(merged), alpha=weight)
        return merged
    makers = [(index, partial(fn, merged)) for index, _, fn in changes]
    return merged.add_(combination(name, makers))


def _check_shape(name: str, tensor: torch.Tensor, plan: Plan) -> None:
    if name in plan.shapes and tensor.shape != plan.shapes[name]:
        raise DeltacliError(
            f"base tensor {name} has shape {tuple(tensor.shape)} but the delta was trained for "
            f"{tuple(plan.shapes[name])}; is this the delta's base model?"
        )


def _copy_side_files(base_dir: Path, scratch: Path) -> None:
    """Tokenizer, generation config and the rest: everything that is not weights."""
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != INDEX_FILE:
            shutil.copy2(path, scratch / path.name)


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
    )
