"""The data and training sections of a recipe, as validated dataclasses.

They live apart from `recipe.py` because the code that reads data and trains takes them
without needing the rest of a recipe (its deltas, its task).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from deltacli.config.schema import (
    AT_LEAST_ONE,
    FRACTION,
    NOT_NEGATIVE,
    POSITIVE,
    Range,
    check_ranges,
    option,
)
from deltacli.errors import DeltacliError


@dataclasses.dataclass
class Source:
    """One of several data sources mixed into one table (`data.train: [a.jsonl, {...}]`)."""

    path: str = option("", "a csv/tsv/json/jsonl/parquet file, a bundled sample or Hub NAME")
    weight: float = option(
        1.0, "how much of the source the mix takes: 2 = every row twice, 0.5 = a seeded half",
        POSITIVE,
    )  # fmt: skip
    rows: int | None = option(None, "the first N rows only (before the weight)", AT_LEAST_ONE)
    columns: dict[str, str] = option(
        {}, "renames this source's columns to the recipe's: {review: sentence, dialog: "
        "conversations}",
    )  # fmt: skip


# A data setting: one source as a plain string, or several (strings or `Source` mappings).
Sources = str | list[str | Source]


def source_list(sources: Sources) -> list[Source]:
    """Every source of a data setting as a `Source`."""
    items = [sources] if isinstance(sources, str) else sources
    return [Source(path=s) if isinstance(s, str) else s for s in items]


def sources_name(sources: Sources | None) -> str:
    """How messages and the model card name a data setting: `a.jsonl + b.jsonl (×2)`."""
    if sources is None or isinstance(sources, str):
        return str(sources)
    return " + ".join(
        s.path + (f" (×{s.weight:g})" if s.weight != 1 else "") for s in source_list(sources)
    )


@dataclasses.dataclass
class DataConfig:
    train: Sources = option(
        "sst2:train",
        "training data: a csv/tsv/json/jsonl/parquet file, a bundled sample (sst2:train), a "
        "Hub dataset NAME[:SPLIT], or a list of such sources to mix, each a name or "
        "{path, weight, rows, columns}",
    )
    eval: Sources | None = option(
        "sst2:validation", "evaluation data, same forms; null: hold out eval_fraction of train"
    )
    eval_fraction: float = option(
        0.1, "share of train held out for evaluation when eval is null", Range(0, 1, True, True)
    )
    hub_config: str | None = option(None, "configuration name of a Hub dataset (e.g. sst2)")
    text: str = option("sentence", "column holding the text (seq2seq: the source)")
    text_pair: str | None = option(None, "column holding the second text of sentence pairs")
    label: str = option("label", "column holding the label")
    target: str = option("target", "seq2seq: column holding the target text")
    format: Literal["auto", "alpaca", "chat", "text"] = option(
        "auto",
        "causal-lm records: alpaca, chat (OpenAI messages or ShareGPT conversations) or "
        "text; auto: from the columns",
    )
    train_on: Literal["all_assistant", "last_assistant"] = option(
        "all_assistant",
        "chat records: the loss sees every assistant turn, or only each conversation's last",
    )
    packing: bool = option(False, "causal-lm: pack examples into rows of max_length tokens")
    labels: list[int | str] | None = option(
        None, "label values in id order; null: the sorted values found in the training data"
    )
    max_length: int = option(128, "tokens per example; longer examples are truncated", AT_LEAST_ONE)
    max_train_rows: int | None = option(
        None, "train on the first N rows only; null: all", AT_LEAST_ONE
    )

    def __post_init__(self) -> None:
        check_ranges(self, "data.")
        for key in ("train", "eval"):
            value = getattr(self, key)
            if value is None or isinstance(value, str):
                continue
            if not value:
                raise DeltacliError(f"data.{key} is an empty list; give at least one source")
            for i, source in enumerate(source_list(value)):
                if not source.path:
                    raise DeltacliError(f"data.{key}.{i} needs a path")
                check_ranges(source, f"data.{key}.{i}.")


@dataclasses.dataclass
class TrainConfig:
    epochs: float = option(3.0, "passes over the training data", POSITIVE)
    max_steps: int | None = option(
        None, "stop after this many optimizer steps; null: epochs", AT_LEAST_ONE
    )
    batch_size: int = option(32, "examples per step and process, before accumulation", POSITIVE)
    eval_batch_size: int = option(64, "examples per evaluation batch", POSITIVE)
    grad_accum: int = option(1, "batches whose gradients add up to one optimizer step", POSITIVE)
    lr: float = option(5.0e-4, "peak learning rate of AdamW", POSITIVE)
    weight_decay: float = option(0.01, "AdamW weight decay, applied to matrices only", NOT_NEGATIVE)
    warmup_ratio: float = option(
        0.06, "share of steps spent warming the learning rate up", FRACTION
    )
    max_grad_norm: float | None = option(
        1.0, "clip the gradient norm to this; null: no clipping", POSITIVE
    )
    seed: int = option(42, "seed for initialisation, shuffling and dropout")
    log_every: int = option(
        10,
        "optimizer steps between lines of metrics.jsonl (and progress lines, off a terminal)",
        POSITIVE,
    )
    keep_best: bool = option(True, "save the epoch with the best eval metric, not the last")
    save_every: int | None = option(
        None,
        "write a resumable checkpoint every N optimizer steps; null: at each epoch's end",
        AT_LEAST_ONE,
    )
    keep_checkpoints: int = option(1, "how many of the newest checkpoints to keep", AT_LEAST_ONE)
    best_metric: str = option(
        "auto",
        "metric that picks the best epoch (one the task reports); auto: the task's own "
        "(accuracy for classification, loss for generation)",
    )
    mask_prompt: bool = option(True, "causal-lm: the loss sees only the responses")
    gradient_checkpointing: bool = option(False, "recompute activations to save memory")
    fused_loss: bool = option(
        True,
        "causal-lm: run the output layer and cross-entropy a chunk of tokens at a time on the "
        "tokens the loss counts, never holding all the logits, tokens × vocabulary (same loss, "
        "less memory); false: the model's own head and one cross-entropy",
    )
    loss_kernel: Literal["chunked", "liger"] = option(
        "chunked",
        "with fused_loss: chunked (PyTorch, any device) or liger (liger-kernel's fused linear "
        "cross-entropy, Triton on a GPU: pip install 'deltacli[liger]')",
    )
    fused_adamw: bool = option(
        True,
        "update the deltas with torch's fused AdamW (one kernel per group) where the device has "
        "it; false: the multi-tensor AdamW",
    )
    compile: bool = option(
        False,
        "torch.compile each transformer layer with its deltas inside (compiled once, shared "
        "by every layer); costs compile time at the start, off until measured faster",
    )
    preview: int = option(
        0, "generative tasks: show this many eval generations before/after", NOT_NEGATIVE
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "autocast precision passed to accelerate (GPU; the CPU runs fp32)"
    )
    cpu: bool = option(False, "train on the CPU even where an accelerator is present")
    loss: Literal["auto", "dpo", "ipo", "simpo", "orpo"] = option(
        "auto",
        "preference: dpo (sigmoid), ipo, simpo (no reference) or orpo (SFT + odds ratio, no "
        "reference); auto: dpo for preference, the task's own loss otherwise",
    )
    beta: float | None = option(
        None,
        "preference: β, the strength of the loss (DPO's KL weight); null: dpo/ipo/orpo 0.1, "
        "simpo 2.0",
        POSITIVE,
    )
    simpo_gamma: float = option(0.5, "simpo: the target reward margin γ", NOT_NEGATIVE)
    sft_weight: float = option(
        0.0,
        "dpo/ipo/simpo: add this times the chosen answer's mean NLL (RPO, Pang et al. 2024; "
        "TRL's rpo_alpha), which keeps the chosen answer likely; orpo has its own",
        NOT_NEGATIVE,
    )
    label_smoothing: float = option(
        0.0,
        "dpo/simpo: the share of pairs assumed mislabelled (conservative DPO, cDPO)",
        Range(0, 0.5, False, True),
    )
    reference: Literal["base", "precomputed"] = option(
        "base",
        "dpo/ipo: the reference is the base (the deltas switched off), run beside each step; "
        "precomputed: its log-probabilities computed once before training instead",
    )
    report_to: list[str] = option(
        [],
        "experiment trackers accelerate logs to, e.g. [tensorboard] or [wandb, mlflow] (each "
        "must be installed); the same figures as metrics.jsonl, under the run's trackers/",
    )

    def __post_init__(self) -> None:
        check_ranges(self, "train.")
