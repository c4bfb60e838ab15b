"""Mapping between a deltacli delta and PEFT's `adapter_config.json` and key names.

Where PEFT has the same method (LoRA, LayerNorm tuning), a saved delta *is* a PEFT adapter:
`peft.PeftModel.from_pretrained(base, dir)` loads it, and deltacli loads PEFT's adapters. The
task head trains beside the method and is what PEFT calls `modules_to_save`.
"""

from __future__ import annotations

from typing import Any

import torch

from deltacli.deltas import DeltaSet
from deltacli.deltas.base import PEFT_PREFIX, kind_for_peft
from deltacli.errors import DeltacliError
from deltacli.tasks.registry import TASKS, by_peft_type
from deltacli.tasks.registry import task as task_entry

# PEFT config fields whose non-default values change what an adapter computes. An adapter that
# sets one is refused rather than silently loaded as something else.
_UNSUPPORTED: dict[str, Any] = {
    "lora_bias": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
}


def peft_config(deltas: DeltaSet, task: str, base_model: str) -> dict | None:
    """PEFT's `adapter_config.json` for these deltas, or None where PEFT cannot express them
    (several deltas, or a kind PEFT does not have)."""
    method = deltas.peft_method
    if method is None:
        return None
    head = sorted({n.split(".")[0] for n in deltas.head.params}) if deltas.head else None
    return {
        "peft_type": method.peft_type,
        "task_type": task_entry(task).peft_task_type,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "modules_to_save": head,
        **method.peft_config(deltas.model),
    }


def recipe_from_peft(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The raw recipe that rebuilds a PEFT adapter's deltas (validated by the caller).

    PEFT saves no label names: the data scored with the adapter supplies them, in sorted
    order, and the head's saved shape checks their number. An adapter saved without a
    `task_type` (PEFT's own default) gets no task here: the caller takes it from the base.
    """
    task_type = config.get("task_type")
    task = by_peft_type(task_type)
    if task is None and task_type is not None:
        supported = ", ".join(sorted({t.peft_task_type for t in TASKS.values()}))
        raise DeltacliError(
            f"PEFT task_type {task_type!r} is not supported yet (supported: {supported})"
        )
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, False):
            raise DeltacliError(f"the PEFT option {key}={config[key]!r} is not supported")
    kind = kind_for_peft(config.get("peft_type"))
    head_keys = [k for k in tensors if _in_modules(k, config.get("modules_to_save") or [])]
    raw = {
        "name": f"peft-{kind.kind}",
        "model": config.get("base_model_name_or_path") or "default",
        "head": bool(head_keys),
        "deltas": [kind.from_peft(config)],
    }
    return raw if task is None else {**raw, "task": task.name}


def _in_modules(key: str, modules: list[str]) -> bool:
    """Whether a saved key belongs to one of PEFT's `modules_to_save` (matched by suffix)."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    prefixes = {".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts))}
    return any(m in prefixes for m in modules)
