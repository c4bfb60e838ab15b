"""Figures (matplotlib, the optional `deltacli[plots]` extra): a run's loss curve, a sweep's
metric against the share of parameters trained (He et al.'s figure 1), and a task's metric
over a plane of the unified subspace (Yi et al.'s figure 3)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

INSTALL = "pip install 'deltacli[plots]'"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files, never a window
    import matplotlib.pyplot as plt

    return plt


def read_log(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, dict]]]:
    """(step, training loss) and (step, eval scores) from a run's metrics.jsonl."""
    losses, evals = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses.append((record["step"], record["loss"]))
        elif "eval" in record:
            evals.append((record["step"], record["eval"]))
    return losses, evals


def curves(runs: dict[str, Path], metric: str, target: Path) -> Path:
    """Training loss and the eval metric per step, one line per run (`runs`: label ->
    metrics.jsonl)."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, log in runs.items():
        losses, evals = read_log(log)
        if losses:
            left.plot(*zip(*losses, strict=True), label=label, linewidth=1)
        points = [(step, scores[metric]) for step, scores in evals if metric in scores]
        if points:
            right.plot(*zip(*points, strict=True), marker="o", label=label)
    left.set(xlabel="optimizer step", ylabel="training loss (running)", title="training loss")
    right.set(xlabel="optimizer step", ylabel=f"eval {metric}", title=f"eval {metric}")
    for axes in (left, right):
        axes.grid(alpha=0.3)
    right.legend(fontsize="small", loc="best")
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def metric_vs_share(points: list[dict], metric: str, reference: dict | None, target: Path) -> Path:
    """One point per method at (share of parameters trained, mean metric), bars for the
    seeds' spread; full fine-tuning as a horizontal line."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for point in points:
        axes.errorbar(
            point["share"], point["mean"], yerr=point["std"], fmt="o", capsize=3, label=None
        )
        axes.annotate(point["method"], (point["share"], point["mean"]), textcoords="offset points",
                      xytext=(5, 4), fontsize="small")  # fmt: skip
    if reference is not None:
        axes.axhline(reference["mean"], color="grey", linestyle="--", linewidth=1)
        left = min(point["share"] for point in points)
        label = f"{reference['method']} (100%)"
        axes.annotate(label, (left, reference["mean"]), textcoords="offset points",
                      xytext=(0, 4), fontsize="small", color="grey")  # fmt: skip
    axes.set_xscale("log")
    axes.set(xlabel="parameters trained (% of the model, log scale)", ylabel=f"eval {metric}")
    axes.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def landscape(result: dict, target: Path) -> Path:
    """The metric as a heat map over the plane's two coordinates, each method's solution a
    labelled point (`result`: what `subspace.landscape` returns)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 5))
    a, b = result["a"], result["b"]
    image = axes.imshow(
        [list(column) for column in zip(*result["values"], strict=True)],  # rows: b, columns: a
        origin="lower",
        extent=(a[0], a[-1], b[0], b[-1]),
        aspect="auto",
        cmap="viridis",
    )
    figure.colorbar(image, ax=axes, label=f"{result['metric']} ({result['rows']} examples)")
    for name, (x, y) in result["points"].items():
        axes.plot(x, y, marker="*", markersize=12, color="white", markeredgecolor="black")
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), color="white")
    axes.set(
        xlabel="first direction", ylabel="second direction",
        title=f"{result['metric']} through {result['through']}'s decoder",
    )  # fmt: skip
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target
