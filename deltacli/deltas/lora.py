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
from transformers.pytorch_utils import Conv1D

from deltacli.deltas.base import Delta, DeltaConfig, Increment, register
from deltacli.deltas.targets import features, linear_targets, minimal_suffixes, modules_by_name
from deltacli.errors import DeltacliError
from deltacli.schema import option

# The projections LoRA targets when a recipe names none: PEFT's defaults, so counts agree.
PRESETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


@dataclasses.dataclass
class LoraConfig(DeltaConfig):
    r: int = option(8, "rank of the update B·A")
    alpha: float = option(16.0, "the update is scaled by alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = option(0.0, "dropout on the LoRA branch's input while training")
    targets: list[str] | None = option(
        None, "module-name patterns; null: the architecture's preset; [all-linear]: every linear"
    )
    rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023)")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise DeltacliError(f"lora r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise DeltacliError(f"lora dropout must be in [0, 1), got {self.dropout}")


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
    return linear_targets(model, targets, PRESETS, "LoRA")


@register
class Lora(Delta):
    kind = "lora"
    config_class = LoraConfig
    peft_type = "LORA"
    mergeable = True
    config: LoraConfig

    @property
    def scaling(self) -> float:
        root = math.sqrt(self.config.r) if self.config.rslora else self.config.r
        return self.config.alpha / root

    def attach(self, model: nn.Module) -> None:
        self.targets = resolve_targets(model, self.config.targets)
        modules = modules_by_name(model)
        self._hooks = []
        for name in self.targets:
            module = modules[name]
            in_features, out_features = features(module)
            like = {"device": module.weight.device, "dtype": module.weight.dtype}
            module.lora_A = nn.Linear(in_features, self.config.r, bias=False, **like)
            module.lora_B = nn.Linear(self.config.r, out_features, bias=False, **like)
            module.lora_dropout = nn.Dropout(self.config.dropout)
            nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(module.lora_B.weight)
            self._hooks.append(module.register_forward_hook(partial(_add_low_rank, self.scaling)))
            self.params[f"{name}.lora_A.weight"] = module.lora_A.weight
            self.params[f"{name}.lora_B.weight"] = module.lora_B.weight
        self._modules = [modules[name] for name in self.targets]

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for module in self._modules:
            del module.lora_A, module.lora_B, module.lora_dropout
        super().detach()

    def delta_weights(self, values: dict[str, torch.Tensor]) -> dict[str, Increment]:
        return {
            f"{name}.weight": partial(
                _low_rank_increment,
                values[f"{name}.lora_B.weight"].float(),
                values[f"{name}.lora_A.weight"].float(),
                self.scaling,
                isinstance(module, Conv1D),
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
            "fan_in_fan_out": any(isinstance(m, Conv1D) for m in self._modules),
            "use_rslora": self.config.rslora,
            "bias": "none",
            "init_lora_weights": True,
        }
