"""Delta directories on disk: atomic writes, and reading deltacli's or PEFT's layout.

```
out/
  adapter_config.json        PEFT's schema, where PEFT has the method
  adapter_model.safetensors  tensors under PEFT's key names
  recipe.yaml                the fully resolved recipe (always)
  metrics.json               final figures, versions;  metrics.jsonl: the training log
```
Nothing is ever pickled: tensors are safetensors, the rest YAML and JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from deltacli.deltas import DeltaSet
from deltacli.errors import DeltacliError
from deltacli.files.tensors import load_tensors, save_tensors
from deltacli.files.text import read_mapping
from deltacli.models.loading import saved_task
from deltacli.recipe import Recipe, dump_recipe, parse_recipe
from deltacli.storage.card import CARD_FILE, model_card
from deltacli.storage.peft_format import peft_config, recipe_from_peft
from deltacli.tasks.registry import DEFAULT

WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
INITIAL_FILE = "initial.safetensors"  # the delta before training (same keys)
LOG_FILE = "metrics.jsonl"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def save_delta(
    folder: Path | None,
    deltas: DeltaSet,
    recipe: Recipe,
    base_model: str,
    metrics: dict | None,
    home: Path | None = None,
) -> None:
    """Write the delta's tensors, PEFT config (where PEFT has the method), recipe and metrics.

    The recipe is saved with the configs the deltas export (a prefix trained through an MLP
    is saved folded, as a plain prefix). Under FSDP every process calls this (the tensors
    are gathered from all of them) and only the one given a `folder` writes."""
    configs, tensors = deltas.export()
    if folder is None:
        return
    peft = peft_config(deltas, recipe.task, base_model)
    saved = dataclasses.replace(recipe, deltas=configs)
    write_delta(folder, saved, tensors, metrics, peft, home)


def write_delta(
    folder: Path,
    recipe: Recipe,
    tensors: dict[str, torch.Tensor],
    metrics: dict | None,
    peft: dict | None = None,
    home: Path | None = None,
) -> None:
    """The files of a delta directory, from its recipe and its tensors by file key; `home`
    is where the folder will live, for the model card's snippets."""
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
    save_tensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    if peft is not None:
        write_json(folder / PEFT_CONFIG_FILE, peft)
    (folder / RECIPE_FILE).write_text(dump_recipe(recipe), encoding="utf-8")
    if metrics is not None:
        write_json(folder / METRICS_FILE, metrics)
    (folder / CARD_FILE).write_text(model_card(recipe, metrics, peft, home), encoding="utf-8")


def write_initial(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The delta's tensors before training, beside the trained ones."""
    if tensors:
        contiguous = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
        save_tensors(contiguous, folder / INITIAL_FILE, metadata={"format": "pt"})


@dataclasses.dataclass
class SavedDelta:
    """A delta directory as read: its recipe, its tensors (by file key) and its metrics."""

    folder: Path
    recipe: Recipe
    tensors: dict
    metrics: dict
    source: str  # "deltacli" or "peft"
    problems: list[str] = dataclasses.field(default_factory=list)  # what could not be read

    def values_for(self, deltas: DeltaSet) -> dict[str, torch.Tensor]:
        """The saved tensors by name for `deltas` (attached from this recipe), refusing
        missing, unexpected or mis-shaped ones."""
        keys = deltas.keys()
        shapes = {key: t.shape for key, t in deltas.export()[1].items()}
        missing = sorted(name for name, key in keys.items() if key not in self.tensors)
        unexpected = sorted(set(self.tensors) - set(keys.values()))
        if missing or unexpected:
            detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise DeltacliError(
                f"{self.folder} does not fit this model ({detail}); was it trained on "
                "another base model?"
            )
        for key, shape in shapes.items():
            if self.tensors[key].shape != shape:
                raise DeltacliError(
                    f"{self.folder}: tensor {key} has shape {tuple(self.tensors[key].shape)} "
                    f"but the model expects {tuple(shape)}; was it trained on another base model?"
                )
        return {name: self.tensors[key] for name, key in keys.items()}

    def initial(self) -> dict[str, torch.Tensor]:
        """The tensors the delta started from (by file key), where its run kept them."""
        path = self.folder / INITIAL_FILE
        if not path.is_file():
            raise DeltacliError(
                f"{self.folder} holds no {INITIAL_FILE} (deltacli keeps a delta's starting "
                "values since this version): train it again to use it here"
            )
        return load_tensors(path)

    def load_into(self, deltas: DeltaSet) -> None:
        """Put the saved tensors into `deltas`, attached from this very recipe."""
        deltas.load_saved(self.values_for(deltas))


def is_delta_dir(folder: Path) -> bool:
    """Whether `folder` looks like a saved delta rather than a model."""
    return (folder / RECIPE_FILE).is_file() or (folder / PEFT_CONFIG_FILE).is_file()


def read_delta(folder: Path, model: str | None = None, task: str | None = None) -> SavedDelta:
    """Read a deltacli delta (recipe.yaml) or a PEFT adapter (adapter_config.json).

    `model` replaces the base model the delta names (e.g. a local copy of it). A PEFT adapter
    saved without a `task_type` (PEFT's own default) gets `task`, or the one the base
    model's config was saved for. A damaged `metrics.json` only costs the figures: they are
    reported missing in `problems`, the delta still loads.
    """
    if not folder.is_dir():
        raise DeltacliError(f"delta directory {folder} does not exist")
    tensors = _read_tensors(folder)
    if (folder / RECIPE_FILE).is_file():
        raw, source = read_mapping(folder / RECIPE_FILE, "a recipe"), "deltacli"
        if (folder / PEFT_CONFIG_FILE).is_file():
            # deltacli reads the recipe, but PEFT reads this: a damaged one is not ignored.
            try:
                read_mapping(folder / PEFT_CONFIG_FILE, "PEFT's adapter config")
            except DeltacliError as error:
                raise DeltacliError(
                    f"{error}; PEFT cannot load this delta: restore the file, or delete it to "
                    "use the delta with deltacli only"
                ) from None
    elif (folder / PEFT_CONFIG_FILE).is_file():
        config = read_mapping(folder / PEFT_CONFIG_FILE, "PEFT's adapter config")
        raw, source = recipe_from_peft(config, tensors), "peft"
    else:
        raise DeltacliError(
            f"{folder} is neither a deltacli delta ({RECIPE_FILE}) nor a PEFT adapter "
            f"({PEFT_CONFIG_FILE})"
        )
    if model is not None:
        raw["model"] = model
    if task is not None or "task" not in raw:
        raw["task"] = task or _task_of(raw["model"])
    metrics, problems = {}, []
    if (folder / METRICS_FILE).is_file():
        try:
            metrics = read_mapping(folder / METRICS_FILE, "training figures")
        except DeltacliError as error:
            problems.append(str(error))
    return SavedDelta(folder, parse_recipe(raw), tensors, metrics, source, problems)


def _task_of(model: str) -> str:
    """The task the base model's config names, or the default where it names none (or
    cannot be read here: whatever loads the model then says why)."""
    try:
        return saved_task(model) or DEFAULT
    except DeltacliError:
        return DEFAULT


def _read_tensors(folder: Path) -> dict:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        hint = " (only a pickled adapter_model.bin, which deltacli never loads)" if pickled else ""
        raise DeltacliError(f"{folder} has no {WEIGHTS_FILE}{hint}")
    tensors = load_tensors(path)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise DeltacliError(
                f"{path}: tensor {key} holds {bad:,} NaN or infinite value(s); the delta is "
                "damaged (or its training diverged) and cannot be used"
            )
    return tensors
