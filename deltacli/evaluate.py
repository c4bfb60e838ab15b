"""Scoring a classifier: batch inference under accelerate and the metrics of the task."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from deltacli.build import prepare_model
from deltacli.data import batches, encode_generative, load_scoring_data, load_table
from deltacli.errors import DeltacliError
from deltacli.labels import IGNORE
from deltacli.lm_data import prompts_and_references
from deltacli.models import config_labels, load_config, load_model, load_tokenizer
from deltacli.recipe import GENERATIVE, DataConfig
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
def evaluate(
    model: nn.Module,
    batches: DataLoader,
    accelerator: Accelerator,
    task: str = "sequence-classification",
) -> dict[str, float]:
    """The task's metrics over every example, gathered from all processes (duplicates that
    pad the last batch across processes are dropped)."""
    was_training = model.training
    model.eval()
    try:
        score = _classification if task == "sequence-classification" else _language_model
        return score(model, batches, accelerator, task)
    finally:
        model.train(was_training)


def _classification(model, batches, accelerator, task) -> dict[str, float]:
    predictions, labels, losses = [], [], []
    for batch in batches:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        gathered = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], loss))
        for store, value in zip((predictions, labels, losses), gathered, strict=True):
            store.append(value.cpu())
    metrics = classification_metrics(torch.cat(predictions), torch.cat(labels))
    return {"loss": float(torch.cat(losses).mean()), **metrics, "examples": len(torch.cat(labels))}


def _language_model(model, batches, accelerator, task) -> dict[str, float]:
    """Token-level mean loss and perplexity over the label tokens."""
    sums, counts = [], []
    for batch in batches:
        labels = batch["labels"]
        logits = model(**batch).logits[:, -labels.shape[1] :]  # a prompt delta prepends positions
        if task == "causal-lm":
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


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    sample: bool = False,
    batch_size: int = 8,
) -> list[str]:
    """Greedy (or sampled) continuations of `prompts`, without the prompts."""
    was_training = model.training
    model.eval()
    decoder_only = not model.config.is_encoder_decoder
    tokenizer.padding_side = "left" if decoder_only else "right"
    texts = []
    try:
        for start in range(0, len(prompts), batch_size):
            inputs = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True
            ).to(next(model.parameters()).device)
            inputs.pop("token_type_ids", None)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                pad_token_id=tokenizer.pad_token_id,
            )
            if decoder_only:
                output = output[:, inputs["input_ids"].shape[1] :]
            texts += tokenizer.batch_decode(output, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = "right"
        model.train(was_training)
    return texts


def generation_metrics(generations: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after trimming), ROUGE-L F1 (rouge-score) and corpus BLEU (sacrebleu)."""
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise DeltacliError(
            "generation metrics need sacrebleu and rouge-score: pip install 'deltacli[generate]'"
        ) from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [
        scorer.score(ref, gen)["rougeL"].fmeasure
        for gen, ref in zip(generations, references, strict=True)
    ]
    exact = [gen.strip() == ref.strip() for gen, ref in zip(generations, references, strict=True)]
    return {
        "exact_match": sum(exact) / len(exact),
        "rouge_l": sum(rouge) / len(rouge),
        "bleu": sacrebleu.corpus_bleu(generations, [references]).score,
        "generated": len(generations),
    }


def score_delta(
    folder: Path,
    data: str,
    model: str | None = None,
    columns: dict[str, str | None] | None = None,
    batch_size: int = 64,
    generation: GenerationRequest | None = None,
) -> dict[str, float]:
    """Score base model + the delta in `folder` (deltacli's or PEFT's) on `data`.

    `columns` overrides the saved recipe's column names. For generative tasks, `generation`
    also asks for generations, written beside their references to a JSONL file and scored.
    """
    saved = read_delta(folder, model)
    recipe = saved.recipe
    data_config = _with_columns(recipe.data, columns)
    tokenizer = load_tokenizer(recipe.model)
    if recipe.task in GENERATIVE:
        table = load_table(data, data_config.hub_config)
        unpacked = dataclasses.replace(data_config, packing=False)
        encoded = encode_generative(table, tokenizer, unpacked, recipe.task)
        base, deltas = prepare_model(recipe)
        saved.load_into(deltas)
        metrics = _score(base, tokenizer, encoded.table, batch_size, recipe.task)
        if generation is not None:
            pairs = prompts_and_references(table, unpacked, tokenizer, recipe.task)
            metrics |= generation.run(base, tokenizer, pairs)
        return metrics
    table, labels = load_scoring_data(data, data_config, tokenizer)
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(data_config, labels=labels))
    base, deltas = prepare_model(recipe)
    saved.load_into(deltas)
    return _score(base, tokenizer, table, batch_size)


@dataclasses.dataclass
class GenerationRequest:
    """How many examples to generate for, how, and where to write them."""

    count: int
    output: Path
    max_new_tokens: int = 64
    sample: bool = False

    def run(self, model: nn.Module, tokenizer, pairs: list[tuple[str, str]]) -> dict[str, float]:
        pairs = pairs[: self.count]
        prompts = [prompt for prompt, _ in pairs]
        references = [reference for _, reference in pairs]
        texts = generate(model, tokenizer, prompts, self.max_new_tokens, self.sample)
        lines = [
            json.dumps({"prompt": p, "generation": g, "reference": r})
            for p, g, r in zip(prompts, texts, references, strict=True)
        ]
        scratch = self.output.with_name(f".{self.output.name}.tmp")
        scratch.write_text("\n".join(lines) + "\n", encoding="utf-8")
        scratch.replace(self.output)  # atomic: a crash leaves no half-written file
        return generation_metrics(texts, references)


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


def _score(
    model: nn.Module, tokenizer, table, batch_size: int, task: str = "sequence-classification"
) -> dict[str, float]:
    accelerator = make_accelerator()
    model, loader = accelerator.prepare(model, batches(table, tokenizer, batch_size, False))
    return evaluate(model, loader, accelerator, task)
