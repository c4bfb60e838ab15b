"""What trains, and how much: parameter accounting for a model + recipe or a saved delta.

Models are built on the meta device from their config alone, so any size answers at once
without reading a weight. Results are plain dataclasses; `render` draws them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from deltacli.build import attach_recipe, parameter_counts
from deltacli.deltas import DeltaSet
from deltacli.deltas.base import PEFT_PREFIX
from deltacli.deltas.targets import collapse_indices, is_linear, layer_index
from deltacli.errors import DeltacliError
from deltacli.models.architectures import HEADS
from deltacli.models.loading import build_on_meta, saved_task
from deltacli.recipe import Recipe, load_recipe, recipe_to_dict
from deltacli.storage.delta_folder import SavedDelta, read_delta
from deltacli.tasks.registry import DEFAULT


@dataclasses.dataclass
class Group:
    """Parameters of one kind of module, e.g. `bert.encoder.layer.*.attention.self.query.lora_A`
    in every layer."""

    module: str
    role: str
    instances: int
    parameters: int
    trainable: bool


@dataclasses.dataclass
class Layer:
    """Parameters of one transformer layer (`layer` None: everything outside the stack)."""

    layer: int | None
    parameters: int
    trainable: int


@dataclasses.dataclass
class Node:
    """A module in the hierarchy; `repeat` identical siblings (`layer.0-11`) are folded into
    one node whose counts are those of a single instance."""

    name: str
    type: str
    parameters: int
    trainable: int
    repeat: int = 1
    children: list[Node] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ModelReport:
    model: str
    recipe: str | None
    total: int
    trainable: int
    trainable_percent: float
    groups: list[Group]
    layers: list[Layer]
    tree: Node
    base_dtype: str  # what the frozen base is stored in ("nf4"/"int8" when quantised)
    trainable_dtype: str | None  # what the deltas train in
    base_bytes: int  # the frozen base's weights in memory (estimated when quantised)


@dataclasses.dataclass
class DeltaReport:
    folder: str
    source: str
    methods: list[str]
    base_model: str
    parameters: int
    tensors: int
    bytes_on_disk: int
    groups: list[Group]
    metrics: dict
    recipe: dict
    densities: dict[str, float]
    problems: list[str]  # files of the delta that could not be read


def inspect_model(model_spec: str, recipe: Recipe | None) -> ModelReport:
    """Counts for `model_spec` as is, or with `recipe`'s deltas attached, on the meta device.
    Without a recipe the model is built for the task its config was saved for."""
    task = recipe.task if recipe else (saved_task(model_spec) or DEFAULT)
    labels = recipe.data.labels if recipe else None
    model = build_on_meta(model_spec, task, labels, recipe.base_dtype if recipe else "auto")
    roles = _roles(attach_recipe(model, recipe)) if recipe else {}
    params = dict(model.named_parameters())
    counts = parameter_counts(model)
    frozen = [p for p in params.values() if not p.requires_grad]
    trainable = [p for p in params.values() if p.requires_grad]
    quantize = recipe.quantize if recipe else None
    return ModelReport(
        model=model_spec,
        recipe=recipe.name if recipe else None,
        total=counts["total"],
        trainable=counts["trainable"],
        trainable_percent=counts["trainable_percent"],
        groups=_groups(params, roles, trainable_only=recipe is not None),
        layers=_layers(params),
        tree=_tree("", model)[0],
        base_dtype=quantize or _dtype_name(frozen[0] if frozen else trainable[0]),
        trainable_dtype=_dtype_name(trainable[0]) if trainable else None,
        base_bytes=_base_bytes(model, quantize),
    )


# Bytes per weight of a quantised linear layer: NF4 is 4 bits plus, with double
# quantisation, about 0.127 bits of block scales (Dettmers et al., 2023); LLM.int8() is 8
# bits plus one float32 scale per row.
_QUANTISED_BYTES = {"nf4": 0.5 + 0.127 / 8, "int8": 1.0}


def _base_bytes(model: nn.Module, quantize: str | None) -> int:
    """The frozen weights' memory: their dtype's size, or the quantised size for the linear
    layers of the body (bitsandbytes leaves embeddings, norms and heads as they are)."""
    total = 0.0
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                continue
            quantised = quantize and is_linear(module) and name.split(".")[0] not in HEADS
            per = _QUANTISED_BYTES[quantize] if quantised else param.element_size()
            total += param.numel() * per
    return round(total)


def _dtype_name(param: torch.Tensor) -> str:
    return str(param.dtype).removeprefix("torch.")


def recipe_for_model(file: Path, model_spec: str, overrides: list[str]) -> Recipe:
    """The recipe in `file`, applied to `model_spec` for the task its config was saved for
    (a `LlamaForCausalLM` is counted with its LM head, not a new classifier); an explicit
    `task=` override still wins."""
    settings = {"model": model_spec}
    task = saved_task(model_spec)
    if task is not None:
        settings["task"] = task
    return load_recipe(file, overrides, settings)


def inspect_delta(folder: Path) -> DeltaReport:
    """A saved delta's methods, size and figures. Where its base model's config can be read,
    tensors are named as in the model and labelled with the delta that owns them."""
    saved = read_delta(folder)
    names, roles, densities = _model_names(saved)
    params = {
        names.get(key, key.removeprefix(PEFT_PREFIX)): tensor
        for key, tensor in saved.tensors.items()
    }
    return DeltaReport(
        folder=str(folder),
        source=saved.source,
        methods=[d.kind for d in saved.recipe.deltas] + (["head"] if saved.recipe.head else []),
        base_model=saved.recipe.model,
        parameters=sum(t.numel() for t in saved.tensors.values()),
        tensors=len(saved.tensors),
        bytes_on_disk=sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
        groups=_groups(params, roles, trainable_only=False),
        metrics=saved.metrics,
        recipe=recipe_to_dict(saved.recipe),
        densities=densities,
        problems=saved.problems,
    )


def _roles(deltas: DeltaSet) -> dict[str, str]:
    """Parameter name -> the kind of delta that trains it (`head` for the task head)."""
    roles: dict[str, str] = {}
    for delta in deltas.members:
        roles.update(dict.fromkeys(delta.params, "head" if delta is deltas.head else delta.kind))
    return roles


def _model_names(saved: SavedDelta) -> tuple[dict[str, str], dict[str, str], dict[str, float]]:
    """File key -> tensor name, the roles, and sparse deltas' density per matrix, from the
    recipe attached on the meta device (empty where the base model's config is out of reach)."""
    recipe = saved.recipe
    try:
        model = build_on_meta(recipe.model, recipe.task, recipe.data.labels)
        deltas = attach_recipe(model, recipe)
    except DeltacliError:
        return {}, {}, {}
    keys = {key: name for name, key in deltas.keys().items()}
    return keys, _roles(deltas), deltas.densities()


def _groups(
    params: dict[str, torch.Tensor | nn.Parameter], roles: dict[str, str], trainable_only: bool
) -> list[Group]:
    """One row per module shape-name (layer indices collapsed), in model order."""
    rows: dict[tuple[str, bool], Group] = {}
    seen: dict[tuple[str, bool], set[str]] = {}
    for name, param in params.items():
        trainable = bool(getattr(param, "requires_grad", True))
        if trainable_only and not trainable:
            continue
        module = name.rsplit(".", 1)[0]
        key = (collapse_indices(module), trainable)
        row = rows.setdefault(key, Group(key[0], roles.get(name, ""), 0, 0, trainable))
        seen.setdefault(key, set()).add(module)
        row.instances = len(seen[key])
        row.parameters += param.numel()
    return list(rows.values())


def _layers(params: dict[str, nn.Parameter]) -> list[Layer]:
    rows: dict[int | None, Layer] = {}
    for name, param in params.items():
        index = layer_index(name)
        row = rows.setdefault(index, Layer(index, 0, 0))
        row.parameters += param.numel()
        row.trainable += param.numel() if param.requires_grad else 0
    return sorted(rows.values(), key=lambda row: -1 if row.layer is None else row.layer)


def _tree(name: str, module: nn.Module) -> tuple[Node, tuple]:
    """The module's node and a structural signature, equal for identical modules."""
    own = list(module.parameters(recurse=False))
    built = [_tree(child_name, child) for child_name, child in module.named_children()]
    children = _fold(built)
    parameters = sum(p.numel() for p in own) + sum(c.parameters * c.repeat for c in children)
    trainable = sum(p.numel() for p in own if p.requires_grad)
    trainable += sum(c.trainable * c.repeat for c in children)
    signature = (
        type(module).__name__,
        tuple((tuple(p.shape), p.requires_grad) for p in own),
        tuple(sig for _, sig in built),
    )
    node = Node(name, type(module).__name__, parameters, trainable)
    node.children = children
    return node, signature


def _fold(built: list[tuple[Node, tuple]]) -> list[Node]:
    """Runs of numbered siblings with one signature become `first-last` with a repeat count."""
    folded: list[Node] = []
    run: list[tuple[Node, tuple]] = []
    for node, signature in [*built, (None, None)]:
        if run and (node is None or not node.name.isdigit() or signature != run[0][1]):
            first = run[0][0]
            if len(run) > 1:
                first.name, first.repeat = f"{first.name}-{run[-1][0].name}", len(run)
            folded.append(first)
            run = []
        if node is None:
            break
        if node.name.isdigit():
            run.append((node, signature))
        else:
            folded.append(node)
    return folded
