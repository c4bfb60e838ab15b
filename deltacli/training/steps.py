"""Which examples each optimizer step trains on, and which share of them each micro-batch of
each process takes — the same examples for every way of splitting a step.

A step takes the next `batch_size × grad_accum × processes` examples of the epoch's order.
Micro-batch `m` of process `p` takes the `(m·processes + p)`-th slice of `batch_size` of
them, so one process at batch 8, batch 4 × `grad_accum` 2, 2 processes × batch 4 and 2
processes × batch 2 × `grad_accum` 2 all train on the same 8 examples per step — the last,
shorter step included. A process whose slice is empty (the end of an epoch) still takes part
in every micro-step, with a stand-in example whose loss counts zero: collective operations
(DDP's gradient all-reduce, FSDP's gathers) need every process.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    indices: list[int]  # rows of the training table
    counts: bool  # False: a stand-in that keeps this process in step; its loss is zeroed


@dataclasses.dataclass(frozen=True)
class StepPlan:
    examples: int
    batch_size: int
    accum: int
    processes: int
    rank: int

    @property
    def per_step(self) -> int:
        return self.batch_size * self.accum * self.processes

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch."""
        return math.ceil(self.examples / self.per_step)

    def step_examples(self, order: list[int], step: int) -> list[int]:
        """Every example of one step, over all its micro-batches and processes."""
        return order[step * self.per_step : (step + 1) * self.per_step]

    def micro_batches(self, order: list[int], step: int) -> list[MicroBatch]:
        """This process's micro-batches of one step, always `accum` of them."""
        group = self.step_examples(order, step)
        size = self.batch_size
        batches = []
        for micro in range(self.accum):
            start = (micro * self.processes + self.rank) * size
            indices = group[start : start + size]
            batches.append(MicroBatch(indices, True) if indices else MicroBatch(group[:1], False))
        return batches


# Devices with torch's fused (single-kernel) AdamW; elsewhere the multi-tensor one runs.
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu", "mps")


def adamw(groups: list[dict], lr: float, fused: bool) -> torch.optim.AdamW:
    """AdamW whose update runs as one kernel per parameter group where torch has one (same
    update: the moments and the step are the multi-tensor version's to float rounding).
    It replaces a dozen elementwise kernels per tensor, which at deltas' sizes are launch
    overhead, not arithmetic (benchmarks/cpu_step.py measures the step with and without)."""
    params = [param for group in groups for param in group["params"]]
    fused = fused and all(
        param.is_floating_point() and param.device.type in FUSED_ADAMW_DEVICES for param in params
    )
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warm-up to the peak rate over `warmup` steps, then linear decay to 0 at `total`:
    transformers' `get_linear_schedule_with_warmup`, written here because importing it
    imports transformers' Trainer utilities and PEFT with them (3 s at every start)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_linear_factor, warmup=warmup, total=total)
    )


def _linear_factor(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))
