"""Bottleneck adapters in every placement of the unified view (He et al., 2022).

`h <- h + s · f(x W_down) W_up` at the attention or feed-forward sublayer, where x is the
sublayer's output (sequential: Houlsby et al., 2019; Pfeiffer et al., 2021) or its input
(parallel: He et al.'s parallel adapter; with s = 4, the scaled parallel adapter). Placement,
position, size and scale are recipe data; MAM is a recipe, not code. `W_up` starts at zero,
so the model's outputs at step 0 are the base model's.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Literal

import torch
from torch import nn

from deltacli.config.schema import AT_LEAST_ONE, option
from deltacli.deltas.base import Delta, DeltaConfig, register, trainable_like
from deltacli.deltas.targets import (
    features,
    in_layers,
    is_linear,
    layer_count,
    modules_by_name,
    partner,
    select,
)
from deltacli.errors import DeltacliError
from deltacli.models.architectures import architecture

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclasses.dataclass
class AdapterConfig(DeltaConfig):
    at: Literal["attention", "ffn"] = option("ffn", "the sublayer it sits at")
    placement: Literal["sequential", "parallel"] = option(
        "sequential", "read the sublayer's output (sequential) or its input (parallel)"
    )
    r: int = option(64, "bottleneck width", AT_LEAST_ONE)
    scale: float = option(1.0, "s in h + s·Δh (He et al.'s scaled parallel adapter: 4)")
    activation: Literal["relu", "gelu", "tanh", "silu"] = option("relu", "the bottleneck's f")
    layers: list[int] | None = option(None, "only these layer indices; null: every layer")
    reads: str | None = option(None, "module pattern whose input a parallel adapter reads")
    writes: str | None = option(None, "module pattern whose output the adapter adds to")


class Bottleneck(nn.Module):
    """f(x W_down) W_up, with W_up (and its bias) zero at the start."""

    def __init__(self, width: int, r: int, activation: str, like: dict) -> None:
        super().__init__()
        self.down = nn.Linear(width, r, **like)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(r, width, **like)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.to(self.down.weight.dtype))))


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A sublayer's input: its first positional argument, or `hidden_states` by keyword."""
    if args:
        return args[0]
    for name in ("hidden_states", "query", "x", "input"):
        if name in kwargs:
            return kwargs[name]
    raise RuntimeError("could not find the sublayer's input to read")


@register
class Adapter(Delta):
    kind = "adapter"
    config_class = AdapterConfig
    config: AdapterConfig

    def attach(self, model: nn.Module) -> None:
        config = self.config
        modules = modules_by_name(model)
        reads, writes = config.reads, config.writes
        if not (reads and writes):
            fix = "name the modules with `reads` and `writes` patterns"
            found = architecture(model, "sublayer preset", fix)
            reads = reads or found.sublayer_input[config.at]
            writes = writes or found.sublayer_output[config.at]
        written = self._in_layers(select(modules, [writes], what="module"))
        self._inputs: dict[str, torch.Tensor] = {}
        if config.placement == "parallel":
            read = self._in_layers(select(modules, [reads], what="module"))
            for name in written:
                source = partner(name, read)
                if source is None:
                    raise DeltacliError(f"no module to read for {name} in its layer")
                hook = partial(self._remember, name)
                self.add_hook(modules[source].register_forward_pre_hook, hook, with_kwargs=True)
        for name in written:
            module = modules[name]
            if not is_linear(module):
                raise DeltacliError(f"adapters write after a linear layer; {name} is not one")
            width = features(module)[1]
            adapter = Bottleneck(width, config.r, config.activation, trainable_like(module.weight))
            slot = _free_name(module, "adapter")
            self.add_module(module, slot, adapter)
            self.add_hook(module.register_forward_hook, partial(self._add, name, adapter))
            for param_name, param in adapter.named_parameters():
                self.params[f"{name}.{slot}.{param_name}"] = param

    def _in_layers(self, names: list[str]) -> list[str]:
        return in_layers(names, self.config.layers, layer_count(names))

    def _remember(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._inputs[name] = _first_input(args, kwargs)

    def _add(self, name: str, adapter: Bottleneck, module: nn.Module, args: tuple, output):
        hidden = _hidden(output)
        source = self._inputs.pop(name) if self.config.placement == "parallel" else hidden
        updated = hidden + self.config.scale * adapter(source).to(hidden.dtype)
        return (updated, *output[1:]) if isinstance(output, tuple) else updated


def _free_name(module: nn.Module, base: str) -> str:
    name, count = base, 0
    while hasattr(module, name):
        count += 1
        name = f"{base}_{count}"
    return name
