"""Where code runs: one accelerate `Accelerator` recipe for training and scoring alike."""

from __future__ import annotations

import accelerate
import torch
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from deltacli import __version__


def make_accelerator(cpu: bool = False, **options) -> Accelerator:
    """An `Accelerator` on the GPU where there is one, else on the CPU.

    accelerate must be told `cpu=True` on a machine without a GPU: without it, processes
    started by `accelerate launch --multi_gpu` on CPUs each run alone (world size 1) instead
    of joining one gloo group.
    """
    has_device = torch.cuda.is_available() or torch.backends.mps.is_available()
    if AcceleratorState._shared_state and not torch.distributed.is_initialized():
        # One process may run several jobs (the library, tests) with different precisions;
        # accelerate keeps one global state, which each job sets afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu or not has_device, **options)


def versions() -> dict[str, str]:
    return {
        "deltacli": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
