"""Specification: train a chosen subset of the model's own weights and freeze the rest.

BitFit (Ben Zaken et al., 2022) trains every bias; LayerNorm tuning (ValizadehAslani et al.,
2024) every normalisation weight and bias; module-wise specification any parameter-name
patterns; full fine-tuning everything. Each can be narrowed to chosen layers: the
LayerNorm/module-transferability result tunes one module type in a single layer.

The saved value of a specified parameter *replaces* the base weight (it is not an increment),
so these deltas fold into a merged model by plain assignment.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from functools import partial

import torch
from torch import nn

from deltacli.config.schema import option
from deltacli.deltas.base import (
    PEFT_PREFIX,
    Delta,
    DeltaConfig,
    Increment,
    peft_patterns,
    register,
)
from deltacli.deltas.targets import in_layers, is_linear, layer_count, minimal_suffixes, select
from deltacli.errors import DeltacliError
from deltacli.models.precision import trainable_dtype


@dataclasses.dataclass
class SpecifyConfig(DeltaConfig):
    layers: list[int] | None = option(
        None, "train only these layer indices (-1 is the last); null: every layer"
    )


@dataclasses.dataclass
class BitFitConfig(SpecifyConfig):
    pass


@dataclasses.dataclass
class LayerNormConfig(SpecifyConfig):
    targets: list[str] | None = option(
        None, "name patterns narrowing which normalisation modules train; null: all of them"
    )


@dataclasses.dataclass
class FullConfig(SpecifyConfig):
    pass


@dataclasses.dataclass
class ModulesConfig(SpecifyConfig):
    targets: list[str] = option(
        [], "parameter or module name patterns to unfreeze, e.g. [attention.output.LayerNorm]"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.targets:
            raise DeltacliError("a `modules` delta needs targets, e.g. targets=[LayerNorm]")


class Specify(Delta):
    """Unfreezes the parameters `choose` names, restricted to `config.layers`."""

    config: SpecifyConfig
    mergeable = True
    initial_from_base = True
    needs_base = False  # a trained value replaces the weight, present in the base or not

    @abstractmethod
    def choose(self, model: nn.Module) -> list[str]:
        """Names of the parameters this kind trains, before any layer restriction."""

    def attach(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        names = self.choose(model)
        if self.config.layers is not None:
            names = in_layers(names, self.config.layers, layer_count(list(params)))
        if not names:
            raise DeltacliError(f"the {self.kind} delta chose no parameters in this model")
        modules = dict(model.named_modules())
        for name in names:
            owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
            for tensor, dtype in _train_in_full_precision(name, params[name], owner):
                self.on_detach(partial(_recast, tensor, dtype))
        self.params = {name: params[name] for name in names}
        self._held: dict[str, torch.Tensor] = {}

    def hold_reference(self) -> int:
        """The base's values of the trained tensors, copied: switching off swaps them in.
        For `full` this is a second copy of the model's weights, the only honest reference
        for a model whose every weight trains."""
        self._held = {name: p.detach().clone() for name, p in self.params.items()}
        return sum(t.numel() * t.element_size() for t in self._held.values())

    def release_reference(self) -> None:
        self._held = {}

    def switch(self, on: bool) -> None:
        """Swap the held base values and the trained ones (storage only: nothing is copied)."""
        if on == self.enabled:
            return
        if not self._held:
            raise RuntimeError(f"{self.kind}: hold_reference() before switching off")
        for name, param in self.params.items():
            param.data, self._held[name] = self._held[name], param.data
        self.enabled = on

    def delta_weights(self, values: dict[str, torch.Tensor]) -> dict[str, Increment]:
        return {name: partial(_replacement, values[name].float()) for name in self.params}


def _train_in_full_precision(
    name: str, param: nn.Parameter, owner: nn.Module
) -> list[tuple[torch.Tensor, torch.dtype]]:
    """A specified weight trains in float32 over a half-precision base (its updates would
    round away in bf16); a quantised weight cannot train at all. Autocast casts a linear
    layer's tensors to one type, but runs normalisations in their own, so a norm's other
    tensors move to float32 with the trained one."""
    if not param.is_floating_point():
        raise DeltacliError(
            f"{name} is quantised and cannot be trained; load the base unquantised "
            "(quantize: null) or train lora, ia3 or adapters"
        )
    dtype = trainable_dtype(param)
    together = [param] if is_linear(owner) else list(owner.parameters(recurse=False))
    recast = []
    for tensor in together:
        if tensor.dtype != dtype and tensor.is_floating_point():
            recast.append((tensor, tensor.dtype))
            tensor.data = tensor.data.to(dtype)
    return recast


def _recast(tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Undo `_train_in_full_precision` for one tensor (what `detach` calls)."""
    tensor.data = tensor.data.to(dtype)


def _replacement(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A specified parameter's trained value replaces the base weight: ΔW = value - W."""
    return value - weight


def _norm_modules(model: nn.Module) -> list[str]:
    """LayerNorm, RMSNorm, T5LayerNorm ...: every normalisation module, by its class name."""
    return [n for n, m in model.named_modules() if n and type(m).__name__.endswith("Norm")]


@register
class BitFit(Specify):
    kind = "bitfit"
    config_class = BitFitConfig

    def choose(self, model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]


@register
class LayerNorm(Specify):
    kind = "layernorm"
    config_class = LayerNormConfig
    peft_type = "LN_TUNING"

    config: LayerNormConfig

    def choose(self, model: nn.Module) -> list[str]:
        norms = _norm_modules(model)
        if self.config.targets is not None:
            norms = select(norms, self.config.targets, what="normalisation module")
        chosen = set(norms)
        return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in chosen]

    def peft_key(self, name: str) -> str:
        module, leaf = name.rsplit(".", 1)
        return f"{PEFT_PREFIX}{module}.ln_tuning_layers.{leaf}"

    def peft_config(self, model: nn.Module) -> dict:
        chosen = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in self.params))
        names = [n for n, _ in model.named_modules() if n]
        return {"target_modules": minimal_suffixes(chosen, names)}

    @classmethod
    def from_peft(cls, config: dict) -> dict:
        return {"kind": cls.kind, "targets": peft_patterns(config.get("target_modules"))}


@register
class Modules(Specify):
    kind = "modules"
    config_class = ModulesConfig
    config: ModulesConfig

    def choose(self, model: nn.Module) -> list[str]:
        params = [n for n, _ in model.named_parameters()]
        modules = [n for n, _ in model.named_modules() if n]
        chosen = set(select([*modules, *params], self.config.targets, what="parameter or module"))
        return [n for n in params if n in chosen or any(a in chosen for a in _ancestors(n))]


@register
class Full(Specify):
    kind = "full"
    config_class = FullConfig

    def choose(self, model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters()]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]
