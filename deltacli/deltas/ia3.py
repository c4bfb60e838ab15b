"""IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning"): learned vectors that rescale keys, values and the feed-forward
activation.

On a key or value projection the vector scales the output rows, `l ⊙ (W x + b)`; on a
feed-forward output projection it scales the input, `W (l ⊙ x) + b`. Vectors start at one, so
outputs at step 0 are the base model's. Both forms are linear in W, so IA3 merges. Targets
and feed-forward modules follow PEFT's presets, so a delta saved here is a PEFT IA3 adapter.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from deltacli.config.schema import option
from deltacli.deltas.base import (
    Delta,
    DeltaConfig,
    Increment,
    peft_patterns,
    register,
    trainable_like,
)
from deltacli.deltas.targets import (
    features,
    is_linear,
    is_transposed,
    minimal_suffixes,
    modules_by_name,
    select,
)
from deltacli.models.architectures import architecture

# The roles IA3 rescales when a recipe names none (PEFT's presets, which the architecture
# table overrides where PEFT departs from them), and of those the feed-forward ones.
ROLES = ("key", "value", "ffn_output")
FEEDFORWARD_ROLES = ("ffn_output",)


@dataclasses.dataclass
class IA3Config(DeltaConfig):
    targets: list[str] | None = option(
        None, "module patterns to rescale; null: the architecture's preset (keys, values, FFN)"
    )
    feedforward: list[str] | None = option(
        None, "of those, the ones whose input is rescaled; null: the preset's FFN modules"
    )


def _scale_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * module.ia3_l.flatten().to(output.dtype)


def _scale_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x * module.ia3_l.flatten().to(x.dtype), *args[1:])


def _rows(vector: torch.Tensor, transposed: bool, weight: torch.Tensor) -> torch.Tensor:
    """ΔW for output scaling: (l - 1) on every output row (a column for Conv1D)."""
    scale = vector.flatten() - 1
    return weight * (scale[None, :] if transposed else scale[:, None])


def _columns(vector: torch.Tensor, transposed: bool, weight: torch.Tensor) -> torch.Tensor:
    """ΔW for input scaling: (l - 1) on every input column (a row for Conv1D)."""
    scale = vector.flatten() - 1
    return weight * (scale[:, None] if transposed else scale[None, :])


def _bias(vector: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias * (vector.flatten() - 1)


@register
class IA3(Delta):
    kind = "ia3"
    config_class = IA3Config
    peft_type = "IA3"
    mergeable = True
    config: IA3Config

    def attach(self, model: nn.Module) -> None:
        targets, feedforward = self._patterns(model)
        modules = modules_by_name(model)
        self.targets = select(
            modules, targets, what="linear module", keep=lambda n: is_linear(modules[n])
        )
        chosen = set(self.targets)
        self.feedforward = [n for n in select(modules, feedforward, what="module") if n in chosen]
        self._modules = {}
        for name in self.targets:
            module = modules[name]
            in_features, out_features = features(module)
            shape = (1, in_features) if name in self.feedforward else (out_features, 1)
            like = trainable_like(module.weight)
            self.add_parameter(module, "ia3_l", nn.Parameter(torch.ones(shape, **like)))
            if name in self.feedforward:
                self.add_hook(module.register_forward_pre_hook, _scale_input)
            else:
                self.add_hook(module.register_forward_hook, _scale_output)
            self._modules[name] = module
            self.params[f"{name}.ia3_l"] = module.ia3_l

    def _patterns(self, model: nn.Module) -> tuple[list[str], list[str]]:
        if self.config.targets is not None:
            return self.config.targets, self.config.feedforward or []
        found = architecture(model, "IA3 preset", "set targets (and feedforward)")
        if found.ia3 is not None:
            targets, feedforward = map(list, found.ia3)
        else:
            targets, feedforward = found.patterns(*ROLES), found.patterns(*FEEDFORWARD_ROLES)
        return targets, self.config.feedforward or feedforward

    def delta_weights(self, values: dict[str, torch.Tensor]) -> dict[str, Increment]:
        increments: dict[str, Increment] = {}
        for name, module in self._modules.items():
            vector = values[f"{name}.ia3_l"].float()
            transposed = is_transposed(module)
            if name in self.feedforward:
                increments[f"{name}.weight"] = partial(_columns, vector, transposed)
            else:
                increments[f"{name}.weight"] = partial(_rows, vector, transposed)
                if getattr(module, "bias", None) is not None:
                    increments[f"{name}.bias"] = partial(_bias, vector)
        return increments

    def peft_config(self, model: nn.Module) -> dict:
        names = [n for n, _ in model.named_modules() if n]
        return {
            "target_modules": minimal_suffixes(self.targets, names),
            "feedforward_modules": minimal_suffixes(self.feedforward, names)
            if self.feedforward
            else [],
            "fan_in_fan_out": any(map(is_transposed, self._modules.values())),
            "init_ia3_weights": True,
        }

    @classmethod
    def from_peft(cls, config: dict) -> dict:
        return {
            "kind": cls.kind,
            "targets": peft_patterns(config.get("target_modules")),
            "feedforward": peft_patterns(config.get("feedforward_modules")) or [],
        }
