"""One set-up for every command that runs a recipe's model on data — train, eval, SIFT's
masks from gradients, the subspace fit: the config read once, the dtype decided once, then
accelerator, seed, tokenizer, data, labels, and the model with its deltas, in that order.

The order matters: the labels come from the data, and they size the head the model is built
with; a target that matches nothing fails on the meta device before any of it is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from deltacli.build import check_attaches, decide_precision, prepare_model
from deltacli.deltas import DeltaSet
from deltacli.models.loading import load_config, load_tokenizer, with_labels
from deltacli.recipe import Recipe
from deltacli.tasks.registry import Task
from deltacli.tasks.tables import TaskData, batches
from deltacli.training.runtime import make_accelerator

# What a command trains or scores on: the recipe's own data by default.
DataSource = Callable[[Recipe, PreTrainedTokenizerBase], TaskData]


def recipe_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    """The recipe's train and eval data, encoded for its task."""
    train = recipe.train
    return recipe.task_entry.load_data(recipe.data, tokenizer, train.seed, train.mask_prompt)


@dataclasses.dataclass
class Session:
    """A recipe's model on its data, ready to train or score."""

    recipe: Recipe  # with the data's labels
    task: Task
    tokenizer: PreTrainedTokenizerBase
    data: TaskData
    accelerator: Accelerator
    model: nn.Module
    deltas: DeltaSet

    def batches(self, table: Any, batch_size: int, shuffle: bool = False) -> DataLoader:
        """Batches of one of the data's tables, padded by the task's collator (shuffled
        with the recipe's seed)."""
        collate = self.task.collate(self.tokenizer, table)
        return batches(table, collate, batch_size, shuffle, self.recipe.train.seed)


def open_session(
    recipe: Recipe,
    data: DataSource = recipe_data,
    before_model: Callable[[Recipe, TaskData], None] | None = None,
    **accelerator_options: Any,
) -> Session:
    """Set up `recipe` for a run; `before_model` checks the data before the weights are
    read; `accelerator_options` go to accelerate's `Accelerator` (gradient accumulation,
    trackers)."""
    config = load_config(recipe.model)
    check_attaches(recipe, config)
    gpu = torch.cuda.is_available() and not recipe.train.cpu
    stored, autocast = decide_precision(recipe, config, gpu)
    accelerator = make_accelerator(
        cpu=recipe.train.cpu, mixed_precision=autocast, **accelerator_options
    )
    set_seed(recipe.train.seed)
    tokenizer = load_tokenizer(recipe.model)
    loaded = data(recipe, tokenizer)
    if before_model is not None:
        before_model(recipe, loaded)
    labels = loaded.labels if loaded.labels is not None else recipe.data.labels
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, labels=labels))
    model, deltas = prepare_model(
        recipe, device=accelerator.device, stored=stored, config=with_labels(config, labels)
    )
    return Session(recipe, recipe.task_entry, tokenizer, loaded, accelerator, model, deltas)
