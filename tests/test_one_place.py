"""Each fact lives in one place: outside its own module, the package never spells a delta
kind's name, a task's name or PEFT's key prefix; it asks the registries instead."""

import ast
from pathlib import Path

import deltacli
from deltacli.deltas import KINDS
from deltacli.deltas.base import PEFT_PREFIX
from deltacli.tasks.registry import TASKS

PACKAGE = Path(deltacli.__file__).parent


def spellings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in the module, f-string pieces included, but
    for the keys of records (`{"prompt": ...}`, `row["prompt"]`) and the names of commands
    (`add_typer(app, name="subspace")`): field names of data and words of the command line,
    which may share a word with a kind."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    keys = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys}
    keys |= {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
    keys |= {
        id(word.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for word in node.keywords
        if word.arg == "name"
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in keys
    ]


def owner(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_kind_task_and_prefix_names_are_spelled_only_where_they_are_defined():
    kinds = {name: owner(Path(__import__(cls.__module__, fromlist=["_"]).__file__))
             for name, cls in KINDS.items()}  # fmt: skip
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = owner(path)
        for line, text in spellings(path):
            if text in kinds and kinds[text] != here:
                found.append(f"{here}:{line} spells the kind {text!r}")
            if text in TASKS and here != "tasks/registry.py":
                found.append(f"{here}:{line} spells the task {text!r}")
            if PEFT_PREFIX in text and here != "deltas/base.py":
                found.append(f"{here}:{line} spells PEFT's key prefix")
    assert found == []
