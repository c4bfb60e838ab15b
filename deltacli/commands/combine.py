"""How several deltas' increments to one tensor become one: the merge methods of the
model-merging literature, applied to every linear kind's ΔW.

Each delta's increment τᵢ = ΔWᵢ(W) is computed against the same base tensor W, then
- `task_arithmetic` (Ilharco et al., 2023): Σ wᵢ τᵢ;
- `linear`: Σ wᵢ τᵢ / Σ wᵢ (a weighted average of the tuned models);
- `ties` (Yadav et al., 2023), as mergekit does it: each τᵢ trimmed to its `density` share
  of largest magnitudes, the sign of Σ wᵢ τᵢ elected per entry, and the weighted mean of the
  entries that agree with it;
- `dare_linear` / `dare_ties` (Yu et al., 2024): each τᵢ keeps a seeded random `density`
  share of its entries, rescaled by 1 / density, then summed (or elected as TIES does,
  without the mean, as mergekit's `dare_ties`).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable

import torch

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


@dataclasses.dataclass(frozen=True)
class Combination:
    """A merge method with its per-delta weights and densities and the drop mask's seed."""

    method: str
    weights: list[float]
    densities: list[float]
    seed: int = 0

    def __call__(
        self, name: str, increments: list[tuple[int, Callable[[], torch.Tensor]]]
    ) -> torch.Tensor:
        """The combined increment of tensor `name` from (delta index, τ's maker) pairs (the
        deltas that change it; the others add nothing, but count in `linear`'s average).

        The τs are made one at a time, never held together: a first pass sums them (and
        finds each one's TIES threshold), a second — for the sign-electing methods — makes
        each again and keeps the entries that agree with the elected sign. Memory is a few
        tensors of W's size whatever the number of deltas (a LoRA's τ is B·A again; DARE's
        drop mask is seeded per delta and tensor, so it is the same mask)."""
        thresholds: dict[int, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for index, make in increments:
            tau = self._sparsified(name, index, make(), thresholds).mul_(self.weights[index])
            total = tau if total is None else total.add_(tau)
            del tau
        if self.method not in ("ties", "dare_ties"):
            if self.method == "linear":
                weights = sum(self.weights)
                total.div_(weights if abs(weights) > 1e-8 else 1.0)
            return total
        positive = total >= 0  # the elected sign of each entry
        mixed = total.zero_()
        # TIES divides by the summed weights of the agreeing deltas: with one weight for all
        # (the usual case) a count of them, a byte per entry, times that weight.
        weights = {self.weights[index] for index, _ in increments}
        counted = len(weights) == 1 and len(increments) < 256
        divisor: torch.Tensor | None = None
        for index, make in increments:
            weight = self.weights[index]
            tau = self._sparsified(name, index, make(), thresholds).mul_(weight)
            agree = tau > 0
            torch.where(positive, agree, tau < 0, out=agree)
            mixed.add_(tau.mul_(agree))
            del tau
            if self.method != "ties":
                continue
            if divisor is None:
                divisor = agree.to(torch.uint8) if counted else agree.float().mul_(weight)
            elif counted:
                divisor.add_(agree)
            else:
                divisor.add_(agree, alpha=weight)
        if self.method == "ties":
            divisor = divisor.to(mixed.dtype).mul_(weights.pop()) if counted else divisor
            mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
        return mixed

    def _sparsified(
        self, name: str, index: int, tau: torch.Tensor, thresholds: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        density = self.densities[index]
        if density >= 1 or self.method in ("linear", "task_arithmetic"):
            return tau
        if self.method == "ties":
            # The `keep` largest magnitudes: at or above the keep-th largest (a selection,
            # not a sort; mergekit sorts, which differs only where magnitudes tie exactly).
            if index not in thresholds:
                thresholds[index] = _kth_magnitude(tau, max(1, int(density * tau.numel())))
            threshold = thresholds[index]
            return tau.mul_((tau >= threshold).logical_or_(tau <= -threshold))
        # DARE: the same entries for the same seed, tensor and delta, in any order of work.
        stream = self.seed + zlib.crc32(f"{index}:{name}".encode())
        generator = torch.Generator().manual_seed(stream)
        kept = torch.rand(tau.shape, generator=generator) < density
        return tau.mul_(kept).div_(density)


def _kth_magnitude(tau: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep`-th largest |τ|: numpy's in-place partition of one copy of the magnitudes
    (torch's `kthvalue` also makes int64 indices: four times the memory)."""
    magnitude = tau.detach().abs().reshape(-1).cpu().numpy()
    position = magnitude.size - keep
    magnitude.partition(position)
    return torch.tensor(magnitude[position], dtype=tau.dtype)
