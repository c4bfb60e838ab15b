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


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro-F1 and Matthews correlation (multi-class, Gorodkin's form).

    Macro-F1 averages over the classes present in the labels or the predictions, as
    scikit-learn does.
    """
    classes = int(max(predictions.max(), labels.max())) + 1
    confusion = torch.zeros(classes, classes, dtype=torch.float64)
    confusion.index_put_((labels, predictions), torch.ones_like(labels, dtype=torch.float64), True)
    total = confusion.sum()
    correct = confusion.trace()
    true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
    tp = confusion.diag()
    f1_denominator = true_counts + predicted_counts
    present = f1_denominator > 0
    f1 = 2 * tp[present] / f1_denominator[present]
    covariance = correct * total - (true_counts * predicted_counts).sum()
    spread = (total**2 - (predicted_counts**2).sum()) * (total**2 - (true_counts**2).sum())
    mcc = covariance / spread.sqrt() if spread > 0 else torch.tensor(0.0)
    return {
        "accuracy": float(correct / total),
        "macro_f1": float(f1.mean()),
        "mcc": float(mcc),
    }


def score_classes(model: nn.Module, batches: Iterable[dict], accelerator: Accelerator) -> dict:
    """Accuracy and the other label metrics, and the mean loss, over every example."""
    predictions, labels, losses = [], [], []
    for batch in batches:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        gathered = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], loss))
        for store, value in zip((predictions, labels, losses), gathered, strict=True):
            store.append(value.cpu())
    metrics = classification_metrics(torch.cat(predictions), torch.cat(labels))
    return {"loss": float(torch.cat(losses).mean()), **metrics, "examples": len(torch.cat(labels))}


def score_tokens(
    model: nn.Module, batches: Iterable[dict], accelerator: Accelerator, shift: bool
) -> dict:
    """Token-level mean loss and perplexity over the label tokens; `shift`: a causal LM's
    logits at position t predict the label at t + 1."""
    sums, counts = [], []
    for batch in batches:
        labels = batch["labels"]
        logits = model(**batch).logits[:, -labels.shape[1] :]  # a prompt delta prepends positions
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        # Row by row: the vocabulary makes a whole batch's log-probabilities large.
        losses = torch.stack(
            [
                F.cross_entropy(row.float(), target, ignore_index=IGNORE, reduction="sum")
                for row, target in zip(logits, labels, strict=True)
            ]
        )
        gathered = accelerator.gather_for_metrics((losses, (labels != IGNORE).sum(1)))
        del logits
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
