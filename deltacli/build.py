"""A recipe's model with its deltas attached: the one place train, eval and inspect get it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from deltacli.deltas import DeltaSet, attach
from deltacli.deltas.specify import ModulesConfig
from deltacli.errors import DeltacliError
from deltacli.models.loading import (
    build_on_meta,
    checkpoint_dtype,
    head_modules,
    load_model,
    resolve,
)
from deltacli.models.precision import mixed_precision, stored_dtype
from deltacli.recipe import Recipe
from deltacli.storage.delta_folder import SavedDelta, read_delta, write_delta
from deltacli.storage.peft_format import peft_config


def attach_recipe(model: nn.Module, recipe: Recipe) -> DeltaSet:
    """Attach the recipe's deltas, and unfreeze the task head when `recipe.head` asks."""
    head_names = head_modules(model) if recipe.head else []
    head = ModulesConfig(targets=head_names) if head_names else None
    return attach(model, recipe.deltas, head)


def prepare_model(
    recipe: Recipe,
    meta: bool = False,
    device: torch.device | None = None,
    stored: torch.dtype | None = None,
    config: PretrainedConfig | None = None,
) -> tuple[nn.Module, DeltaSet]:
    """The recipe's base model (real weights, or shapes only on the meta device) with its
    deltas attached. `recipe.data.labels` sizes the head; `device` is where it will run,
    which decides `base_dtype: auto` and where a quantised base is placed, unless the
    caller decided the dtype already (`stored`) and read the config (`config`)."""
    if meta:
        model = build_on_meta(recipe.model, recipe.task, recipe.data.labels, recipe.base_dtype)
    else:
        model = load_model(
            recipe.model,
            recipe.task,
            recipe.data.labels,
            recipe.base_dtype,
            recipe.quantize,
            device,
            attention=recipe.attention,
            stored=stored,
            config=config,
        )
    return model, attach_recipe(model, recipe)


def decide_precision(
    recipe: Recipe, config: PretrainedConfig, gpu: bool
) -> tuple[torch.dtype, str]:
    """Once per run: the dtype the frozen base is held in, and accelerate's
    `mixed_precision` (the recipe's own, or autocast in the base's half precision, so that
    float32 deltas meet a bf16 or quantised base in one type)."""
    stored = stored_dtype(recipe.base_dtype, recipe.quantize, checkpoint_dtype(config), gpu)
    return stored, mixed_precision(recipe.train.mixed_precision, stored, gpu)


def save_values(
    folder: Path,
    recipe: Recipe,
    values: dict[str, torch.Tensor],
    metrics: dict | None,
    home: Path | None = None,
) -> None:
    """A delta directory for `recipe` from its tensors by parameter name (a sparsified or a
    decoded delta), keyed the way its kinds key them (attached on the meta device), with
    PEFT's config where PEFT has the method: it loads like a trained one."""
    _, deltas = prepare_model(recipe, meta=True)
    keys = deltas.keys()
    if set(keys) != set(values):
        different = sorted(set(keys) ^ set(values))
        raise DeltacliError(f"the tensors do not fit the recipe's deltas ({different[0]})")
    peft = peft_config(deltas, recipe.task, resolve(recipe.model))
    tensors = {keys[name]: value for name, value in values.items()}
    write_delta(folder, recipe, tensors, metrics, peft, home)


def start_from_saved(deltas: DeltaSet, recipe: Recipe, notice: Callable[[str], None]) -> None:
    """`deltas.N.init_from`: each such delta starts from the saved delta's tensors of its
    kind (same base, same targets and sizes, or one line saying what differs). The task
    head comes along where it was trained for the same labels; otherwise it starts fresh,
    and says so."""
    for index, (config, delta) in enumerate(zip(recipe.deltas, deltas.deltas, strict=True)):
        if not config.init_from:
            continue
        where = f"deltas.{index}.init_from"
        source = read_delta(Path(config.init_from))
        kinds = [c.kind for c in source.recipe.deltas]
        if delta.kind not in kinds:
            raise DeltacliError(
                f"{where}: {config.init_from} holds {' + '.join(kinds)}, not a {delta.kind} "
                "delta; start from a delta of the same kind"
            )
        expected = delta.export()[1]
        values = {}
        for name, tensor in expected.items():
            key = delta.peft_key(name)
            saved = source.tensors.get(key)
            if saved is None or saved.shape != tensor.shape:
                found = "no such tensor" if saved is None else f"shape {tuple(saved.shape)}"
                raise DeltacliError(
                    f"{where}: {config.init_from} does not fit this {delta.kind} delta ({key}: "
                    f"{found}, expected {tuple(tensor.shape)}); same base, targets and sizes?"
                )
            values[name] = saved
        delta.load(values)
        if deltas.head is not None:
            _head_from(deltas, source, recipe, notice, where)


def _head_from(
    deltas: DeltaSet, source: SavedDelta, recipe: Recipe, notice: Callable[[str], None], where: str
) -> None:
    head = deltas.head
    every = deltas.keys()
    keys = {name: every[name] for name in head.saved_names()}
    fits = source.recipe.data.labels == recipe.data.labels and all(
        key in source.tensors and source.tensors[key].shape == head.params[name].shape
        for name, key in keys.items()
    )
    if not fits:
        notice(
            f"{where}: the task head starts fresh (it was trained for labels "
            f"{source.recipe.data.labels}; this run has {recipe.data.labels})"
        )
        return
    head.load({name: source.tensors[key] for name, key in keys.items()})


def check_attaches(recipe: Recipe, config: PretrainedConfig | None = None) -> None:
    """Attach the recipe's deltas to its model on the meta device: a target that matches
    nothing fails in a second, before any data is tokenised or weight read."""
    model = build_on_meta(recipe.model, recipe.task, None, recipe.base_dtype, config=config)
    attach_recipe(model, recipe)


def resolved_recipe(saved: SavedDelta) -> Recipe:
    """The saved delta's recipe with its labels known.

    PEFT adapters carry no label names; the saved head's output rows say how many labels the
    model has, so a 3-way classifier is rebuilt as one."""
    if saved.recipe.data.labels is not None or saved.recipe.task_entry.generative:
        return saved.recipe
    model, deltas = prepare_model(saved.recipe, meta=True)
    if deltas.head is None:
        return saved.recipe
    keys = deltas.keys()
    rows = {
        saved.tensors[keys[name]].shape[0]
        for name, param in deltas.head.params.items()
        if param.ndim == 2
        and param.shape[0] == model.config.num_labels
        and keys[name] in saved.tensors
    }
    if len(rows) != 1:
        return saved.recipe
    labels = list(range(rows.pop()))
    return dataclasses.replace(
        saved.recipe, data=dataclasses.replace(saved.recipe.data, labels=labels)
    )


def saved_on_meta(saved: SavedDelta) -> tuple[nn.Module, DeltaSet]:
    """The saved delta's model with its deltas attached, on the meta device."""
    return prepare_model(resolved_recipe(saved), meta=True)


def _count(param: torch.Tensor) -> int:
    """Parameters a tensor holds: bitsandbytes packs two 4-bit weights in each byte of its
    storage (PEFT counts them the same way)."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def parameter_counts(model: nn.Module) -> dict:
    """Total and trainable parameters, counted as PEFT's `get_nb_trainable_parameters` does."""
    total = sum(_count(p) for p in model.parameters())
    trainable = sum(_count(p) for p in model.parameters() if p.requires_grad)
    return {
        "total": total,
        "trainable": trainable,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
    }
