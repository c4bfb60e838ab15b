"""Folding deltas into base weights, one safetensors shard at a time.

Peak memory is about one tensor plus the deltas, never the whole model: each base shard is
read tensor by tensor, every delta that changes a tensor adds its increment (`W + w·ΔW`, in
fp32), and the tensor is appended to its output shard before the next is read (`shards`).
The output is a plain Hugging Face directory for the delta's task: config, tokenizer and
generation files copied, the shard layout kept, the index rewritten. Only deltas linear in
the weights can be folded; the others are refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from deltacli.build import saved_on_meta
from deltacli.deltas import DeltaSet
from deltacli.errors import DeltacliError
from deltacli.models import local_dir
from deltacli.shards import ShardReader, ShardWriter, TensorInfo
from deltacli.store import SavedDelta, atomic_dir, check_output, read_delta, write_json
from deltacli.verify import verify_merge

INDEX_FILE = "model.safetensors.index.json"
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


@dataclasses.dataclass
class _Plan:
    """What to add to which tensor, and how checkpoint keys map to the task model's names."""

    model: nn.Module
    increments: dict[str, list[tuple[float, Callable]]]
    shapes: dict[str, torch.Size]
    needs_base: set[str]

    def name_of(self, key: str) -> str:
        """The task model's name for a base checkpoint key (a bare `BertModel` checkpoint
        lacks the `bert.` prefix that `BertForSequenceClassification` uses)."""
        prefix = getattr(self.model, "base_model_prefix", "")
        if key not in self.shapes and prefix and f"{prefix}.{key}" in self.shapes:
            return f"{prefix}.{key}"
        return key


def merge(
    base: str,
    deltas: list[Path],
    output: Path,
    dtype: str = "same",
    weights: list[float] | None = None,
    verify: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
) -> MergeReport:
    """Write `base` with every delta in `deltas` folded in to `output`."""
    started = time.perf_counter()
    if dtype != "same" and dtype not in DTYPES:
        raise DeltacliError(f"--dtype must be same, {', '.join(DTYPES)}; got {dtype!r}")
    weights = weights or [1.0] * len(deltas)
    if len(weights) != len(deltas):
        raise DeltacliError(f"{len(weights)} weights given for {len(deltas)} deltas")
    if verify and any(w != 1.0 for w in weights):
        raise DeltacliError(
            "--verify compares with the deltas attached live, which has no weights; "
            "drop --weights or --verify"
        )
    check_output(output, overwrite)
    base_dir = local_dir(base)
    shards, index = _checkpoint(base_dir)
    saved = [read_delta(folder, model=str(base_dir)) for folder in deltas]
    plan = _plan(saved, weights)
    report = MergeReport(
        str(output), [str(d) for d in deltas], weights, dtype, len(shards), 0, 0, 0, 0.0
    )
    with atomic_dir(output, overwrite) as scratch:
        weight_map = _write_shards(base_dir, shards, plan, scratch, dtype, report, console)
        if index is not None:
            total = sum((scratch / f).stat().st_size for f in set(weight_map.values()))
            write_json(
                scratch / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
        _copy_side_files(base_dir, scratch)
        config = plan.model.config
        if dtype != "same":
            config.dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
        config.to_json_file(scratch / "config.json")
        if verify:
            report.max_logit_difference = verify_merge(base_dir, saved, scratch)
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def _checkpoint(folder: Path) -> tuple[list[str], dict | None]:
    """The base's shard files, in index order, and its index (None when unsharded)."""
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        return list(dict.fromkeys(index["weight_map"].values())), index
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"], None
    pickled = any(folder.glob("*.bin"))
    hint = " (it has only pickled .bin weights, which deltacli never loads)" if pickled else ""
    raise DeltacliError(f"{folder} holds no model.safetensors or {INDEX_FILE}{hint}")


def _plan(saved: list[SavedDelta], weights: list[float]) -> _Plan:
    """Attach every delta on the meta device, refuse what cannot fold, collect increments."""
    model, first = saved_on_meta(saved[0])
    params = dict(model.named_parameters())
    increments: dict[str, list[tuple[float, Callable]]] = {}
    needs_base: set[str] = set()
    for delta_dir, weight in zip(saved, weights, strict=True):
        attached = first if delta_dir is saved[0] else saved_on_meta(delta_dir)[1]
        _refuse_unmergeable(attached, delta_dir)
        values = delta_dir.values_for(attached)
        for delta in attached.members:
            for name, increment in delta.delta_weights(values).items():
                increments.setdefault(name, []).append((weight, increment))
                if delta.needs_base:
                    needs_base.add(name)
    shapes = {name: p.shape for name, p in params.items()}
    return _Plan(model, increments, shapes, needs_base)


def _check_base_has(plan: _Plan, names: set[str]) -> None:
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
    base_dir: Path,
    shards: list[str],
    plan: _Plan,
    scratch: Path,
    dtype: str,
    report: MergeReport,
    console: Console | None,
) -> dict[str, str]:
    """Stream every shard through the plan, tensor by tensor; tensors the base lacks (a new
    task head) join the last shard in the base's floating dtype."""
    readers = [ShardReader(base_dir / shard) for shard in shards]
    try:
        infos = {plan.name_of(k): i for r in readers for k, i in r.info.items()}
        _check_base_has(plan, set(infos))
        floating = next((i.dtype for i in infos.values() if i.dtype.is_floating_point), None)
        added = {
            name: TensorInfo(floating or torch.float32, tuple(plan.shapes[name]))
            for name in plan.increments
            if name not in infos
        }
        weight_map: dict[str, str] = {}
        with _progress(console) as progress:
            bar = progress.add_task("merge", total=sum(i.nbytes for i in infos.values()))
            for shard, reader in zip(shards, readers, strict=True):
                names = {plan.name_of(key): key for key in reader.info}
                extra = added if reader is readers[-1] else {}
                layout = {n: _out_info(reader.info[k], dtype) for n, k in names.items()}
                layout |= {n: _out_info(info, dtype) for n, info in extra.items()}
                metadata = reader.metadata or {"format": "pt"}
                with ShardWriter(scratch / shard, layout, metadata) as writer:
                    for name, key in names.items():
                        if name in plan.increments:
                            tensor = reader.read(key)
                            _check_shape(name, tensor, plan)
                            tensor = _apply(tensor, plan.increments[name])
                            writer.write(name, tensor.to(layout[name].dtype))
                            report.tensors_changed += 1
                        elif layout[name] == reader.info[key]:
                            writer.copy(name, reader, key)
                        else:
                            writer.write(name, reader.read(key).to(layout[name].dtype))
                        progress.advance(bar, reader.info[key].nbytes)
                    for name, info in extra.items():
                        tensor = _apply(torch.zeros(info.shape), plan.increments[name])
                        writer.write(name, tensor.to(layout[name].dtype))
                        report.tensors_added += 1
                report.bytes_written += (scratch / shard).stat().st_size
                weight_map.update(dict.fromkeys(layout, shard))
    finally:
        for reader in readers:
            reader.close()
    return weight_map


def _out_info(info: TensorInfo, dtype: str) -> TensorInfo:
    """The merged tensor's dtype: the requested one (`same`: the base's); integers keep theirs."""
    if dtype == "same" or not info.dtype.is_floating_point:
        return info
    return TensorInfo(DTYPES[dtype], info.shape)


def _apply(tensor: torch.Tensor, changes: list[tuple[float, Callable]]) -> torch.Tensor:
    """Deltas in order, each on the result of the last: W <- W + w·ΔW(W), in fp32. A LoRA
    increment does not depend on W, so LoRAs add up; a specified tensor with weight 1 simply
    takes the delta's value, as it does when the deltas are attached one after another."""
    merged = tensor.float()
    for weight, increment in changes:
        merged.add_(increment(merged), alpha=weight)
    return merged


def _check_shape(name: str, tensor: torch.Tensor, plan: _Plan) -> None:
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
