"""Scoring base model + delta, or a whole model: batch inference under accelerate, the
task's metrics, and generations beside their references."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from deltacli.build import compute_precision, prepare_model
from deltacli.data import batches, load_table
from deltacli.errors import DeltacliError
from deltacli.models import config_labels, load_config, load_model, load_tokenizer
from deltacli.runtime import make_accelerator
from deltacli.settings import DataConfig
from deltacli.store import read_delta
from deltacli.tasks import DEFAULT, Task
from deltacli.tasks import task as task_entry


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: DataLoader,
    accelerator: Accelerator,
    task: Task,
    labels: list | None = None,
) -> dict[str, float]:
    """The task's metrics over every example, gathered from all processes (duplicates that
    pad the last batch across processes are dropped); `labels` names the classes."""
    was_training = model.training
    model.eval()
    try:
        return task.score(model, batches, accelerator, labels)
    finally:
        model.train(was_training)


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
    task: str | None = None,
) -> dict[str, float]:
    """Score base model + the delta in `folder` (deltacli's or PEFT's) on `data`.

    `columns` overrides the saved recipe's column names; `task` the delta's task (for a PEFT
    adapter saved without one, the base model's config decides otherwise). For generative
    tasks, `generation` also asks for generations, written beside their references to a
    JSONL file and scored.
    """
    saved = read_delta(folder, model, task)
    recipe = saved.recipe
    data_config = _with_columns(recipe.data, columns)
    tokenizer = load_tokenizer(recipe.model)
    task = recipe.task_entry
    table = load_table(data, data_config.hub_config)
    encoded, labels = task.for_scoring(table, data_config, tokenizer, data)
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(data_config, labels=labels))
    gpu = torch.cuda.is_available()
    accelerator = make_accelerator(mixed_precision=compute_precision(recipe, gpu))
    base, deltas = prepare_model(recipe, device=accelerator.device)
    saved.load_into(deltas)
    metrics = _score(base, tokenizer, encoded, batch_size, task, accelerator, labels)
    if generation is not None:
        if task.prompts is None:
            raise DeltacliError(f"--generate needs a generative task; this delta is {task.name}")
        unpacked = dataclasses.replace(data_config, packing=False)
        metrics |= generation.run(base, tokenizer, task.prompts(table, unpacked, tokenizer))
    return metrics


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
    task: str = DEFAULT,
    tokenizer_from: str | None = None,
) -> dict[str, float]:
    """Score a whole model directory (e.g. a fully fine-tuned or merged one) on `data`, with
    the label mapping its config carries (and another model's tokenizer, if it has none)."""
    config = load_config(folder)
    labels = config_labels(config)
    data_config = _with_columns(DataConfig(labels=labels), columns)
    tokenizer = load_tokenizer(tokenizer_from or folder)
    entry = task_entry(task)
    encoded, _ = entry.for_scoring(
        load_table(data, data_config.hub_config), data_config, tokenizer, data
    )
    accelerator = make_accelerator()
    model = load_model(folder, task, labels)
    return _score(model, tokenizer, encoded, batch_size, entry, accelerator, labels)


def _with_columns(config: DataConfig, columns: dict[str, str | None] | None) -> DataConfig:
    return dataclasses.replace(config, **{k: v for k, v in (columns or {}).items() if v})


def _score(
    model: nn.Module,
    tokenizer,
    table,
    batch_size: int,
    task: Task,
    accelerator: Accelerator,
    labels: list | None,
) -> dict[str, float]:
    loader = batches(table, task.collate(tokenizer, table), batch_size, False)
    model, loader = accelerator.prepare(model, loader)
    return evaluate(model, loader, accelerator, task, labels)
