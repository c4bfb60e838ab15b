"""Number formats: what the frozen base is stored in, what deltas train in, what the forward
computes in.

Users load bases the way PEFT users do: in the checkpoint's own dtype (bf16) on a GPU that
has it, or quantised to 4 or 8 bits. The trainable tensors stay in float32 over such a base
(an AdamW update far smaller than bf16's step would otherwise round away), and the forward
then runs under autocast in the base's dtype, so every matmul meets two tensors of one type.
"""

from __future__ import annotations

import torch

from deltacli.errors import DeltacliError

BASE_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
HALF = (torch.bfloat16, torch.float16)
_AUTOCAST = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def base_dtype(choice: str, checkpoint: torch.dtype | None, gpu: bool) -> torch.dtype:
    """The frozen base's dtype. `auto`: the checkpoint's own half precision on a GPU that
    supports it, float32 anywhere else (CPUs compute half precision slowly)."""
    if choice != "auto":
        return BASE_DTYPES[choice]
    supported = checkpoint != torch.bfloat16 or (gpu and torch.cuda.is_bf16_supported())
    return checkpoint if gpu and checkpoint in HALF and supported else torch.float32


def stored_dtype(
    choice: str, quantize: str | None, checkpoint: torch.dtype | None, gpu: bool
) -> torch.dtype:
    """What the frozen base is held in: bitsandbytes computes a quantised base's kept
    layers in bf16; otherwise `base_dtype`."""
    return torch.bfloat16 if quantize else base_dtype(choice, checkpoint, gpu)


def trainable_dtype(weight: torch.Tensor) -> torch.dtype:
    """What a delta beside `weight` trains in: float32 over a half-precision or quantised
    weight, the weight's own dtype over float32 or float64."""
    if weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


def mixed_precision(requested: str, dtype: torch.dtype, gpu: bool) -> str:
    """Accelerate's `mixed_precision` for a base of `dtype`: the recipe's choice, or autocast
    in the base's own half precision (so float32 deltas meet it in one type)."""
    if requested != "no":
        return requested
    chosen = _AUTOCAST.get(dtype, "no")
    if chosen == "fp16" and not gpu:
        raise DeltacliError("an fp16 base needs a GPU (autocast in fp16); use base_dtype=bf16")
    return chosen
