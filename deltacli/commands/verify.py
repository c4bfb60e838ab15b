"""Checking a merged model against the live base + deltas it was made from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from deltacli.build import attach_recipe, prepare_model, resolved_recipe
from deltacli.errors import VerificationError
from deltacli.models.shards import NAMES, ShardReader
from deltacli.storage.delta_folder import SavedDelta

# Largest max-abs logit difference accepted, relative to the logits' own scale, by the
# precision the merged weights were written in.
TOLERANCE = {"F32": 1e-4, "F16": 1e-2, "BF16": 5e-2}


def verify_merge(base_dir: Path, saved: list[SavedDelta], merged_dir: Path) -> float:
    """Max |logit difference| between the merged model and base + deltas attached live, on a
    seeded probe batch with padding; raises `VerificationError` above the tolerance."""
    # The reference in float32, unquantised: the merge's own arithmetic is float32.
    recipe = dataclasses.replace(resolved_recipe(saved[0]), base_dtype="fp32", quantize=None)
    reference, deltas = prepare_model(recipe)
    saved[0].load_into(deltas)
    for later in saved[1:]:
        later.load_into(attach_recipe(reference, resolved_recipe(later)))
    merged = recipe.task_entry.model_class.from_pretrained(
        merged_dir, dtype=torch.float32, trust_remote_code=False
    )
    probe = _probe_batch(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference.eval()(**probe).logits
        actual = merged.eval()(**probe).logits
    difference = float((expected - actual).abs().max())
    precision = _lowest_precision(merged_dir)
    tolerance = TOLERANCE[precision] * max(1.0, float(expected.abs().max()))
    if not difference <= tolerance:
        raise VerificationError(
            f"the merged model's logits differ from base + delta by {difference:.3g} "
            f"(tolerance {tolerance:.3g} for {precision} weights); nothing was written"
        )
    return difference


def _probe_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (4, 16), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2:, 12:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _lowest_precision(folder: Path) -> str:
    """The least precise floating dtype among the merged shards' tensors."""
    found = set()
    for shard in folder.glob("*.safetensors"):
        with ShardReader(shard) as reader:
            found |= {info.dtype for info in reader.info.values()}
    for dtype in (torch.bfloat16, torch.float16):
        if dtype in found:
            return NAMES[dtype]
    return "F32"
