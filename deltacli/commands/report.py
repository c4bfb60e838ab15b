"""Comparing runs the way the delta-tuning papers do: per method, the best setting's metric
as mean ± std over seeds, against the share of parameters trained.

A run is any delta folder `train` wrote (recipe.yaml + metrics.json); a sweep folder holds
runs and a `sweep.json` naming their method, grid point and seed. Runs outside a sweep are
grouped by their recipe's name and deltas.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
from pathlib import Path

from deltacli.commands.sweep import PLAN_FILE, read_plan
from deltacli.deltas.specify import FullConfig
from deltacli.errors import DeltacliError
from deltacli.files.text import read_mapping
from deltacli.recipe import Recipe, load_recipe
from deltacli.storage.delta_folder import LOG_FILE, METRICS_FILE, RECIPE_FILE
from deltacli.tasks.metrics import oriented


@dataclasses.dataclass
class RunResult:
    folder: Path
    method: str
    grid: dict[str, str]
    seed: int
    score: float
    metric: str
    lr: str  # the learning rate, or each delta's where they differ
    trainable: int
    share: float  # % of the model's parameters trained
    samples_per_second: float
    peak_rss_mb: float | None
    peak_gpu_gib: float | None
    wall_seconds: float
    full: bool  # every parameter trains: the reference line


@dataclasses.dataclass
class MethodRow:
    method: str
    trainable: int
    share: float
    metric: str
    mean: float
    std: float
    seeds: int
    best: dict[str, str]  # the grid point with the best mean
    lr: str  # the learning rate, or each delta's where they differ
    samples_per_second: float
    peak_rss_mb: float | None
    peak_gpu_gib: float | None
    wall_seconds: float
    runs: list[str]


def collect(paths: list[Path], metric: str | None = None) -> list[RunResult]:
    """Every finished run under `paths` (run folders or sweep folders)."""
    results = []
    for path in paths:
        if not path.is_dir():
            raise DeltacliError(f"{path} is not a run or sweep folder")
        if (path / PLAN_FILE).is_file():
            for run in _plan(path):
                if (path / run.name / METRICS_FILE).is_file():
                    results.append(_read(path / run.name, metric, run.method, run.grid, run.seed))
        elif (path / METRICS_FILE).is_file():
            results.append(_read(path, metric, None, {}, None))
        else:
            raise DeltacliError(f"{path} holds no finished run ({METRICS_FILE}) nor a {PLAN_FILE}")
    if not results:
        raise DeltacliError("no finished runs to report yet")
    return results


def _plan(folder: Path) -> list:
    try:
        return read_plan(folder)
    except (KeyError, TypeError, AttributeError) as error:
        raise DeltacliError(
            f"{folder / PLAN_FILE} is not a sweep plan as deltacli writes it ({error})"
        ) from None


def _read(folder: Path, metric: str | None, method: str | None, grid: dict, seed: int | None):
    try:
        return _result(folder, metric, method, grid, seed)
    except (KeyError, TypeError, AttributeError, ZeroDivisionError) as error:
        raise DeltacliError(
            f"{folder} is not a finished run's folder as deltacli writes it ({METRICS_FILE} or "
            f"{RECIPE_FILE} lacks {error}); leave it out of the report"
        ) from None


def learning_rates(recipe: Recipe) -> str:
    """The run's learning rate, or each delta's (`deltas.N.lr`) where they differ."""
    rates = [(delta.kind, delta.lr or recipe.train.lr) for delta in recipe.deltas]
    if len({rate for _, rate in rates}) <= 1:
        return f"{rates[0][1] if rates else recipe.train.lr:.1e}"
    return ", ".join(f"{kind} {rate:.1e}" for kind, rate in rates)


def _result(folder: Path, metric: str | None, method: str | None, grid: dict, seed: int | None):
    metrics = read_mapping(folder / METRICS_FILE, "training figures")
    recipe = load_recipe(folder / RECIPE_FILE)
    chosen = metric or recipe.train.best_metric
    if not metrics.get("eval"):
        raise DeltacliError(f"{folder} has no eval figures in {METRICS_FILE} to compare")
    if chosen not in metrics["eval"]:
        raise DeltacliError(f"{folder} has no eval {chosen} (it has {', '.join(metrics['eval'])})")
    kinds = "+".join(delta.kind for delta in recipe.deltas)
    params = metrics["params"]
    return RunResult(
        folder=folder,
        method=method or recipe.name,
        grid=grid,
        seed=recipe.train.seed if seed is None else seed,
        score=metrics["eval"][chosen],
        metric=chosen,
        lr=learning_rates(recipe),
        trainable=params["trainable"],
        share=params["trainable_percent"],
        # From the counts, not the stored rate, which runs saved before 2026-11-28 understated.
        samples_per_second=metrics["train"]["samples"] / max(metrics["train"]["seconds"], 1e-9),
        peak_rss_mb=metrics.get("peak_rss_mb"),
        peak_gpu_gib=metrics.get("peak_gpu_gib"),
        wall_seconds=metrics["wall_seconds"],
        full=kinds == FullConfig.kind or params["trainable"] == params["total"],
    )


def summarize(results: list[RunResult]) -> list[MethodRow]:
    """Per method, the grid point whose seeds score best on average (lowest for loss)."""
    rows = []
    by_method: dict[str, list[RunResult]] = {}
    for result in results:
        by_method.setdefault(result.method, []).append(result)
    for method, runs in by_method.items():
        points: dict[tuple, list[RunResult]] = {}
        for run in runs:
            points.setdefault(tuple(sorted(run.grid.items())), []).append(run)
        metric = runs[0].metric
        best = max(
            points.values(), key=lambda group: oriented(metric, _mean([r.score for r in group]))
        )
        scores = [r.score for r in best]
        rows.append(
            MethodRow(
                method=method,
                trainable=best[0].trainable,
                share=best[0].share,
                metric=best[0].metric,
                mean=_mean(scores),
                std=statistics.stdev(scores) if len(scores) > 1 else 0.0,
                seeds=len(scores),
                best=dict(best[0].grid),
                lr=best[0].lr,
                samples_per_second=_mean([r.samples_per_second for r in best]),
                peak_rss_mb=_mean_or_none([r.peak_rss_mb for r in best]),
                peak_gpu_gib=_mean_or_none([r.peak_gpu_gib for r in best]),
                wall_seconds=_mean([r.wall_seconds for r in best]),
                runs=[str(r.folder) for r in best],
            )
        )
    return sorted(rows, key=lambda row: -row.share)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return _mean(known) if known else None


def check_destinations(csv_file: Path | None, plots: Path | None) -> None:
    """Refuse, before any work, a CSV path that is taken (a user's file is never replaced)
    or a folder, and a figures path that is a file."""
    if csv_file is not None and csv_file.is_dir():
        raise DeltacliError(f"--csv {csv_file} is a folder; name a file, e.g. {csv_file}/table.csv")
    if csv_file is not None and (csv_file.exists() or csv_file.is_symlink()):
        raise DeltacliError(f"--csv {csv_file} exists; choose a new file name or remove it")
    if plots is not None and plots.exists() and not plots.is_dir():
        raise DeltacliError(f"--plots {plots} is a file; name a folder for the figures")


def write_csv(rows: list[MethodRow], path: Path) -> None:
    """The table as CSV, written beside `path` and renamed into place (parents created)."""
    fields = [f.name for f in dataclasses.fields(MethodRow)]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            values = dataclasses.asdict(row)
            writer.writerow(
                {k: str(v) if isinstance(v, (dict, list)) else v for k, v in values.items()}
            )
    partial.replace(path)


def figures(rows: list[MethodRow], results: list[RunResult], folder: Path) -> list[Path]:
    """metric-vs-share.png and curves.png (the best setting's first seed of each method)."""
    from deltacli import plots

    folder.mkdir(parents=True, exist_ok=True)
    metric = rows[0].metric
    full = [row for row in rows if any(r.full for r in results if str(r.folder) in row.runs)]
    points = [
        {"method": row.method, "share": row.share, "mean": row.mean, "std": row.std}
        for row in rows
        if row not in full and row.share > 0
    ]
    reference = {"method": full[0].method, "mean": full[0].mean} if full else None
    made = []
    if points:
        made.append(
            plots.metric_vs_share(points, metric, reference, folder / "metric-vs-share.png")
        )
    logs = {row.method: Path(row.runs[0]) / LOG_FILE for row in rows}
    made.append(
        plots.curves({k: v for k, v in logs.items() if v.is_file()}, metric, folder / "curves.png")
    )
    return made
