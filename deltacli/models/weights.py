"""A model's weights on disk, read tensor by tensor under the task model's own names.

A checkpoint is one `model.safetensors` or shards listed in `model.safetensors.index.json`.
Its keys need not be the task model's parameter names: all-MiniLM ships a bare `BertModel`
whose keys lack the `bert.` prefix that `BertForSequenceClassification` uses. `merge` and
`sparsify` both read through this, so the mapping lives once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from deltacli.errors import DeltacliError
from deltacli.models.shards import ShardReader, TensorInfo

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """The shards of a model directory, opened for reading; names are the task model's."""

    def __init__(self, folder: Path, model: nn.Module) -> None:
        self.folder = folder
        self.index = _index(folder)
        self.files = (
            list(dict.fromkeys(self.index["weight_map"].values()))
            if self.index is not None
            else ["model.safetensors"]
        )
        self.readers = [ShardReader(folder / file) for file in self.files]
        known = {name for name, _ in model.named_parameters()}
        known |= {name for name, _ in model.named_buffers()}
        prefix = getattr(model, "base_model_prefix", "")
        self.keys: dict[str, tuple[ShardReader, str]] = {}
        for reader in self.readers:
            for key in reader.info:
                name = f"{prefix}.{key}" if key not in known and f"{prefix}.{key}" in known else key
                self.keys[name] = (reader, key)

    def info(self, name: str) -> TensorInfo:
        reader, key = self.keys[name]
        return reader.info[key]

    def read(self, name: str) -> torch.Tensor:
        reader, key = self.keys[name]
        return reader.read(key)

    def names_in(self, reader: ShardReader) -> list[str]:
        """This shard's tensors, in file order, by task-model name."""
        return [name for name, (owner, _) in self.keys.items() if owner is reader]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_files(folder: Path) -> None:
    """Refuse, by file and tensor, a checkpoint whose shards are damaged or cut short,
    before a loader reads them (headers only: no tensor is read)."""
    index = _index(folder)
    files = dict.fromkeys(index["weight_map"].values()) if index else ["model.safetensors"]
    for file in files:
        if not (folder / file).is_file():
            raise DeltacliError(f"{folder / INDEX_FILE} lists {file}, which is missing")
        ShardReader(folder / file).close()


def _check_shard_name(folder: Path, file: object) -> None:
    """A shard is a plain file name inside the model folder: `merge` writes its output shard
    under the same name, so a path (`../x`, `/etc/x`) would read or write outside both."""
    if (
        not isinstance(file, str)
        or not file
        or file in (".", "..")
        or Path(file).name != file
        or "\\" in file
    ):
        raise DeltacliError(
            f"{folder / INDEX_FILE} names shard {file!r}, which is not a plain file name in "
            "the model folder; refusing to read or write outside it"
        )


def _index(folder: Path) -> dict | None:
    if (folder / INDEX_FILE).is_file():
        try:
            index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
            files = set(index["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise DeltacliError(f"{folder / INDEX_FILE} is not a shard index ({error})") from None
        for file in files:
            _check_shard_name(folder, file)
        return index
    if (folder / "model.safetensors").is_file():
        return None
    pickled = any(folder.glob("*.bin"))
    hint = " (it has only pickled .bin weights, which deltacli never loads)" if pickled else ""
    raise DeltacliError(f"{folder} holds no model.safetensors or {INDEX_FILE}{hint}")
