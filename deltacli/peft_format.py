"""Mapping between a deltacli delta and PEFT's `adapter_config.json` and key names.

Where PEFT has the same method (LoRA, LayerNorm tuning), a saved delta *is* a PEFT adapter:
`peft.PeftModel.from_pretrained(base, dir)` loads it, and deltacli loads PEFT's adapters. The
task head trains beside the method and is what PEFT calls `modules_to_save`.
"""

from __future__ import annotations

from typing import Any

import torch

from deltacli.deltas import DeltaSet
from deltacli.errors import DeltacliError

TASK_TYPES = {
    "sequence-classification": "SEQ_CLS",
    "causal-lm": "CAUSAL_LM",
    "seq2seq": "SEQ_2_SEQ_LM",
}

# PEFT config fields whose non-default values change what an adapter computes. An adapter that
# sets one is refused rather than silently loaded as something else.
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
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
    if len(deltas.deltas) != 1 or deltas.deltas[0].peft_type is None:
        return None
    method = deltas.deltas[0]
    head = sorted({n.split(".")[0] for n in deltas.head.params}) if deltas.head else None
    return {
        "peft_type": method.peft_type,
        "task_type": TASK_TYPES[task],
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "modules_to_save": head,
        **method.peft_config(deltas.model),
    }


def recipe_from_peft(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The raw recipe that rebuilds a PEFT adapter's deltas (validated by the caller).

    PEFT saves no label names: the data scored with the adapter supplies them, in sorted
    order, and the head's saved shape checks their number.
    """
    task = {v: k for k, v in TASK_TYPES.items()}.get(config.get("task_type"))
    if task is None:
        raise DeltacliError(
            f"PEFT task_type {config.get('task_type')!r} is not supported yet "
            f"(supported: {', '.join(TASK_TYPES.values())})"
        )
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, False):
            raise DeltacliError(f"the PEFT option {key}={config[key]!r} is not supported")
    peft_type = config.get("peft_type")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [f"re:{targets}"]
    if peft_type == "LORA":
        delta = {
            "kind": "lora",
            "r": config["r"],
            "alpha": config.get("lora_alpha", 8),
            "dropout": config.get("lora_dropout", 0.0),
            "targets": targets,
            "rslora": config.get("use_rslora", False),
        }
    elif peft_type == "LN_TUNING":
        delta = {"kind": "layernorm", "targets": targets}
    elif peft_type == "IA3":
        feedforward = config.get("feedforward_modules") or []
        if isinstance(feedforward, str):
            feedforward = [f"re:{feedforward}"]
        delta = {"kind": "ia3", "targets": targets, "feedforward": feedforward}
    elif peft_type == "PROMPT_TUNING":
        delta = {"kind": "prompt", "length": config["num_virtual_tokens"]}
    elif peft_type == "PREFIX_TUNING":
        # PEFT saves a reparameterised prefix folded, as deltacli does.
        delta = {"kind": "prefix", "length": config["num_virtual_tokens"]}
    else:
        raise DeltacliError(f"PEFT adapters of type {peft_type!r} are not supported yet")
    head_keys = [k for k in tensors if _in_modules(k, config.get("modules_to_save") or [])]
    return {
        "name": f"peft-{peft_type.lower()}",
        "model": config.get("base_model_name_or_path") or "default",
        "task": task,
        "head": bool(head_keys),
        "deltas": [delta],
    }


def _in_modules(key: str, modules: list[str]) -> bool:
    """Whether a saved key belongs to one of PEFT's `modules_to_save` (matched by suffix)."""
    parts = key.removeprefix("base_model.model.").split(".")
    prefixes = {".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts))}
    return any(m in prefixes for m in modules)
