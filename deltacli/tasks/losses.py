"""The training loss as a sum over loss-bearing units, and how many units each example has.

An optimizer step's loss is the sum over every unit of all its micro-batches and processes,
divided by their count — tokens whose label is not -100 (after the shift, for a causal LM),
or examples (classification). Each micro-batch's mean would weigh a token in a micro-batch
with few response tokens more than one in a long batch, so the result would depend on how
the step is split (the gradient-accumulation bug transformers fixed with
`num_items_in_batch`). The trainer divides these sums by the step's count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltacli.labels import IGNORE


def precise(logits: torch.Tensor) -> torch.Tensor:
    """Half precision computes the loss in float32; float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def class_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one label per example."""
    return F.cross_entropy(precise(logits), labels, reduction="sum")


def class_units(labels: list | int) -> int:
    return 1


def aligned(
    outputs: torch.Tensor, labels: torch.Tensor, *, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position outputs (logits or hidden states) and the labels they score. A prompt
    delta prepends positions, so the outputs align on the labels' last ones; `shift`: a
    causal LM's output at t predicts the label at t + 1."""
    outputs = outputs[:, -labels.shape[1] :]
    return (outputs[:, :-1] if shift else outputs), scored_labels(labels, shift=shift)


def scored_labels(labels: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """The labels that outputs score: a causal LM's first label has no position before it."""
    return labels[:, 1:] if shift else labels


def token_loss(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """Summed cross-entropy over the label tokens that are not -100 (`aligned`)."""
    logits, labels = aligned(logits, labels, shift=shift)
    return F.cross_entropy(
        precise(logits).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def token_units(labels: list[int], *, shift: bool) -> int:
    """Label tokens of one example that the loss counts."""
    counted = labels[1:] if shift else labels
    return sum(label != IGNORE for label in counted)
