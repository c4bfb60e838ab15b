"""A sweep's runs as commands of their own, several at once: in slots on this machine, or as
Slurm jobs through submitit.

Each run is `deltacli train --recipe .recipes/RUN.yaml -o RUN` (or `train --resume RUN` for
one a stopped sweep cut short), optionally behind a launcher prefix (`accelerate launch …`).
On this machine every slot gets its own share: a set of GPUs (`CUDA_VISIBLE_DEVICES`) where
there are GPUs, else its share of the CPU's threads (`OMP_NUM_THREADS`), so that runs do not
fight over the same cores. Each run's output goes to `.logs/RUN.log` in the sweep folder.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deltacli.errors import DeltacliError

EXECUTORS = ("local", "slurm", "submitit-local")
LOGS = ".logs"  # inside the sweep folder: one file a run


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    arguments: list[str]  # after `deltacli`


def slots(jobs: int, gpus: int, cores: int) -> list[dict[str, str]]:
    """The environment of each of `jobs` slots: its GPUs (as evenly as they split), or its
    share of the CPU threads."""
    if gpus:
        if jobs > gpus:
            raise DeltacliError(f"--jobs {jobs} is more than this machine's {gpus} GPU(s)")
        per = gpus // jobs
        return [
            {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(s * per, (s + 1) * per))}
            for s in range(jobs)
        ]
    threads = str(max(1, cores // jobs))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(jobs)]


def command(job: Job, launch: str | None) -> list[str]:
    prefix = shlex.split(launch) if launch else [sys.executable]
    return [*prefix, "-m", "deltacli", *job.arguments]


def run_local(
    jobs: list[Job],
    folder: Path,
    width: int,
    launch: str | None,
    finished: Callable[[Job, bool], None],
) -> list[str]:
    """Run `jobs` in `width` slots at once; `finished(job, ok)` as each ends. Returns the
    names of the runs that failed (their logs say why)."""
    import torch

    # One slot: the run has the machine, and its progress shows in the terminal.
    environments = (
        slots(width, torch.cuda.device_count(), os.cpu_count() or 1) if width > 1 else [{}]
    )
    (folder / LOGS).mkdir(exist_ok=True)
    waiting, running, failed = list(jobs), {}, []
    free = list(range(width))
    while waiting or running:
        while waiting and free:
            job, slot = waiting.pop(0), free.pop(0)
            log = (folder / LOGS / f"{job.name}.log").open("w", encoding="utf-8")
            output = {} if width == 1 else {"stdout": log, "stderr": subprocess.STDOUT}
            env = {**os.environ, **environments[slot]}
            process = subprocess.Popen(command(job, launch), env=env, **output)
            running[process] = (job, slot, log)
        for process in [p for p in running if p.poll() is not None]:
            job, slot, log = running.pop(process)
            log.close()
            free.append(slot)
            if process.returncode != 0:
                failed.append(job.name)
            finished(job, process.returncode == 0)
        time.sleep(0.2)
    return failed


def run_submitit(
    jobs: list[Job],
    folder: Path,
    width: int,
    launch: str | None,
    cluster: str,
    finished: Callable[[Job, bool], None],
) -> list[str]:
    """Submit each run as a job (`cluster`: slurm, or submitit's local executor), at most
    `width` at once, and wait for them all."""
    try:
        import submitit
        from submitit.helpers import CommandFunction
    except ImportError:
        raise DeltacliError(
            "--executor slurm needs submitit: pip install 'deltacli[slurm]'"
        ) from None
    executor = submitit.AutoExecutor(folder=folder / ".submitit", cluster=cluster)
    executor.update_parameters(name="deltacli-sweep", timeout_min=24 * 60)
    if cluster == "slurm":
        executor.update_parameters(slurm_array_parallelism=width)
    failed = []
    # Slurm runs `width` at once itself (array parallelism); the local executor does not.
    size = max(len(jobs), 1) if cluster == "slurm" else width
    for start in range(0, len(jobs), size):
        wave = jobs[start : start + size]
        submitted = [
            (job, executor.submit(CommandFunction(command(job, launch), cwd=str(Path.cwd()))))
            for job in wave
        ]
        for job, handle in submitted:
            try:
                handle.result()
                finished(job, True)
            except Exception:  # the job's own log (under .submitit) says why
                failed.append(job.name)
                finished(job, False)
    return failed
