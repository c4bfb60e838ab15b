"""Where code runs: one accelerate `Accelerator` recipe for training and scoring alike."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

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


def reset_peak_memory() -> None:
    """Start counting peak memory afresh (one process may train several runs: a sweep)."""
    # Linux resets VmHWM; elsewhere the peak is the process's since it began.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory (MB) since `reset_peak_memory`, and peak GPU memory (GiB)."""
    try:
        status = Path("/proc/self/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        rss = int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"peak_rss_mb": round(rss, 1), "peak_gpu_gib": gpu and round(gpu, 2)}


def versions() -> dict[str, str]:
    return {
        "deltacli": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
