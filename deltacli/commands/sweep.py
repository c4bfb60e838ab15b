"""Sweeps: recipes × a grid of settings × seeds, each a normal run under one folder.

The delta-tuning literature compares methods by accuracy against the share of parameters
trained, over learning rates and seeds; a sweep runs that grid with `train`'s own machinery.
A sweep interrupted (Ctrl-C, a kill, a full disk) and started again skips the runs that
finished and resumes the one that was cut short from its checkpoint. `sweep.json` records
the plan for `deltacli report`.

A grid value may be relative to each recipe's own: `train.lr=x0.5,x1,x2` halves, keeps and
doubles every method's learning rate, so one grid fits methods whose scales differ.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from deltacli.commands.parallel import LOGS, Job, run_local, run_submitit
from deltacli.errors import DeltacliError
from deltacli.files.outputs import MARKER, has_checkpoint, scratch_folders
from deltacli.files.text import read_mapping
from deltacli.recipe import (
    Recipe,
    apply_override,
    dump_recipe,
    load_recipe,
    parse_recipe,
    recipe_file,
    recipe_to_dict,
    set_value,
)

PLAN_FILE = "sweep.json"
_RELATIVE = re.compile(r"^x(\d+(\.\d+)?([eE][-+]?\d+)?)$")


@dataclasses.dataclass
class Axis:
    """One `--grid KEY=V1,V2,…`: a dotted recipe key and its values (as typed: YAML text)."""

    key: str
    values: list[str]

    @classmethod
    def parse(cls, text: str) -> Axis:
        key, sep, values = text.partition("=")
        if not sep or not key or not values:
            raise DeltacliError(
                f"--grid {text!r} must look like KEY=V1,V2, e.g. train.lr=1e-4,1e-3"
            )
        return cls(key, [v.strip() for v in values.split(",")])


@dataclasses.dataclass
class Run:
    """One point of the sweep: a recipe, its grid values, a seed, and where it writes."""

    name: str
    method: str
    source: str  # a shipped recipe's name or a recipe file
    grid: dict[str, str]
    seed: int

    def status(self, folder: Path) -> str:
        """done, resumable (a checkpoint of an interrupted attempt), or to run."""
        output = folder / self.name
        if (output / MARKER).is_file():
            return "done"
        if any(has_checkpoint(f) for f in scratch_folders(output)):
            return "resumable"
        return "to run"


def plan(sources: list[str], axes: list[Axis], seeds: list[int]) -> list[Run]:
    """Every combination, recipe by recipe (a recipe's runs stay together)."""
    if not sources:
        raise DeltacliError("give the methods to compare: --methods lora,adapter or --recipe FILE")
    runs = []
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise DeltacliError(f"--seeds lists {repeated[0]} more than once; list each seed once")
    for source in sources:
        method = Path(source).stem
        for values in itertools.product(*(axis.values for axis in axes)):
            grid = {axis.key: value for axis, value in zip(axes, values, strict=True)}
            for seed in seeds:
                parts = [method, *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in grid.items())]
                name = _safe("--".join([*parts, f"seed={seed}"]))
                runs.append(Run(name, method, source, grid, seed))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise DeltacliError("two runs of the sweep would share a folder; name the recipes apart")
    return runs


def run_recipe(run: Run, overrides: list[str], settings: dict[str, Any]) -> Recipe:
    """The run's resolved recipe: the source (read once), the sweep's settings and
    overrides, its grid point and its seed. A relative value (`x2`) multiplies the number
    the recipe resolves to (its own or the default) and is set as that typed number."""
    file = (
        Path(run.source)
        if Path(run.source).suffix in (".yaml", ".yml")
        else recipe_file(run.source, None)
    )
    base = load_recipe(file, overrides, settings)
    raw = recipe_to_dict(base)
    for key, value in run.grid.items():
        relative = _RELATIVE.match(value)
        if relative:
            set_value(raw, key, float(relative.group(1)) * _lookup(raw, key))
        else:
            apply_override(raw, f"{key}={value}")
    set_value(raw, "train.seed", run.seed)
    set_value(raw, "name", run.name)
    return parse_recipe(raw)


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data.get(part)
    if not isinstance(data, (int, float)) or isinstance(data, bool):
        raise DeltacliError(f"--grid {key}=xN needs a number at {key} in every recipe")
    return data


def _safe(name: str) -> str:
    return re.sub(r"[^\w.=+-]", "_", name)


def write_plan(
    folder: Path, runs: list[Run], axes: list[Axis], seeds: list[int], extra: dict
) -> None:
    _check_same_settings(folder, extra)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "runs": [dataclasses.asdict(run) for run in runs],
        "grid": {axis.key: axis.values for axis in axes},
        "seeds": seeds,
        **extra,
    }
    scratch = folder / f".{PLAN_FILE}.tmp"
    scratch.write_text(json.dumps(data, indent=1), encoding="utf-8")
    scratch.replace(folder / PLAN_FILE)


def _check_same_settings(folder: Path, extra: dict) -> None:
    """A sweep folder is one experiment: its finished runs count as done only for the same
    overrides, model and data. (New methods, grid values or seeds add runs; that is fine.)"""
    if not (folder / PLAN_FILE).is_file():
        return
    earlier = read_mapping(folder / PLAN_FILE, "a sweep plan")
    for key in ("overrides", "settings"):
        before, now = earlier.get(key), extra.get(key)
        if before is not None and _comparable(before) != _comparable(now):
            raise DeltacliError(
                f"{folder} holds a sweep with other {key} ({before or 'none'}; now "
                f"{now or 'none'}): its runs would not match; sweep into another folder"
            )


def _comparable(value: object) -> object:
    """Settings with paths made absolute (the sweep may be restarted from elsewhere)."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if isinstance(value, str) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def read_plan(folder: Path) -> list[Run]:
    data = read_mapping(folder / PLAN_FILE, "a sweep plan")
    return [Run(**run) for run in data["runs"]]


def execute(
    folder: Path,
    runs: list[Run],
    recipe_of: Callable[[Run], Recipe],
    console: Console,
    launch: str | None = None,
    jobs: int = 1,
    executor: str = "local",
) -> dict[str, int]:
    """Run what is not done yet, resuming the run a stopped sweep cut short; returns how many
    runs were done before, trained now, resumed. One at a time in this process by default;
    as commands of their own with `--jobs N` (N at once), a launcher prefix, or an executor
    other than `local` (`commands.parallel`)."""
    if jobs == 1 and executor == "local" and not launch:
        return _in_process(folder, runs, recipe_of, console)
    counts = {"already done": 0, "trained": 0, "resumed": 0}
    pending = []
    for run in runs:
        status = run.status(folder)
        if status == "done":
            counts["already done"] += 1
            continue
        counts["resumed" if status == "resumable" else "trained"] += 1
        pending.append(Job(run.name, _arguments(folder, run, recipe_of(run), status)))
    done = []

    def finished(job: Job, ok: bool) -> None:
        done.append(job)
        state = "[green]done[/]" if ok else "[red]failed[/]"
        console.print(f"[bold]sweep {len(done)}/{len(pending)}[/] {escape(job.name)} {state}")

    if executor == "local":
        failed = run_local(pending, folder, jobs, launch, finished)
    else:
        cluster = "slurm" if executor == "slurm" else "local"
        failed = run_submitit(pending, folder, jobs, launch, cluster, finished)
    if failed:
        raise DeltacliError(
            f"{len(failed)} run(s) failed ({', '.join(failed)}); their logs are in "
            f"{folder / LOGS}; start the sweep again to resume them"
        )
    return counts


def _in_process(
    folder: Path, runs: list[Run], recipe_of: Callable[[Run], Recipe], console: Console
) -> dict[str, int]:
    from deltacli.training.logs import progress_bars
    from deltacli.training.runs import resume, train

    counts = {"already done": 0, "trained": 0, "resumed": 0}
    with progress_bars(console) as progress:
        overall = progress.add_task(f"sweep {folder.name}", total=len(runs))
        for run in runs:
            status = run.status(folder)
            output = folder / run.name
            if status == "done":
                counts["already done"] += 1
            elif status == "resumable":
                resume(output, console=console, progress=progress)
                counts["resumed"] += 1
            else:
                train(recipe_of(run), output, console=console, progress=progress)
                counts["trained"] += 1
            progress.advance(overall)
    return counts


def _arguments(folder: Path, run: Run, recipe: Recipe, status: str) -> list[str]:
    """The `deltacli` command line of one run: resume it, or train its resolved recipe."""
    if status == "resumable":
        return ["train", "--resume", str(folder / run.name)]
    recipes = folder / ".recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / f"{run.name}.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    return ["train", "--recipe", str(recipes / f"{run.name}.yaml"), "-o", str(folder / run.name)]


def listing(folder: Path, runs: list[Run]) -> list[dict]:
    """What `--dry-run` shows: every run, its grid point, seed and status."""
    return [
        {
            "run": run.name,
            "method": run.method,
            **run.grid,
            "seed": run.seed,
            "status": run.status(folder),
        }
        for run in runs
    ]
