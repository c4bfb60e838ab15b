"""The unified subspace (Yi et al., Findings of EMNLP 2022, "Different Tunes Played with Equal
Skill: Exploring a Unified Optimization Subspace for Delta Tuning"): train a delta of any
fitted method through a point z of a shared d-dimensional subspace.

`deltacli subspace fit` (deltacli/subspace.py) learns, for each of several methods m, a linear
decoder Dec_m from R^d to the method's parameters, such that init_m + Dec_m(z) is a working
delta around the points the methods' own solutions encode to. This kind attaches method m
(`through`) and makes each of its tensors a function of z alone, `init_m + Dec_m(z)`, through
torch's parametrizations: only z (d numbers, plus the task head) trains, and the method's
own code sees ordinary tensors.

A subspace folder holds `subspace.json` (the methods' `deltas:` items and the order and shape
of their tensors in the flat θ_m) and `subspace.safetensors` (per method: `init`, `decoder`,
the encoder, the method's encoded solution `point`, its trained task head, and `fixed`
tensors that a delta saves but does not train: SIFT's indices, so that z moves its k values).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from deltacli.config.schema import build, option
from deltacli.deltas.base import Delta, DeltaConfig, kind_class, register
from deltacli.errors import DeltacliError
from deltacli.files.tensors import load_tensors
from deltacli.files.text import read_mapping

SPACE_FILE = "subspace.json"
TENSORS_FILE = "subspace.safetensors"


@dataclasses.dataclass
class SubspaceConfig(DeltaConfig):
    subspace: str = option("", "the folder `deltacli subspace fit` wrote")
    through: str = option("", "the fitted method whose decoder maps z to a delta, e.g. lora")


@dataclasses.dataclass
class Method:
    """One fitted method: its `deltas:` items, and where its tensors sit in the flat θ_m."""

    name: str
    deltas: list[dict]
    names: list[str]  # its trainable tensors by model name, in θ_m's order
    shapes: list[list[int]]

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat θ_m as the method's tensors, by name (views: gradients flow through)."""
        sizes = [math.prod(shape) for shape in self.shapes]
        parts = torch.split(flat, sizes)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[name].reshape(-1).float() for name in self.names])


@dataclasses.dataclass
class Space:
    """A fitted subspace as read from disk."""

    folder: Path
    dim: int
    methods: dict[str, Method]
    info: dict  # what else subspace.json says: base, task, data, how it was fitted
    tensors: dict[str, torch.Tensor]

    def method(self, name: str) -> Method:
        if name not in self.methods:
            raise DeltacliError(
                f"{self.folder} has no method {name!r}; it was fitted on {', '.join(self.methods)}"
            )
        return self.methods[name]

    def decode(self, name: str, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """init_m + Dec_m(z), as the method's tensors."""
        flat = self.tensors[f"{name}.init"] + self.tensors[f"{name}.decoder"] @ z.float()
        return self.method(name).split(flat)

    def point(self, name: str) -> torch.Tensor:
        """Where the method's own trained delta encodes to."""
        return self.tensors[f"{name}.point"]

    def head(self, name: str) -> dict[str, torch.Tensor]:
        """The task head the method's delta was trained with, by model name."""
        return self._group(f"{name}.head.")

    def fixed(self, name: str) -> dict[str, torch.Tensor]:
        """What the method's delta saves but does not train (SIFT's indices), by name."""
        return self._group(f"{name}.fixed.")

    def _group(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in self.tensors.items() if k.startswith(prefix)}


def read_space(folder: Path) -> Space:
    if not (folder / SPACE_FILE).is_file():
        raise DeltacliError(
            f"{folder} is not a subspace (no {SPACE_FILE}): `deltacli subspace fit` makes one"
        )
    info = read_mapping(folder / SPACE_FILE, "a fitted subspace")
    try:
        methods = {m["name"]: Method(**m) for m in info.pop("methods")}
        dim = int(info["dim"])
    except (KeyError, TypeError, ValueError) as error:
        raise DeltacliError(
            f"{folder / SPACE_FILE} is not a subspace as `deltacli subspace fit` writes it "
            f"(bad or missing {error}); fit it again"
        ) from None
    tensors = load_tensors(folder / TENSORS_FILE)
    for name in methods:
        missing = [p for p in ("init", "decoder", "point") if f"{name}.{p}" not in tensors]
        if missing:
            raise DeltacliError(
                f"{folder / TENSORS_FILE} lacks {name}.{missing[0]}; the subspace is damaged: "
                "fit it again"
            )
    return Space(folder, dim, methods, info, tensors)


def inner_deltas(method: Method) -> list[Delta]:
    """The method's deltas, unattached, from its saved `deltas:` items."""
    inner = []
    for item in method.deltas:
        cls = kind_class(item["kind"])
        inner.append(cls(build(cls.config_class, {k: v for k, v in item.items() if k != "kind"})))
    return inner


class _FromZ(nn.Module):
    """A parametrization: the tensor is init + Dec·z over its slice of θ (the value it had
    is ignored), z read from the one module that holds it."""

    def __init__(self, init: torch.Tensor, decoder: torch.Tensor, holder: nn.Module) -> None:
        super().__init__()
        self.register_buffer("init", init)
        self.register_buffer("decoder", decoder)
        self._holder = [holder]  # a list, not a submodule: z stays one parameter, named once

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        z = self._holder[0].z
        value = self.init + self.decoder @ z.to(self.decoder.dtype)
        return value.view(original.shape).to(original.dtype)


@register
class Subspace(Delta):
    kind = "subspace"
    config_class = SubspaceConfig
    config: SubspaceConfig
    shardable = False  # each parametrized tensor is computed whole from z
    switchable = False  # its tensors are computed from z: there is no base to switch to

    def attach(self, model: nn.Module) -> None:
        if not self.config.subspace or not self.config.through:
            raise DeltacliError(
                "a subspace delta needs `subspace` (a folder `deltacli subspace fit` wrote) and "
                "`through` (one of its methods): deltas.0.subspace=DIR deltas.0.through=lora"
            )
        space = read_space(Path(self.config.subspace))
        method = space.method(self.config.through)
        params: dict[str, nn.Parameter] = {}
        fixed = space.fixed(method.name)
        for inner in inner_deltas(method):
            inner.attach(model)
            self.on_detach(inner.detach)
            params |= inner.params
            own = {n: fixed[n] for n in inner.saved_names() if n in fixed}
            if own:
                inner.load(own)  # SIFT: the entries its run chose
        for name, shape in zip(method.names, method.shapes, strict=True):
            if name not in params or list(params[name].shape) != shape:
                raise DeltacliError(
                    f"{space.folder} was fitted on {space.info['base']}: this model's "
                    f"{method.name} has no tensor {name} of shape {shape}"
                )
        like = params[method.names[0]]
        holder = nn.Module()
        holder.z = nn.Parameter(torch.zeros(space.dim, device=like.device, dtype=torch.float32))
        self.add_module(model, "subspace", holder)
        init = space.tensors[f"{method.name}.init"].to(like.device)
        decoder = space.tensors[f"{method.name}.decoder"].to(like.device)
        start = 0
        for name, shape in zip(method.names, method.shapes, strict=True):
            end = start + math.prod(shape)
            owner_name, attribute = name.rsplit(".", 1)
            owner = model.get_submodule(owner_name)
            step = _FromZ(init[start:end], decoder[start:end], holder)
            parametrize.register_parametrization(owner, attribute, step)
            self.on_detach(_unparametrize(owner, attribute))
            getattr(owner.parametrizations, attribute).original.requires_grad_(False)
            start = end
        self.params = {"subspace.z": holder.z}


def _unparametrize(owner: nn.Module, attribute: str):
    def undo() -> None:
        parametrize.remove_parametrizations(owner, attribute, leave_parametrized=False)

    return undo
