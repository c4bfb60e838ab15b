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

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltacli.deltas import DeltaSet
from deltacli.errors import DeltacliError
from deltacli.peft_format import peft_config, recipe_from_peft
from deltacli.recipe import Recipe, dump_recipe, parse_recipe

WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
LOG_FILE = "metrics.jsonl"


def check_output(target: Path, overwrite: bool) -> None:
    """Fail before any work if `target` exists and may not be replaced."""
    if target.exists() and not overwrite:
        raise DeltacliError(f"output directory {target} exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise DeltacliError(f"output {target} exists and is not a directory")


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill; rename it into place only on success.

    A crash or Ctrl-C leaves at most a hidden `.NAME.tmp-*` folder, never a `target` that
    looks complete; an old `target` is replaced only once the new one is whole.
    """
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    scratch = target.parent / f".{target.name}.tmp-{tag}"
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    _default_permissions(scratch)
    if target.exists():
        old = target.parent / f".{target.name}.old-{tag}"
        target.rename(old)
        scratch.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        scratch.rename(target)


def _default_permissions(folder: Path) -> None:
    """Files as the user's umask would make them (safetensors writes 0600 temporaries)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def save_delta(
    folder: Path, deltas: DeltaSet, recipe: Recipe, base_model: str, metrics: dict | None
) -> None:
    """Write the delta's tensors, PEFT config (where PEFT has the method), recipe and metrics.

    The recipe is saved with the configs the deltas export (a prefix trained through an MLP
    is saved folded, as a plain prefix)."""
    configs, tensors = deltas.export()
    peft = peft_config(deltas, recipe.task, base_model)
    write_delta(folder, dataclasses.replace(recipe, deltas=configs), tensors, metrics, peft)


def write_delta(
    folder: Path,
    recipe: Recipe,
    tensors: dict[str, torch.Tensor],
    metrics: dict | None,
    peft: dict | None = None,
) -> None:
    """The files of a delta directory, from its recipe and its tensors by file key."""
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    if peft is not None:
        write_json(folder / PEFT_CONFIG_FILE, peft)
    (folder / RECIPE_FILE).write_text(dump_recipe(recipe), encoding="utf-8")
    if metrics is not None:
        write_json(folder / METRICS_FILE, metrics)


@dataclasses.dataclass
class SavedDelta:
    """A delta directory as read: its recipe, its tensors (by file key) and its metrics."""

    folder: Path
    recipe: Recipe
    tensors: dict
    metrics: dict
    source: str  # "deltacli" or "peft"

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

    def load_into(self, deltas: DeltaSet) -> None:
        """Put the saved tensors into `deltas`, attached from this very recipe."""
        deltas.load(self.values_for(deltas))


def is_delta_dir(folder: Path) -> bool:
    """Whether `folder` looks like a saved delta rather than a model."""
    return (folder / RECIPE_FILE).is_file() or (folder / PEFT_CONFIG_FILE).is_file()


def read_delta(folder: Path, model: str | None = None) -> SavedDelta:
    """Read a deltacli delta (recipe.yaml) or a PEFT adapter (adapter_config.json).

    `model` replaces the base model the delta names (e.g. a local copy of it).
    """
    if not folder.is_dir():
        raise DeltacliError(f"delta directory {folder} does not exist")
    tensors = _read_tensors(folder)
    if (folder / RECIPE_FILE).is_file():
        raw, source = yaml.safe_load((folder / RECIPE_FILE).read_text(encoding="utf-8")), "deltacli"
    elif (folder / PEFT_CONFIG_FILE).is_file():
        config = json.loads((folder / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
        raw, source = recipe_from_peft(config, tensors), "peft"
    else:
        raise DeltacliError(
            f"{folder} is neither a deltacli delta ({RECIPE_FILE}) nor a PEFT adapter "
            f"({PEFT_CONFIG_FILE})"
        )
    if model is not None:
        raw["model"] = model
    metrics_file = folder / METRICS_FILE
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
    return SavedDelta(folder, parse_recipe(raw), tensors, metrics, source)


def _read_tensors(folder: Path) -> dict:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        hint = " (only a pickled adapter_model.bin, which deltacli never loads)" if pickled else ""
        raise DeltacliError(f"{folder} has no {WEIGHTS_FILE}{hint}")
    try:
        return load_file(path)
    except SafetensorError as error:
        raise DeltacliError(f"{path} is not a valid safetensors file: {error}") from None
