"""The evaluation loop every command shares: a task's metrics over batches (all processes
gathered), greedy or sampled generations, and the scores of generations against
references."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from deltacli.config.sections import TrainConfig
from deltacli.errors import DeltacliError
from deltacli.tasks.registry import Task


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: DataLoader,
    accelerator: Accelerator,
    task: Task,
    labels: list | None = None,
    train: TrainConfig | None = None,
) -> dict[str, float]:
    """The task's metrics over every example, gathered from all processes (duplicates that
    pad the last batch across processes are dropped); `labels` names the classes, `train`
    the recipe's settings some scores depend on (a preference loss's β)."""
    was_training = model.training
    model.eval()
    try:
        options = task.score_options(train or TrainConfig())
        return task.score(model, batches, accelerator, labels, **options)
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
