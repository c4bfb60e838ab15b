"""LoRA (Hu et al., 2021): a low-rank reparameterisation of the update of a linear weight.

`h = W x + (alpha / r) * B A dropout(x)`, with A Kaiming-uniform and B zero, so the model's
outputs at step 0 are the base model's. In the unified view (He et al., 2022) this is a
*parallel* delta on a projection: it reads the module's input and adds to its output.

`init` picks another start, as PEFT's `init_lora_weights` does: `gaussian` (A normal with
std 1/r), or `pissa` (Meng et al., 2024: B·A the top-r singular part of W) and `olora`
(Büyükakyüz, 2024: B·A from W's QR) — these two start from W's own principal part, so W
itself trains as W − s·B₀A₀ + s·BA. Saved, such a delta is what PEFT's conversion writes: an
ordinary LoRA of rank 2r over the original base, B' = [B, −B₀] and A' = [A; A₀], so PEFT,
`merge` and every other reader see ΔW = s(BA − B₀A₀) and need no residual base.

The low-rank pair is attached as children `lora_A` / `lora_B` of the targeted module and
applied by a forward hook, so parameter names are PEFT's saved key names
(`...query.lora_A.weight`) and the base weight keeps its own name for `merge`.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
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
from deltacli.errors import DeltacliError

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
    use_dora: bool = option(
        False,
        "DoRA (Liu et al., 2024): a trained magnitude per output times the direction of "
        "W + s·B·A (norm detached, as PEFT does)",
    )
    init: Literal["default", "gaussian", "pissa", "olora"] = option(
        "default",
        "how A and B start: default (A Kaiming, B zero), gaussian (A ~ N(0, 1/r²)), pissa (W's "
        "top-r singular part) or olora (W's QR); pissa/olora save as a rank-2r LoRA",
    )


def _add_low_rank(scaling: float, module: nn.Module, args: tuple, output: torch.Tensor):
    x = args[0]
    update = module.lora_B(module.lora_A(module.lora_dropout(x.to(module.lora_A.weight.dtype))))
    return output + update.to(output.dtype) * scaling


def _add_dora(scaling: float, module: nn.Module, args: tuple, output: torch.Tensor):
    """DoRA as PEFT computes it: m/‖W + s·BA‖ rescales the base output and the low-rank
    one, the norm per output row and detached; with dropout active the base part is
    recomputed on the dropped input."""
    a, b = module.lora_A, module.lora_B
    x = args[0].to(a.weight.dtype)
    weight = _laid_out(module.weight, is_transposed(module)).to(a.weight.dtype)
    norm = (weight + scaling * (b.weight @ a.weight)).norm(dim=1).detach()
    scale = module.lora_magnitude_vector / norm
    dropout = module.lora_dropout
    if dropout.p and module.training:
        x = dropout(x)
        base = F.linear(x, weight)
    else:
        bias = getattr(module, "bias", None)
        base = output.to(a.weight.dtype) - (bias if bias is not None else 0)
    update = (scale - 1) * base + scale * b(a(x)) * scaling
    return output + update.to(output.dtype)


def _dora_increment(
    b: torch.Tensor,
    a: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    transposed: bool,
    weight: torch.Tensor,
) -> torch.Tensor:
    """m·(W + s·BA)/‖W + s·BA‖ − W, laid out like the weight."""
    base = _laid_out(weight, transposed)
    combined = base + scaling * (b @ a)
    merged = combined * (magnitude / combined.norm(dim=1))[:, None]
    return _laid_out(merged - base, transposed)


def _low_rank_increment(
    b: torch.Tensor, a: torch.Tensor, scaling: float, transposed: bool, weight: torch.Tensor
) -> torch.Tensor:
    """(alpha/r)·B·A, laid out like the weight (GPT-2's Conv1D stores W transposed)."""
    increment = (b @ a).mul_(scaling)
    return increment.T if transposed else increment


def _principal(
    weight: torch.Tensor, rank: int, scaling: float, init: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B₀, A₀) with s·B₀A₀ W's principal part, as PEFT's `pissa_init` / `olora_init` make
    them: PiSSA splits the top singular values evenly (scaled by 1/s); OLoRA takes Q's first
    r columns and R's first r rows of W = QR."""
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = (s[:rank] / scaling).sqrt()
        return u[:, :rank] * root, root[:, None] * vh[:rank]
    q, r = torch.linalg.qr(weight)
    return q[:, :rank].contiguous(), r[:rank].contiguous()


def _laid_out(update: torch.Tensor, transposed: bool) -> torch.Tensor:
    return update.T if transposed else update


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
        # pissa/olora: each target's starting pair (B₀, A₀), whose product W gives up.
        self.principal: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.config.init in ("pissa", "olora"):
            self.shardable = False  # it writes W's residual into W
        for name in self.targets:
            module = modules[name]
            in_features, out_features = features(module)
            like = trainable_like(module.weight)
            lora_a = nn.Linear(in_features, self.config.r, bias=False, **like)
            lora_b = nn.Linear(self.config.r, out_features, bias=False, **like)
            self._initialise(name, module, lora_a.weight, lora_b.weight)
            self.add_module(module, "lora_A", lora_a)
            self.add_module(module, "lora_B", lora_b)
            self.add_module(module, "lora_dropout", nn.Dropout(self.config.dropout))
            add = _add_dora if self.config.use_dora else _add_low_rank
            self.add_hook(module.register_forward_hook, partial(add, self.scaling))
            self.params[f"{name}.lora_A.weight"] = lora_a.weight
            self.params[f"{name}.lora_B.weight"] = lora_b.weight
            if self.config.use_dora:
                self._add_magnitude(name, module, like)
        self._modules = [modules[name] for name in self.targets]

    def _add_magnitude(self, name: str, module: nn.Module, like: dict) -> None:
        """DoRA's magnitude starts as each output row's norm of W (B is zero)."""
        weight = module.weight
        if not weight.is_floating_point():
            raise DeltacliError(
                f"DoRA normalises the base weight, and {name} is quantised; load the base "
                "unquantised (quantize: null) or train plain LoRA"
            )
        if self.config.init in ("pissa", "olora"):
            raise DeltacliError("use_dora with init pissa/olora is not supported; choose one")
        rows = _laid_out(weight.detach(), is_transposed(module)).to(like["dtype"])
        magnitude = nn.Parameter(rows.norm(dim=1).to(**like))
        self.add_parameter(module, "lora_magnitude_vector", magnitude)
        self.params[f"{name}.lora_magnitude_vector"] = magnitude

    def _initialise(self, name: str, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
        init = self.config.init
        if init == "default":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1 / self.config.r)
        if init in ("default", "gaussian"):
            nn.init.zeros_(b)
            return
        if a.device.type == "meta":
            return  # shapes only: nothing to decompose
        weight = module.weight
        if not weight.is_floating_point():
            raise DeltacliError(
                f"lora init={init} decomposes the base weight, and {name} is quantised; load "
                "the base unquantised (quantize: null), or use init default or gaussian"
            )
        transposed = is_transposed(module)
        original = (weight.T if transposed else weight).detach().float()
        start_b, start_a = _principal(original, self.config.r, self.scaling, init)
        with torch.no_grad():
            a.copy_(start_a)
            b.copy_(start_b)
            residual = original - self.scaling * start_b @ start_a
            weight.copy_((residual.T if transposed else residual).to(weight.dtype))
        self.principal[name] = (start_b, start_a)
        kept = weight.detach().clone()

        def restore() -> None:
            with torch.no_grad():
                back = kept.float() + self.scaling * _laid_out(start_b @ start_a, transposed)
                weight.copy_(back.to(weight.dtype))

        self.on_detach(restore)

    def switch(self, on: bool) -> None:
        """pissa/olora: off, W's principal part goes back into W (the hook stops adding BA);
        on, it leaves again."""
        if on != self.enabled and self.principal:
            sign = -1.0 if on else 1.0
            modules = dict(zip(self.targets, self._modules, strict=True))
            with torch.no_grad():
                for name, (start_b, start_a) in self.principal.items():
                    module = modules[name]
                    part = _laid_out(start_b @ start_a, is_transposed(module)) * self.scaling
                    module.weight.add_(part.to(module.weight.dtype), alpha=sign)
        self.enabled = on

    def export(self) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        """pissa/olora as PEFT converts them: rank 2r over the original base."""
        config, tensors = super().export()
        if not self.principal:
            return config, tensors
        for name, (start_b, start_a) in self.principal.items():
            a, b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            tensors[a] = torch.cat([tensors[a], start_a.to(tensors[a].dtype)], 0)
            tensors[b] = torch.cat([tensors[b], -start_b.to(tensors[b].dtype)], 1)
        return self._saved_config(), tensors

    def _saved_config(self) -> LoraConfig:
        """The config a saved delta holds: pissa/olora double r (and alpha, keeping s)."""
        if not self.principal:
            return self.config
        root = math.sqrt(2) if self.config.rslora else 2
        return dataclasses.replace(
            self.config, r=2 * self.config.r, alpha=self.config.alpha * root, init="default"
        )

    def load(self, values: dict[str, torch.Tensor]) -> None:
        """A saved delta of this kind (init_from): a plain LoRA of this rank, or the rank-2r
        form a pissa/olora delta saves (its first r directions are the trained pair)."""
        with torch.no_grad():
            for name, param in self.params.items():
                value = values[name]
                if self.principal and value.shape != param.shape:
                    value = (
                        value[: self.config.r] if ".lora_A." in name else value[:, : self.config.r]
                    )
                param.copy_(value.to(param.dtype))

    def delta_weights(self, values: dict[str, torch.Tensor]) -> dict[str, Increment]:
        if self.config.use_dora:
            return {
                f"{name}.weight": partial(
                    _dora_increment,
                    values[f"{name}.lora_B.weight"].float(),
                    values[f"{name}.lora_A.weight"].float(),
                    values[f"{name}.lora_magnitude_vector"].float(),
                    self.scaling,
                    is_transposed(module),
                )
                for name, module in zip(self.targets, self._modules, strict=True)
            }
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
        saved = self._saved_config()
        return {
            "r": saved.r,
            "lora_alpha": saved.alpha,
            "lora_dropout": saved.dropout,
            "target_modules": minimal_suffixes(self.targets, names),
            "fan_in_fan_out": any(map(is_transposed, self._modules)),
            "use_rslora": saved.rslora,
            "use_dora": saved.use_dora,
            "bias": "none",
            "init_lora_weights": "gaussian" if saved.init == "gaussian" else True,
        }

    @classmethod
    def from_peft(cls, config: dict) -> dict:
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "loftq")):
            raise DeltacliError(
                f"this PEFT adapter was saved with init_lora_weights={init} unconverted: it "
                "needs the residual base PEFT wrote beside it; save it with PEFT's "
                "path_initial_model_for_weight_conversion, which makes it an ordinary LoRA"
            )
        return {
            "kind": cls.kind,
            "r": config["r"],
            "alpha": config.get("lora_alpha", 8),
            "dropout": config.get("lora_dropout", 0.0),
            "targets": peft_patterns(config.get("target_modules")),
            "rslora": config.get("use_rslora", False),
            "init": "gaussian" if init == "gaussian" else "default",
            "use_dora": config.get("use_dora", False),
        }
