"""Reading the small text files users hand deltacli (recipes, configs, metrics): UTF-8, YAML
or JSON, each mistake one line naming the file, and the line and column where it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from deltacli.errors import DeltacliError


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DeltacliError(
            f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}); save it as UTF-8"
        ) from None
    except IsADirectoryError:
        raise DeltacliError(f"{path} is a directory, not a file") from None
    except FileNotFoundError:
        raise DeltacliError(f"{path} does not exist") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: plain
    YAML keeps the last, and a second `train:` would silently drop the first's settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    text = read_text(path)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise DeltacliError(f"{path} is not valid YAML{where}: {problem}") from None


def read_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DeltacliError(
            f"{path} is not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None


def read_mapping(path: Path, what: str) -> dict:
    """A YAML or JSON file that must hold a mapping (`what` names it in the message)."""
    data = read_json(path) if path.suffix == ".json" else read_yaml(path)
    if not isinstance(data, dict):
        raise DeltacliError(f"{path} must hold {what} (a mapping), not {type(data).__name__}")
    return data
