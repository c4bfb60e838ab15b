"""SIFT (Song et al., ICML 2024, "Sparse is Enough in Fine-tuning Pre-trained Large Language
Models"): train a small, gradient-chosen set of weight entries and nothing else.

Each targeted matrix W keeps its dense values frozen; the trainable state is a k-vector of
increments at fixed flat indices, so AdamW's state is O(k). W never receives a gradient:
an autograd tap after the layer turns the output gradient into the gradient of the k chosen
entries (one dense dW is formed transiently in the backward and dropped at once), and before
each forward the current increments are written into W at their indices, so the update of
step t is in the forward of step t+1 (the reference implementation lags one step).

Indices are chosen before training by `calibrate`: the k = ceil(density × size) entries with
the largest |gradient| accumulated over the first batches (summed over processes, so every
rank picks the same), or by magnitude, or at random; or read from a saved mask.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import nn

from deltacli.config.schema import AT_LEAST_ONE, DENSITY, option
from deltacli.deltas.base import (
    PEFT_PREFIX,
    Delta,
    DeltaConfig,
    Increment,
    register,
    trainable_like,
)
from deltacli.deltas.targets import is_transposed, linear_targets, modules_by_name
from deltacli.errors import DeltacliError

# SIFT's GLUE setting: the attention projections q, k, v, o.
ROLES = ("query", "key", "value", "output")
MASK_FILE = "masks.safetensors"


@dataclasses.dataclass
class SiftConfig(DeltaConfig):
    density: float = option(
        0.008, "share of each targeted matrix that trains (paper: 0.008 on GLUE)", DENSITY
    )
    targets: list[str] | None = option(
        None, "module patterns; null: the attention projections; [all-linear]: every linear"
    )
    select: Literal["gradient", "magnitude", "random"] = option(
        "gradient", "how the trained entries are chosen"
    )
    select_batches: int = option(
        1, "batches whose accumulated |gradient| chooses (no update)", AT_LEAST_ONE
    )
    mask: str | None = option(
        None, "reuse the indices saved by `deltacli sparsify --from-gradients` (a directory)"
    )
    counts: list[int] | None = option(
        None,
        "entries kept per target, in order (written by sparsify --by global); null: from density",
    )


class _GradientTap(torch.autograd.Function):
    """Identity on the layer's output whose backward yields the gradient of the chosen
    entries of W: gather(dL/dW) computed from the output gradient and the layer's input."""

    @staticmethod
    def forward(ctx, output, x, values, indices, transposed):
        ctx.save_for_backward(x, indices)
        ctx.transposed = transposed
        ctx.values_dtype = values.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        x, indices = ctx.saved_tensors
        g = grad_output.reshape(-1, grad_output.shape[-1])
        inputs = x.reshape(-1, x.shape[-1]).to(g.dtype)
        dense = inputs.T @ g if ctx.transposed else g.T @ inputs
        return grad_output, None, dense.reshape(-1)[indices].to(ctx.values_dtype), None, None


@dataclasses.dataclass
class _Site:
    """One targeted matrix: its module, and the state of its sparse increment."""

    module: nn.Module
    count: int
    ready: bool = False


@register
class Sift(Delta):
    kind = "sift"
    config_class = SiftConfig
    mergeable = True
    shardable = False  # writes base + increment into W at its indices
    config: SiftConfig

    def attach(self, model: nn.Module) -> None:
        modules = modules_by_name(model)
        self.targets = sift_targets(model, self.config.targets)
        mask = _read_mask(Path(self.config.mask), self.targets) if self.config.mask else None
        if mask is not None:
            counts = [len(mask[f"{name}.sift_indices"]) for name in self.targets]
        else:
            counts = self.config.counts or [
                math.ceil(self.config.density * modules[name].weight.numel())
                for name in self.targets
            ]
        if len(counts) != len(self.targets):
            raise DeltacliError(
                f"sift counts lists {len(counts)} entries for {len(self.targets)} targets"
            )
        self.sites: dict[str, _Site] = {}
        for name, count in zip(self.targets, counts, strict=True):
            module = modules[name]
            weight = module.weight
            if not weight.is_floating_point():
                raise DeltacliError(
                    f"SIFT writes into the weights it trains, and {name} is quantised; load "
                    "the base unquantised (quantize: null) or train lora, ia3 or adapters"
                )
            device = weight.device
            values = nn.Parameter(torch.zeros(count, **trainable_like(weight)))
            self.add_parameter(module, "sift_values", values)
            self.add_buffer(
                module, "sift_indices", torch.zeros(count, dtype=torch.long, device=device)
            )
            # The base values it overwrites, kept exactly (to restore them on detach).
            self.add_buffer(
                module, "sift_base", torch.zeros(count, dtype=weight.dtype, device=device)
            )
            site = self.sites[name] = _Site(module, count)
            self.on_detach(partial(_restore, site))
            self.add_hook(module.register_forward_pre_hook, partial(self._sync, name))
            self.add_hook(module.register_forward_hook, partial(self._tap, name))
            self.params[f"{name}.sift_values"] = values
        if mask is not None and device.type != "meta":
            self.load(mask)

    def switch(self, on: bool) -> None:
        """Off: the base's values back at the chosen entries; on again, the next pass
        writes the increments."""
        if not on:
            for site in self.sites.values():
                _restore(site)
        self.enabled = on

    def _sync(self, name: str, module: nn.Module, args: tuple) -> None:
        """Write base + increment into W at the chosen indices, at every pass: k entries,
        cheap beside the layer's matmul, and no cache to go stale (a fused optimizer step
        changes the increment without bumping its version counter)."""
        if not self.sites[name].ready:
            return
        values = module.sift_values
        with torch.no_grad():
            flat = module.weight.view(-1)
            base = module.sift_base.to(values.dtype)
            flat[module.sift_indices] = (base + values).to(flat.dtype)

    def _tap(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor):
        if not (self.sites[name].ready and torch.is_grad_enabled()):
            return output
        return _GradientTap.apply(
            output, args[0], module.sift_values, module.sift_indices, is_transposed(module)
        )

    def calibrate(self, model: nn.Module, batches, accelerator) -> None:
        """Choose the indices (unless a mask gave them): largest accumulated |gradient| over
        the first `select_batches` batches, summed over processes; or magnitude, or random."""
        if all(site.ready for site in self.sites.values()):
            return
        weights = {name: site.module.weight for name, site in self.sites.items()}
        if self.config.select == "gradient":
            scores = _gradient_scores(
                model, batches, accelerator, weights, self.config.select_batches
            )
        elif self.config.select == "magnitude":
            scores = {name: w.detach().abs() for name, w in weights.items()}
        else:
            generator = torch.Generator().manual_seed(0)
            scores = {
                name: torch.rand(w.shape, generator=generator).to(w.device)
                for name, w in weights.items()
            }
        chosen = {}
        for name, site in self.sites.items():
            top = torch.topk(scores[name].reshape(-1).float(), site.count).indices
            chosen[f"{name}.sift_indices"] = top.sort().values
        self.load(chosen)

    def load(self, values: dict[str, torch.Tensor]) -> None:
        """Indices (and increments, where given) from a saved delta or mask."""
        with torch.no_grad():
            for name, site in self.sites.items():
                module = site.module
                if f"{name}.sift_indices" in values:
                    module.sift_indices.copy_(values[f"{name}.sift_indices"])
                    module.sift_base.copy_(module.weight.detach().view(-1)[module.sift_indices])
                if f"{name}.sift_values" in values:
                    module.sift_values.copy_(values[f"{name}.sift_values"])
                site.ready = True

    def saved_names(self) -> list[str]:
        return [key for name in self.targets for key in increment(name, None, None)]

    def export(self) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        tensors = {}
        for name, site in self.sites.items():
            module = site.module
            tensors |= increment(name, module.sift_indices.detach(), module.sift_values.detach())
        counts = [site.count for site in self.sites.values()]
        config = dataclasses.replace(self.config, mask=None, counts=self.config.counts and counts)
        return config, tensors

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.sift_indices": site.module.sift_indices for name, site in self.sites.items()
        }

    def load_extra_state(self, values: dict[str, torch.Tensor]) -> None:
        self.load(values)

    def densities(self) -> dict[str, float]:
        return {name: site.count / site.module.weight.numel() for name, site in self.sites.items()}

    def delta_weights(self, values: dict[str, torch.Tensor]) -> dict[str, Increment]:
        return {
            f"{name}.weight": partial(
                _scatter,
                values[f"{name}.sift_indices"].long(),
                values[f"{name}.sift_values"].float(),
            )
            for name in self.targets
        }


def increment(module: str, indices: torch.Tensor | None, values: torch.Tensor | None) -> dict:
    """A sparse increment of `module`'s weight under the names a SIFT delta saves it by: flat
    indices into the weight and the values added there."""
    return {f"{module}.sift_indices": indices, f"{module}.sift_values": values}


def sift_targets(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """The linear modules a SIFT delta with these patterns trains (null: the preset)."""
    return linear_targets(model, patterns, ROLES, "SIFT")


def _gradient_scores(
    model, batches, accelerator, weights: dict, count: int
) -> dict[str, torch.Tensor]:
    """Σ |∂L/∂W| over `count` batches for each targeted W. Each batch's gradient is first
    averaged over the processes, as training's would be, so N processes with batch b choose
    what one process with batch N·b would (and every process the same)."""
    scores = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    try:
        for step, batch in enumerate(batches):
            if step == count:
                break
            model(**batch).loss.backward()
            for name, weight in weights.items():
                scores[name] += accelerator.reduce(weight.grad, reduction="mean").abs().float()
                weight.grad = None
    finally:
        for weight in weights.values():
            weight.requires_grad_(False)
            weight.grad = None
    for param in model.parameters():
        param.grad = None  # the selection batches update nothing
    return scores


def _restore(site: _Site) -> None:
    """Put the base values back where the increments were written."""
    if site.ready:
        module = site.module
        with torch.no_grad():
            module.weight.view(-1)[module.sift_indices] = module.sift_base.to(module.weight.dtype)


def _scatter(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    increment = torch.zeros(weight.numel(), dtype=torch.float32)
    increment[indices] = values
    return increment.view(weight.shape)


def _read_mask(folder: Path, targets: list[str]) -> dict[str, torch.Tensor]:
    """Indices by `{module}.sift_indices` from a mask directory or a saved SIFT delta."""
    files = [folder / MASK_FILE, folder / "adapter_model.safetensors"]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        raise DeltacliError(
            f"{folder} holds no {MASK_FILE}; make one with `deltacli sparsify --from-gradients`"
        )
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(path).items()}
    missing = [t for t in targets if f"{t}.sift_indices" not in tensors]
    if missing:
        raise DeltacliError(f"the mask in {folder} has no indices for {missing[0]}")
    return {f"{t}.sift_indices": tensors[f"{t}.sift_indices"] for t in targets}
