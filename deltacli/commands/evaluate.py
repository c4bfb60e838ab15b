"""Scoring base model + delta, or a whole model: batch inference under accelerate, the
task's metrics, and generations beside their references."""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from deltacli.config.sections import DataConfig, TrainConfig
from deltacli.errors import DeltacliError
from deltacli.models.loading import config_labels, load_config, load_model, load_tokenizer
from deltacli.recipe import Recipe
from deltacli.storage.delta_folder import read_delta
from deltacli.tasks.evaluation import evaluate, generate, generation_metrics
from deltacli.tasks.preference import PreferenceLoss
from deltacli.tasks.registry import DEFAULT, Task
from deltacli.tasks.registry import task as task_entry
from deltacli.tasks.tables import TaskData, batches, load_sources
from deltacli.training.preference import with_reference
from deltacli.training.runtime import make_accelerator
from deltacli.training.session import open_session


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
    recipe = dataclasses.replace(saved.recipe, data=_with_columns(saved.recipe.data, columns))
    table = load_sources(data, recipe.data.hub_config, recipe.train.seed)
    session = open_session(recipe, data=partial(_scored, table, data))
    scored = session.data.eval
    if PreferenceLoss.from_train(recipe.train).needs_reference and session.task.pairs:
        # The reference is the base: scored before the delta is loaded into it.
        session.deltas.hold_reference()
        collate = session.task.collate(session.tokenizer, scored)
        scored = with_reference(session.model, session.deltas, scored, collate, batch_size,
                                session.accelerator)  # fmt: skip
        session.deltas.release_reference()
    saved.load_into(session.deltas)
    metrics = _score(session.model, session.tokenizer, scored, batch_size, session.task,
                     session.accelerator, session.data.labels, recipe.train)  # fmt: skip
    if generation is not None:
        task = session.task
        if task.prompts is None:
            raise DeltacliError(f"--generate needs a generative task; this delta is {task.name}")
        unpacked = dataclasses.replace(session.recipe.data, packing=False)
        pairs = task.prompts(table, unpacked, session.tokenizer)
        metrics |= generation.run(session.model, session.tokenizer, pairs)
    return metrics


def _scored(table, source: str, recipe: Recipe, tokenizer) -> TaskData:
    """The table to score, encoded as the delta's task encodes it, as eval data (nothing
    trains); its labels are the data's, mapped as the delta's recipe maps them."""
    encoded, labels = recipe.task_entry.for_scoring(table, recipe.data, tokenizer, source)
    return TaskData(train=encoded.select([]), eval=encoded, labels=labels)


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
        load_sources(data, data_config.hub_config, 0), data_config, tokenizer, data
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
    train: TrainConfig | None = None,
) -> dict[str, float]:
    loader = batches(table, task.collate(tokenizer, table), batch_size, False)
    model, loader = accelerator.prepare(model, loader)
    return evaluate(model, loader, accelerator, task, labels, train)
