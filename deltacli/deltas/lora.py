"""LoRA (Hu et al., 2021): a low-rank reparameterisation of the update of a linear weight.

`h = W x + (alpha / r) * B A dropout(x)`, with A Kaiming-uniform and B zero, so the model's
outputs at step 0 are the base model's. In the unified view (He et al., 2022) this is a
*parallel* delta on a projection: it reads the module's input and adds to its output.

The low-rank pair is attached as children `lora_A` / `lora_B` of the targeted module and
applied by a forward hook, so parameter names are PEFT's saved key names
(`...query.lora_A.weight`) and the base weight keeps its own name for `merge`.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
from torch import nn

from deltacli.config.schema import AT_LEAST_ONE, FRACTION, POSITIVE, option
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
    is_transposed,
    linear_targets,
    minimal_suffixes,
    modules_by_name,
)

# The roles LoRA targets when a recipe names none: PEFT's defaults, so counts agree.
ROLES = ("query", "value")


@dataclasses.dataclass
class LoraConfig(DeltaConfig):
    r: int = option(8, "rank of the update B·A", AT_LEAST_ONE)
    alpha: float = option(16.0, "the update is scaled by alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = option(0.0, "dropout on the LoRA branch's input while training", FRACTION)
    targets: list[str] | None = option(
        None, "module-name patterns; null: the architecture's preset; [all-linear]: every linear"
    )
    rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023)")
    lr_ratio: float | None = option(
        None,
        "LoRA+ (Hayou et al., 2024): B learns at this multiple of A's rate (they suggest 16); "
        "null: one rate",
        POSITIVE,
    )


def _add_low_rank(scaling: float, module: nn.Module, args: tuple, output: torch.Tensor):
    x = args[0]
    update = module.lora_B(module.lora_A(module.lora_dropout(x.to(module.lora_A.weight.dtype))))
    return output + update.to(output.dtype) * scaling


def _low_rank_increment(
    b: torch.Tensor, a: torch.Tensor, scaling: float, transposed: bool, weight: torch.Tensor
) -> torch.Tensor:
    """(alpha/r)·B·A, laid out like the weight (GPT-2's Conv1D stores W transposed)."""
    increment = (b @ a).mul_(scaling)
    return increment.T if transposed else increment


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The module names LoRA attaches to, from explicit patterns or the architecture's preset."""
    return linear_targets(model, targets, ROLES, "LoRA")


@register
class Lora(Delta):
    kind = "lora"
    config_class = LoraConfig
    peft_type = "LORA"
    mergeable = True
    config: LoraConfig

    def learning_rates(self, rate: float) -> dict[str, float]:
        """LoRA+: B at `lr_ratio` times A's rate (a saved LoRA+ delta is a plain LoRA)."""
        ratio = self.config.lr_ratio or 1.0
        return {name: rate * ratio if ".lora_B." in name else rate for name in self.params}

    @property
    def scaling(self) -> float:
        root = math.sqrt(self.config.r) if self.config.rslora else self.config.r
        return self.config.alpha / root

    def attach(self, model: nn.Module) -> None:
        self.targets = resolve_targets(model, self.config.targets)
        modules = modules_by_name(model)
        for name in self.targets:
            module = modules[name]
            in_features, out_features = features(module)
            like = trainable_like(module.weight)
            lora_a = nn.Linear(in_features, self.config.r, bias=False, **like)
            lora_b = nn.Linear(self.config.r, out_features, bias=False, **like)
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
            self.add_module(module, "lora_A", lora_a)
            self.add_module(module, "lora_B", lora_b)
            self.add_module(module, "lora_dropout", nn.Dropout(self.config.dropout))
            self.add_hook(module.register_forward_hook, partial(_add_low_rank, self.scaling))
            self.params[f"{name}.lora_A.weight"] = lora_a.weight
            self.params[f"{name}.lora_B.weight"] = lora_b.weight
        self._modules = [modules[name] for name in self.targets]

    def delta_weights(self, values: dict[str, torch.Tensor]) -> dict[str, Increment]:
        return {
            f"{name}.weight": partial(
                _low_rank_increment,
                values[f"{name}.lora_B.weight"].float(),
                values[f"{name}.lora_A.weight"].float(),
                self.scaling,
                is_transposed(module),
            )
            for name, module in zip(self.targets, self._modules, strict=True)
        }

    def peft_config(self, model: nn.Module) -> dict:
        names = [n for n, m in model.named_modules() if n]
        return {
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": minimal_suffixes(self.targets, names),
            "fan_in_fan_out": any(map(is_transposed, self._modules)),
            "use_rslora": self.config.rslora,
            "bias": "none",
            "init_lora_weights": True,
        }

    @classmethod
    def from_peft(cls, config: dict) -> dict:
        return {
            "kind": cls.kind,
            "r": config["r"],
            "alpha": config.get("lora_alpha", 8),
            "dropout": config.get("lora_dropout", 0.0),
            "targets": peft_patterns(config.get("target_modules")),
            "rslora": config.get("use_rslora", False),
        }
