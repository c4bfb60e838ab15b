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

import torch

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


@dataclasses.dataclass(frozen=True)
class Combination:
    """A merge method with its per-delta weights and densities and the drop mask's seed."""

    method: str
    weights: list[float]
    densities: list[float]
    seed: int = 0

    def __call__(self, name: str, increments: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """The combined increment of tensor `name` from (delta index, τ) pairs (the deltas
        that change it; the others add nothing, but count in `linear`'s average). One pass
        per delta over tensors of W's size, never a stack of them: merging stays streamed."""
        weighted = [
            (self.weights[i], self._sparsified(name, i, tau).mul_(self.weights[i]))
            for i, tau in increments
        ]
        total = torch.zeros_like(weighted[0][1])
        for _, tau in weighted:
            total.add_(tau)
        if self.method not in ("ties", "dare_ties"):
            if self.method == "linear":
                weights = sum(self.weights)
                total.div_(weights if abs(weights) > 1e-8 else 1.0)
            return total
        positive = total >= 0  # the elected sign of each entry
        mixed, divisor = total.zero_(), torch.zeros_like(total)
        for weight, tau in weighted:
            agree = torch.where(positive, tau > 0, tau < 0)
            mixed.add_(torch.where(agree, tau, 0.0))
            if self.method == "ties":
                divisor.add_(agree, alpha=weight)
        if self.method == "ties":
            mixed.div_(torch.where(divisor == 0, 1.0, divisor))
        return mixed

    def _sparsified(self, name: str, index: int, tau: torch.Tensor) -> torch.Tensor:
        density = self.densities[index]
        if density >= 1 or self.method in ("linear", "task_arithmetic"):
            return tau
        if self.method == "ties":
            # The `keep` largest magnitudes: at or above the keep-th largest (a selection,
            # not a sort; mergekit sorts, which differs only where magnitudes tie exactly).
            keep = max(1, int(density * tau.numel()))
            magnitude = tau.abs()
            threshold = magnitude.reshape(-1).kthvalue(tau.numel() - keep + 1).values
            return tau.mul_(magnitude >= threshold)
        # DARE: the same entries for the same seed, tensor and delta, in any order of work.
        stream = self.seed + zlib.crc32(f"{index}:{name}".encode())
        generator = torch.Generator().manual_seed(stream)
        kept = torch.rand(tau.shape, generator=generator) < density
        return tau.mul_(kept).div_(density)
