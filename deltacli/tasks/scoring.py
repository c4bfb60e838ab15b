"""Scores of a model on batches: label metrics for classifiers, loss and perplexity for
generation. Each task names its scorer in the task registry (`tasks.py`)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from deltacli.labels import IGNORE
from deltacli.tasks.fused_loss import ChunkedHeadLoss
from deltacli.tasks.losses import aligned, scored_labels

# Label names that mean "the positive class" of a binary task (compared in lower case).
POSITIVE_NAMES = ("1", "true", "positive", "pos", "yes")


def positive_class(labels: list) -> int:
    """Which of two labels F1 is reported for, as GLUE and the papers do: the one named
    1/true/positive/pos/yes, else the second in sorted order (deltacli's label ids are
    sorted, so: id 1)."""
    named = [i for i, label in enumerate(labels) if str(label).lower() in POSITIVE_NAMES]
    return named[0] if len(named) == 1 else 1


def reported_metrics(classes: int) -> tuple[str, ...]:
    """The label metrics a task of `classes` classes reports (see classification_metrics)."""
    shape = ("f1",) if classes == 2 else ("weighted_f1",)
    return ("accuracy", *shape, "macro_f1", "mcc", "loss")


def classification_metrics(
    predictions: torch.Tensor, labels: torch.Tensor, classes: int | None = None, positive: int = 1
) -> dict[str, float]:
    """The label metrics the ecosystem reports, equal to scikit-learn's.

    Every task: accuracy, macro-F1 (over the classes present in the labels or the
    predictions) and Matthews correlation (Gorodkin's multi-class form). Two classes: F1 of
    the `positive` class (`f1_score(average="binary")`, GLUE's F1). More: weighted F1.
    """
    found = int(max(predictions.max(), labels.max())) + 1
    classes = max(classes or 0, found)
    confusion = torch.zeros(classes, classes, dtype=torch.float64)
    confusion.index_put_((labels, predictions), torch.ones_like(labels, dtype=torch.float64), True)
    total = confusion.sum()
    correct = confusion.trace()
    true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
    tp = confusion.diag()
    f1_denominator = true_counts + predicted_counts
    present = f1_denominator > 0
    per_class = torch.where(present, 2 * tp / f1_denominator.clamp(min=1), 0.0)
    covariance = correct * total - (true_counts * predicted_counts).sum()
    spread = (total**2 - (predicted_counts**2).sum()) * (total**2 - (true_counts**2).sum())
    mcc = covariance / spread.sqrt() if spread > 0 else torch.tensor(0.0)
    metrics = {"accuracy": float(correct / total)}
    if classes == 2:
        metrics["f1"] = float(per_class[positive])
    metrics["macro_f1"] = float(per_class[present].mean())
    if classes > 2:
        metrics["weighted_f1"] = float((per_class * true_counts).sum() / total)
    metrics["mcc"] = float(mcc)
    return metrics


def score_classes(
    model: nn.Module, batches: Iterable[dict], accelerator: Accelerator, labels: list | None
) -> dict:
    """Accuracy and the other label metrics, and the mean loss, over every example; with the
    label names, F1's positive class is named (`positive_class`)."""
    predictions, truth, losses = [], [], []
    for batch in batches:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        gathered = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], loss))
        for store, value in zip((predictions, truth, losses), gathered, strict=True):
            store.append(value.cpu())
    names = labels or list(range(model.config.num_labels))
    positive = positive_class(names)
    metrics = classification_metrics(torch.cat(predictions), torch.cat(truth), len(names), positive)
    if "f1" in metrics:
        metrics["positive_class"] = str(names[positive])
    return {"loss": float(torch.cat(losses).mean()), **metrics, "examples": len(torch.cat(truth))}


def _row_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Each row's summed loss from the whole logits, row by row: the vocabulary makes a
    whole batch's log-probabilities large."""
    logits, labels = aligned(logits, labels, shift=shift)
    return torch.stack(
        [
            F.cross_entropy(row.float(), target, ignore_index=IGNORE, reduction="sum")
            for row, target in zip(logits, labels, strict=True)
        ]
    )


def score_tokens(
    model: nn.Module,
    batches: Iterable[dict],
    accelerator: Accelerator,
    labels: list | None = None,
    *,
    shift: bool,
    chunked: bool = False,
) -> dict:
    """Token-level mean loss and perplexity over the label tokens; `shift`: a causal LM's
    logits at position t predict the label at t + 1; `chunked` (`train.fused_loss`): its
    output layer runs a chunk of counted positions at a time where it can."""
    sums, counts = [], []
    head = ChunkedHeadLoss.in_run(model, accelerator) if shift and chunked else None
    for batch in batches:
        labels = batch["labels"]
        # A causal LM given labels would compute its own loss too, over a float copy of the
        # logits; a seq2seq model needs them for its decoder's inputs.
        inputs = {k: v for k, v in batch.items() if k != "labels"} if shift else batch
        if head is not None:
            losses = head.of_batch(model, inputs, labels, accelerator, per_row=True)
        else:
            losses = _row_losses(model(**inputs).logits, labels, shift)
        counted = (scored_labels(labels, shift=shift) != IGNORE).sum(1)
        gathered = accelerator.gather_for_metrics((losses, counted))
        sums.append(gathered[0].cpu())
        counts.append(gathered[1].cpu())
    tokens = int(torch.cat(counts).sum())
    loss = float(torch.cat(sums).sum() / max(tokens, 1))
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": tokens,
        "examples": len(torch.cat(counts)),
    }
