"""Checkpoints of a training run, and finding the run that `--resume` continues.

A checkpoint is a folder `checkpoints/step-NNNNNN` inside the run's scratch folder:

```
state.safetensors     the trainable tensors, SIFT's indices, the best epoch's tensors,
                      AdamW's moments, the data order's generator
state.json            step, epoch and position in it, schedule, throughput, eval history,
                      best epoch, optimizer hyper-parameters, the log's length
rng-RANK.safetensors  each process's torch (and CUDA) random state
rng-RANK.json         each process's Python and NumPy random state
```

Tensors are safetensors and the rest JSON: nothing is pickled. A checkpoint is written to a
hidden sibling and renamed into place, so a kill while saving leaves the previous one whole.
With the same number of processes, a resumed run repeats exactly what the uninterrupted run
would have done: the same batches in the same order, the same dropout, the same updates.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from deltacli.errors import DeltacliError
from deltacli.files.outputs import (
    CHECKPOINTS,
    MARKER,
    has_checkpoint,
    owner_alive,
    scratch_folders,
)
from deltacli.files.tensors import save_tensors

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints(run: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and p.is_dir())


def write_checkpoint(
    run: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """The main process's part of a checkpoint, written beside the final name, then renamed
    into place; older checkpoints beyond `keep` are removed."""
    final = run / CHECKPOINTS / checkpoint_name(step)
    partial = final.with_name(f".{final.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for file in run.glob(f"{CHECKPOINTS}/.rng-*"):  # each process's random state
            file.rename(partial / file.name.removeprefix("."))
        save_tensors(_contiguous(tensors), partial / STATE_TENSORS)
        (partial / STATE_JSON).write_text(json.dumps(state), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        kept = checkpoints(run)
        where = f"; the last good checkpoint is {kept[-1]}" if kept else ""
        raise DeltacliError(
            f"cannot write the checkpoint at step {step} ({error}){where}"
        ) from None
    for old in checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_random_state(run: Path, rank: int) -> None:
    """This process's random generators, staged for the next `write_checkpoint`."""
    tensors, state = random_state()
    folder = run / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, folder / f".rng-{rank}.safetensors")
    (folder / f".rng-{rank}.json").write_text(json.dumps(state), encoding="utf-8")


def read_checkpoint(
    path: Path, rank: int, processes: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's tensors and state, after checking it was written by as many processes
    as this run has (each continues its own random state)."""
    try:
        state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(path / STATE_TENSORS)
    except (OSError, ValueError) as error:
        raise DeltacliError(f"{path} is not a readable checkpoint ({error})") from None
    if state["processes"] != processes:
        raise DeltacliError(
            f"{path} was written by {state['processes']} process(es); resume it with as many "
            f"(this run has {processes})"
        )
    return tensors, state


def restore_random_state(path: Path, rank: int) -> None:
    """Put this process's random generators back as the checkpoint found them."""
    set_random_state(
        load_file(path / f"rng-{rank}.safetensors"),
        json.loads((path / f"rng-{rank}.json").read_text(encoding="utf-8")),
    )


def random_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random generator a training step draws from: torch (CPU and CUDA), NumPy,
    Python's."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, position, has_gauss, cached],
    }
    return tensors, state


def set_random_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, position, has_gauss, cached = state["numpy"]
    np.random.set_state(
        (kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached)
    )
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def find_run(output: Path) -> tuple[Path, Path]:
    """The scratch folder of the run that was to become `output`, and its newest checkpoint:
    the run may have been killed, stopped, or never renamed into place."""
    runs = [f for f in scratch_folders(output) if ".tmp-" in f.name and has_checkpoint(f)]
    finished = (output / MARKER).is_file()
    if not runs:
        if finished:
            raise DeltacliError(
                f"{output} is a finished run: there is nothing to resume (train a new one "
                "with --output elsewhere, or --overwrite it)"
            )
        if output.is_dir():
            raise DeltacliError(
                f"{output} is not a run deltacli wrote, and no interrupted run writing it was "
                "found: pass the -o path of the run to resume"
            )
        raise DeltacliError(
            f"no checkpoint of a run writing {output} was found (checkpoints are kept in "
            f"{output.parent}/.{output.name}.tmp-*/{CHECKPOINTS} until the run finishes)"
        )
    live = [f for f in runs if owner_alive(f)]
    if live:
        raise DeltacliError(f"{live[0]} belongs to a run that is still going (its process lives)")
    newest = max(runs, key=lambda f: checkpoints(f)[-1].name)
    checkpoint = checkpoints(newest)[-1]
    if finished and (output / MARKER).stat().st_mtime > checkpoint.stat().st_mtime:
        raise DeltacliError(
            f"{output} holds a run that finished after this checkpoint ({checkpoint}) was "
            "written; resuming would replace it: move it away first, or delete the "
            f"interrupted run's folder {newest}"
        )
    return newest, checkpoint


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
