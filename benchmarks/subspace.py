"""The unified subspace on real data: fit it to LoRA, Houlsby adapter and prefix deltas
trained on GLUE SST-2, then train only z (d numbers + the head) on SST-2 and on AG News.

Prints, side by side from one run: each method's own accuracy beside its point in the
subspace; z trained through each method's decoder as a share of that method's full-space
accuracy on the same task (the paper reports 84.9% on average), with the head-only floor
that z must beat on AG News; each z decoded as the other two methods without retraining, as
a share of the target method's own accuracy (the paper: 82.6%); and the landscape figure.
Everything lands in --out; finished steps are reused when run again.

    python benchmarks/subspace.py --out /tmp/subspace
    python benchmarks/subspace.py --out /tmp/subspace --dim 8 --steps 1000 --agnews-rows 4000
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deltacli.commands.evaluate import score_delta
from deltacli.commands.subspace import decode, fit, landscape
from deltacli.recipe import load_recipe, recipe_file
from deltacli.storage.delta_folder import METRICS_FILE
from deltacli.training.runs import train
from measure import sampled_csv

METHODS = ("lora", "adapter", "prefix")
AGNEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--agnews", type=Path, default=AGNEWS, help="folder of train/test.csv")
    parser.add_argument("--agnews-rows", type=int, default=2000, help="AG News training rows")
    parser.add_argument("--agnews-eval-rows", type=int, default=1000)
    parser.add_argument("--landscape-rows", type=int, default=256)
    parser.add_argument("--figure", type=Path, help="also copy the landscape PNG here")
    parser.add_argument(
        "--quick", action="store_true", help="64 rows, 1 epoch, 20 fit steps: checks the script"
    )
    args = parser.parse_args()
    if args.quick:
        QUICK.extend(["data.max_train_rows=64", "train.epochs=1"])
        args.steps, args.agnews_rows, args.agnews_eval_rows, args.landscape_rows = 20, 64, 64, 16
    console = Console(stderr=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    sst2 = {m: run(out / "sst2" / m, m) for m in METHODS}
    space = out / "space"
    if not (space / "subspace.json").is_file():
        fit([sst2[m] for m in METHODS], space, dim=args.dim, steps=args.steps, console=console)
    fitted = json.loads((space / "subspace.json").read_text())

    z_sst2 = {m: run(out / "sst2-z" / m, "subspace", *through(space, m)) for m in METHODS}
    agnews = agnews_overrides(out / "agnews", args)
    floor = run(out / "agnews" / "head-only", "modules", *agnews, *HEAD_ONLY)
    full_agnews = {m: run(out / "agnews" / m, m, *agnews) for m in METHODS}
    z_agnews = {
        m: run(out / "agnews-z" / m, "subspace", *through(space, m), *agnews) for m in METHODS
    }
    tasks = {
        "SST-2": (sst2, z_sst2, "sst2:validation"),
        "AG News": (full_agnews, z_agnews, str(out / "agnews" / "test.csv")),
    }
    transfers = [  # each z decoded as the other two methods, against the target's own run
        {
            "task": task,
            "from": source,
            "to": target,
            "accuracy": decoded(space, target, z[source], data, out / "decoded" / task / source),
            "full": accuracy(full[target]),
        }
        for task, (full, z, data) in tasks.items()
        for source in METHODS
        for target in METHODS
        if target != source
    ]
    figure = out / "landscape"
    if not (figure / "landscape.json").is_file():
        grid = 3 if args.quick else 11
        landscape(space, figure, grid=grid, rows=args.landscape_rows, console=console)

    report = Console()
    report.print(fit_table(fitted))
    report.print(z_table(tasks, floor, args.dim))
    report.print(transfer_table(transfers))
    results = {
        "fit": fitted["scores"],
        "z": {
            task: {m: {"z": accuracy(z[m]), "full": accuracy(full[m])} for m in METHODS}
            for task, (full, z, _) in tasks.items()
        },
        "agnews_head_only": accuracy(floor),
        "transfers": transfers,
        "dim": args.dim,
        "steps": args.steps,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.figure:
        shutil.copy(figure / "landscape.png", args.figure)


QUICK: list[str] = []  # overrides of every run under --quick

# The floor z must beat on a new task: the base model with only a fresh classifier trained.
HEAD_ONLY = ["head=false", "deltas.0.targets=[classifier]", "train.lr=2e-3"]


def through(space: Path, method: str) -> list[str]:
    return [f"deltas.0.subspace={space}", f"deltas.0.through={method}"]


def run(folder: Path, method: str, *overrides: str) -> Path:
    """Train a shipped recipe with overrides into `folder` (kept when it finished before)."""
    if not (folder / METRICS_FILE).is_file():
        recipe = load_recipe(recipe_file(method, None), [*overrides, *QUICK])
        train(recipe, folder, overwrite=True)
    return folder


def agnews_overrides(folder: Path, args: argparse.Namespace) -> list[str]:
    """AG News rows sampled once (seed 0) into CSVs, and the overrides that train on them."""
    for name, rows in (("train", args.agnews_rows), ("test", args.agnews_eval_rows)):
        sampled_csv(args.agnews / f"{name}.csv", folder / f"{name}.csv", rows)
    return [
        f"data.train={folder / 'train.csv'}",
        f"data.eval={folder / 'test.csv'}",
        "data.text=text",
        "data.label=label",
    ]


def decoded(space: Path, to: str, z_delta: Path, data: str, folder: Path) -> float:
    """The z of `z_delta` written as a `to` delta and scored on `data` (no retraining)."""
    output = folder / to
    if not (output / METRICS_FILE).is_file():
        decode(space, to, output, z_delta=z_delta, overwrite=True)
    return score_delta(output, data)["accuracy"]


def accuracy(folder: Path) -> float:
    return json.loads((folder / METRICS_FILE).read_text())["eval"]["accuracy"]


def trainable(folder: Path) -> int:
    return json.loads((folder / METRICS_FILE).read_text())["params"]["trainable"]


def fit_table(fitted: dict) -> Table:
    table = Table(title=f"the fitted subspace (d = {fitted['dim']}) on SST-2 dev")
    for column in ("method", "parameters", "own accuracy", "at its point", "‖θ−Dec(Enc θ)‖/‖θ‖"):
        table.add_column(column, justify="right")
    for name, scores in fitted["scores"].items():
        table.add_row(
            name,
            f"{scores['parameters']:,}",
            f"{100 * scores['own']['accuracy']:.1f}%",
            f"{100 * scores['point']['accuracy']:.1f}%",
            f"{scores['reconstruction_error']:.3f}",
        )
    return table


def z_table(tasks: dict, floor: Path, dim: int) -> Table:
    table = Table(title=f"training only z ({dim} numbers) + the head, against the full space")
    for column in ("task", "through", "z trains", "z accuracy", "full space", "z / full"):
        table.add_column(column, justify="right")
    table.add_column("head only (floor)", justify="right")
    for task, (full, z, _) in tasks.items():
        for method in METHODS:
            table.add_row(
                task,
                method,
                f"{trainable(z[method]):,}",
                f"{100 * accuracy(z[method]):.1f}%",
                f"{100 * accuracy(full[method]):.1f}% ({trainable(full[method]):,})",
                f"{100 * accuracy(z[method]) / accuracy(full[method]):.1f}%",
                f"{100 * accuracy(floor):.1f}%" if task == "AG News" else "",
            )
    return table


def transfer_table(transfers: list[dict]) -> Table:
    table = Table(title="z decoded through another method's decoder (no retraining)")
    for column in ("task", "z trained through", "decoded as", "accuracy", "/ that method's own"):
        table.add_column(column, justify="right")
    for row in transfers:
        table.add_row(
            row["task"],
            row["from"],
            row["to"],
            f"{100 * row['accuracy']:.1f}%",
            f"{100 * row['accuracy'] / row['full']:.1f}%",
        )
    mean = sum(row["accuracy"] / row["full"] for row in transfers) / len(transfers)
    table.add_section()
    table.add_row("mean", "", "", "", f"{100 * mean:.1f}%")
    return table


if __name__ == "__main__":
    main()
