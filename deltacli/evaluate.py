"""Scoring a classifier: batch inference under accelerate and the metrics of the task."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from deltacli.build import prepare_model
from deltacli.data import batches, load_scoring_data
from deltacli.models import config_labels, load_config, load_model, load_tokenizer
from deltacli.recipe import DataConfig
from deltacli.runtime import make_accelerator
from deltacli.store import read_delta


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


@torch.no_grad()
def evaluate(model: nn.Module, batches: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Mean loss and the classification metrics over every example, gathered from all
    processes (duplicates that pad the last batch across processes are dropped)."""
    was_training = model.training
    model.eval()
    predictions, labels, losses = [], [], []
    for batch in batches:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        gathered = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], loss))
        for store, value in zip((predictions, labels, losses), gathered, strict=True):
            store.append(value.cpu())
    model.train(was_training)
    metrics = classification_metrics(torch.cat(predictions), torch.cat(labels))
    return {"loss": float(torch.cat(losses).mean()), **metrics, "examples": len(torch.cat(labels))}


def score_delta(
    folder: Path,
    data: str,
    model: str | None = None,
    columns: dict[str, str | None] | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Score base model + the delta in `folder` (deltacli's or PEFT's) on `data`.

    `columns` overrides the saved recipe's text/text_pair/label column names.
    """
    saved = read_delta(folder, model)
    data_config = _with_columns(saved.recipe.data, columns)
    tokenizer = load_tokenizer(saved.recipe.model)
    table, labels = load_scoring_data(data, data_config, tokenizer)
    recipe = dataclasses.replace(saved.recipe, data=dataclasses.replace(data_config, labels=labels))
    base, deltas = prepare_model(recipe)
    saved.load_into(deltas)
    return _score(base, tokenizer, table, batch_size)


def score_model(
    folder: str,
    data: str,
    columns: dict[str, str | None] | None = None,
    batch_size: int = 64,
    task: str = "sequence-classification",
    tokenizer_from: str | None = None,
) -> dict[str, float]:
    """Score a whole model directory (e.g. a fully fine-tuned or merged one) on `data`, with
    the label mapping its config carries (and another model's tokenizer, if it has none)."""
    config = load_config(folder)
    labels = config_labels(config)
    data_config = _with_columns(DataConfig(labels=labels), columns)
    tokenizer = load_tokenizer(tokenizer_from or folder)
    table, _ = load_scoring_data(data, data_config, tokenizer)
    return _score(load_model(folder, task, labels), tokenizer, table, batch_size)


def _with_columns(config: DataConfig, columns: dict[str, str | None] | None) -> DataConfig:
    return dataclasses.replace(config, **{k: v for k, v in (columns or {}).items() if v})


def _score(model: nn.Module, tokenizer, table, batch_size: int) -> dict[str, float]:
    accelerator = make_accelerator()
    model, loader = accelerator.prepare(model, batches(table, tokenizer, batch_size, False))
    return evaluate(model, loader, accelerator)
