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
        that change it; the others add nothing, but count in `linear`'s average)."""
        trimmed = [
            (index, self._sparsified(name, index, tau)) for index, tau in increments
        ]  # fmt: skip
        weighted = torch.stack([self.weights[i] * tau for i, tau in trimmed])
        if self.method in ("ties", "dare_ties"):
            elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
            agree = weighted.sign() == elected
            mixed = (weighted * agree).sum(0)
            if self.method == "ties":
                weights = torch.tensor([self.weights[i] for i, _ in trimmed])
                divisor = (weights.view(-1, *[1] * mixed.ndim) * agree).sum(0)
                mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
            return mixed
        mixed = weighted.sum(0)
        if self.method == "linear":
            total = sum(self.weights)
            mixed = mixed / (total if abs(total) > 1e-8 else 1.0)
        return mixed

    def _sparsified(self, name: str, index: int, tau: torch.Tensor) -> torch.Tensor:
        density = self.densities[index]
        if density >= 1 or self.method in ("linear", "task_arithmetic"):
            return tau
        if self.method == "ties":
            keep = max(1, int(density * tau.numel()))
            order = torch.argsort(tau.abs().reshape(-1), descending=True)[:keep]
            mask = torch.zeros(tau.numel(), dtype=tau.dtype)
            mask[order] = 1
            return tau * mask.view_as(tau)
        # DARE: the same entries for the same seed, tensor and delta, in any order of work.
        stream = self.seed + zlib.crc32(f"{index}:{name}".encode())
        generator = torch.Generator().manual_seed(stream)
        mask = torch.rand(tau.shape, generator=generator) < density
        return tau * mask / density
