"""The task registry: what a model learns to do, and everything that follows from it.

A recipe names its task (`task: causal-lm`); every module that must act differently per task
asks the task's entry here instead of testing its name: which transformers class to build,
PEFT's `task_type`, how examples are encoded and padded, how a model is scored, and which
metrics can pick the best epoch. Adding a task is one entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerBase,
)

from deltacli.config.sections import DataConfig
from deltacli.errors import DeltacliError, did_you_mean
from deltacli.tasks.classification import classes_for_scoring, pad_classes, prepare_classes
from deltacli.tasks.generation import (
    causal_prompts,
    encode_causal,
    encode_seq2seq,
    pad_tokens,
    prepare_tokens,
    seq2seq_prompts,
    tokens_for_scoring,
)
from deltacli.tasks.losses import class_loss, class_units, token_loss, token_units
from deltacli.tasks.preference import (
    pad_pairs,
    pair_prompts,
    pair_units,
    pairs_for_scoring,
    prepare_pairs,
    score_options,
    score_pairs,
)
from deltacli.tasks.scoring import score_classes, score_tokens
from deltacli.tasks.tables import TaskData, load_tables


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    model_class: type  # the transformers Auto class that builds the model
    peft_task_type: str  # PEFT's `task_type`
    architectures: tuple[str, ...]  # endings of `config.architectures` names that mean it
    metrics: tuple[str, ...]  # what `train.best_metric` may name; the first is the default
    generative: bool  # learns token sequences (a cache, generation) rather than labels
    prepare: Callable  # (train, eval, data config, tokenizer, mask_prompt) -> TaskData
    for_scoring: Callable  # (table, data config, tokenizer, source) -> (encoded, labels)
    collate: Callable  # (tokenizer, encoded table) -> collator
    score: Callable  # (model, batches, accelerator, label names) -> metrics
    loss: Callable | None  # (logits, labels) -> the summed training loss; None: pairs
    units: Callable  # (one example's labels) -> how many terms it adds to the loss
    labels_in_forward: bool  # the model needs the labels to run (seq2seq: decoder inputs)
    prompts: Callable | None = None  # (table, data config, tokenizer) -> (prompt, reference)
    units_column: str = "labels"  # the encoded column `units` reads
    # Learns from pairs of answers: the trainer's preference step (with its reference pass)
    # computes the loss, as `train.loss` says.
    pairs: bool = False
    score_options: Callable = lambda train: {}  # (train config) -> what `score` needs too

    def load_data(
        self,
        config: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        mask_prompt: bool = True,
    ) -> TaskData:
        """Everything training needs from a recipe's data section, encoded for this task."""
        train, evaluation = load_tables(config, seed)
        return self.prepare(train, evaluation, config, tokenizer, mask_prompt)


CLASSIFICATION = Task(
    name="sequence-classification",
    model_class=AutoModelForSequenceClassification,
    peft_task_type="SEQ_CLS",
    architectures=("ForSequenceClassification",),
    metrics=("accuracy", "f1", "macro_f1", "weighted_f1", "mcc", "loss"),
    generative=False,
    prepare=prepare_classes,
    for_scoring=classes_for_scoring,
    collate=pad_classes,
    score=score_classes,
    loss=class_loss,
    units=class_units,
    labels_in_forward=False,
)
CAUSAL_LM = Task(
    name="causal-lm",
    model_class=AutoModelForCausalLM,
    peft_task_type="CAUSAL_LM",
    architectures=("ForCausalLM", "LMHeadModel"),
    metrics=("loss",),
    generative=True,
    prepare=partial(prepare_tokens, encode=encode_causal, prompts=causal_prompts),
    for_scoring=partial(tokens_for_scoring, encode=encode_causal),
    collate=pad_tokens,
    score=partial(score_tokens, shift=True),
    score_options=lambda train: {"chunked": train.fused_loss},
    loss=partial(token_loss, shift=True),
    units=partial(token_units, shift=True),
    labels_in_forward=False,
    prompts=causal_prompts,
)
SEQ2SEQ = Task(
    name="seq2seq",
    model_class=AutoModelForSeq2SeqLM,
    peft_task_type="SEQ_2_SEQ_LM",
    architectures=("ForConditionalGeneration",),
    metrics=("loss",),
    generative=True,
    prepare=partial(prepare_tokens, encode=encode_seq2seq, prompts=seq2seq_prompts),
    for_scoring=partial(tokens_for_scoring, encode=encode_seq2seq),
    collate=pad_tokens,
    score=partial(score_tokens, shift=False),
    loss=partial(token_loss, shift=False),
    units=partial(token_units, shift=False),
    labels_in_forward=True,
    prompts=seq2seq_prompts,
)
PREFERENCE = Task(
    name="preference",
    model_class=AutoModelForCausalLM,
    peft_task_type="CAUSAL_LM",
    architectures=("ForCausalLM", "LMHeadModel"),
    metrics=("reward_accuracy", "reward_margin", "loss"),
    generative=True,
    prepare=prepare_pairs,
    for_scoring=pairs_for_scoring,
    collate=pad_pairs,
    score=score_pairs,
    loss=None,
    units=pair_units,
    labels_in_forward=False,
    prompts=pair_prompts,
    units_column="chosen_labels",
    pairs=True,
    score_options=score_options,
)
# Order matters where two tasks build the same class: a saved config or PEFT's task_type
# means the first (causal-lm, not preference).
TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, CAUSAL_LM, SEQ2SEQ, PREFERENCE)}
DEFAULT = CLASSIFICATION.name


def task(name: str) -> Task:
    """The entry of task `name`, or a clear error listing the tasks there are."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise DeltacliError(
            f"task must be one of {', '.join(TASKS)}; got {name!r}"
            f"{did_you_mean(str(name), list(TASKS))}"
        ) from None


def by_peft_type(task_type: str | None) -> Task | None:
    """The task PEFT calls `task_type`, or None (PEFT's own default, `task_type: null`)."""
    return next((t for t in TASKS.values() if t.peft_task_type == task_type), None)


def inferred(config: transformers.PretrainedConfig) -> str | None:
    """The task a model's config was saved for (`LlamaForCausalLM` -> causal-lm), if any."""
    for architecture in getattr(config, "architectures", None) or []:
        for entry in TASKS.values():
            if architecture.endswith(entry.architectures):
                return entry.name
    return None
