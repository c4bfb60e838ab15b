"""The folders are the architecture: every module imports only from its own layer or the
layers below it, so the package reads bottom to top and no change can tie a circle.

Type-only imports count too: they are the same dependency, and they close circles for the
reader if not for the interpreter."""

import ast
from pathlib import Path

import deltacli

PACKAGE = Path(deltacli.__file__).parent

# Bottom to top. A top-level module or a package of the same name; each may import itself
# and anything in a lower layer.
LAYERS = [
    {"errors", "labels", "plots"},  # no deltacli imports at all
    {"config", "files"},  # the schema users write in; files at their lowest level
    {"tasks"},  # registry, data, metrics, scoring, evaluation loop
    {"models"},  # loading, architectures, precision, checkpoint shards
    {"deltas"},  # the delta kinds
    {"recipe"},  # a whole recipe: model, task, data, deltas, training
    {"storage"},  # saved deltas: folder, PEFT format, model card
    {"build"},  # a recipe's model with its deltas attached
    {"training"},  # runtime, session, trainer, runs and their checkpoints
    {"commands"},  # eval, inspect, merge, verify, sparsify, subspace, sweep, report
    {"render"},  # tables and trees for the terminal
    {"cli", "__main__"},  # the command line
]
# `__init__` exports by name through importlib (no import); `store` re-exports
# `storage.delta_folder.read_delta` for the path older model cards print.
EXEMPT = {"__init__", "store"}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.startswith("deltacli.") else module
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every deltacli module the file imports, wherever the import is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deltacli"):
            if node.module == "deltacli":
                found += [(node.lineno, f"deltacli.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("deltacli")]
    return [(line, name) for line, name in found if name != "deltacli.__version__"]


def modules() -> list[tuple[str, Path]]:
    return [
        (".".join(("deltacli", *path.relative_to(PACKAGE).with_suffix("").parts)), path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.stem not in EXEMPT or path.parent != PACKAGE
    ]


def test_every_module_has_a_layer():
    for name, _ in modules():
        if not name.endswith("__init__"):
            layer_of(name)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for name, path in modules():
        if name.endswith("__init__"):
            continue
        mine = layer_of(name)
        for line, other in imported(path):
            if layer_of(other) > mine:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {other}")
    assert upward == []


def test_no_circle_between_modules():
    """Within a layer too: module A imports B and B (through others) imports A."""
    graph = {name: {other for _, other in imported(path)} for name, path in modules()}
    names = set(graph)
    graph = {k: {v for v in vs if v in names and v != k} for k, vs in graph.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert circles == []
