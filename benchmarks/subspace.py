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
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deltacli.commands.evaluate import score_delta
from deltacli.commands.subspace import decode, fit, landscape
from deltacli.recipe import load_recipe, recipe_file
from deltacli.storage.delta_folder import METRICS_FILE
from deltacli.training.runs import train
from measure import sampled_csv, write_results

METHODS = ("lora", "adapter", "prefix")
AGNEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", default="42,43,44", help="seeds of every z run")
    parser.add_argument(
        "--head-lrs", default="1e-2,1e-1,3e-1", help="learning rates of the head-only floor"
    )
    parser.add_argument("--agnews", type=Path, default=AGNEWS, help="folder of train/test.csv")
    parser.add_argument("--agnews-rows", type=int, default=1000, help="AG News training rows")
    parser.add_argument("--agnews-eval-rows", type=int, default=1000)
    parser.add_argument("--landscape-rows", type=int, default=256)
    parser.add_argument("--grid", type=int, default=11, help="landscape points per side")
    parser.add_argument("--figure", type=Path, help="also copy the landscape PNG here")
    parser.add_argument(
        "--quick", action="store_true", help="64 rows, 1 epoch, 20 fit steps: checks the script"
    )
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    head_lrs = args.head_lrs.split(",")
    if args.quick:
        QUICK.extend(["data.max_train_rows=64", "train.epochs=1"])
        args.steps, args.agnews_rows, args.agnews_eval_rows, args.landscape_rows = 20, 64, 64, 16
        args.grid = 3
    console = Console(stderr=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    agnews = agnews_overrides(out / "agnews", args)
    data = {"SST-2": [], "AG News": agnews}
    floors = {
        task: {lr: run(out / key / f"head-only-{lr}", "modules", *data[task], *head_only(lr))
               for lr in head_lrs}
        for task, key in (("AG News", "agnews"), ("SST-2", "sst2"))
    }  # fmt: skip
    agnews_full = {m: run(out / "agnews" / m, m, *agnews) for m in METHODS}
    full = {"SST-2": {m: run(out / "sst2" / m, m) for m in METHODS}, "AG News": agnews_full}
    space = fitted_space(out / "space", [full["SST-2"][m] for m in METHODS], args, console)
    z = {
        task: {
            m: [run(out / f"{key}-z" / f"{m}-{seed}", "subspace", *through(space, m),
                    *data[task], f"train.seed={seed}") for seed in seeds]
            for m in METHODS
        }
        for task, key in (("SST-2", "sst2"), ("AG News", "agnews"))
    }  # fmt: skip
    scored = {"SST-2": "sst2:validation", "AG News": str(out / "agnews" / "test.csv")}
    transfers = [  # each first-seed z decoded as the other two methods, against the target's run
        {
            "task": task,
            "from": source,
            "to": target,
            "accuracy": decoded(
                space, target, z[task][source][0], scored[task], out / "decoded" / task / source
            ),
            "full": accuracy(full[task][target]),
        }
        for task in full
        for source in METHODS
        for target in METHODS
        if target != source
    ]
    # The landscape of the AG News solutions: a subspace fitted to them, its plane drawn.
    agnews_space = fitted_space(
        out / "space-agnews", [full["AG News"][m] for m in METHODS], args, console
    )
    figure = out / "landscape-agnews"
    if not (figure / "landscape.json").is_file():
        landscape(agnews_space, figure, grid=args.grid, rows=args.landscape_rows, console=console)

    fits = {
        "SST-2": json.loads((space / "subspace.json").read_text()),
        "AG News": json.loads((agnews_space / "subspace.json").read_text()),
    }
    report = Console()
    for task, fitted in fits.items():
        report.print(fit_table(fitted, task))
    report.print(z_table(full, z, floors, args.dim))
    report.print(transfer_table(transfers))
    results = {
        "fit": {task: fitted["scores"] for task, fitted in fits.items()},
        "z": {
            task: {
                m: {"z": [accuracy(f) for f in z[task][m]], "full": accuracy(full[task][m])}
                for m in METHODS
            }
            for task in full
        },
        "head_only": {
            task: {lr: accuracy(f) for lr, f in runs.items()} for task, runs in floors.items()
        },
        "transfers": transfers,
        "landscape_agnews": json.loads((figure / "landscape.json").read_text()),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if not args.quick:
        flags = {"dim": args.dim, "steps": args.steps, "seeds": seeds, "head_lrs": head_lrs,
                 "agnews_rows": args.agnews_rows, "agnews_eval_rows": args.agnews_eval_rows,
                 "grid": args.grid, "landscape_rows": args.landscape_rows}  # fmt: skip
        path = write_results("subspace", "the unified subspace on SST-2 and AG News", [results],
                             flags=flags)  # fmt: skip
        console.print(f"raw results: {path}")
    if args.figure:
        shutil.copy(figure / "landscape.png", args.figure)


QUICK: list[str] = []  # overrides of every run under --quick


def head_only(lr: str) -> list[str]:
    """The floor z must beat: the base model with only a fresh classifier trained."""
    return ["head=false", "deltas.0.targets=[classifier]", f"train.lr={lr}"]


def fitted_space(folder: Path, deltas: list[Path], args: argparse.Namespace, console) -> Path:
    if not (folder / "subspace.json").is_file():
        fit(deltas, folder, dim=args.dim, steps=args.steps, console=console)
    return folder


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


def fit_table(fitted: dict, task: str) -> Table:
    table = Table(title=f"the subspace (d = {fitted['dim']}) fitted to the {task} solutions")
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


def z_table(full: dict, z: dict, floors: dict, dim: int) -> Table:
    seeds = len(next(iter(z["SST-2"].values())))
    table = Table(
        title=f"training only z ({dim} numbers of the SST-2 subspace) + the head, {seeds} seeds"
    )
    for column in ("task", "through", "z trains", "z accuracy (mean ± std)", "full space",
                   "z / full", "head only, best lr"):  # fmt: skip
        table.add_column(column, justify="right")
    for task in full:
        lr, best = max(((lr, accuracy(f)) for lr, f in floors[task].items()), key=lambda x: x[1])
        for method in METHODS:
            scores = [accuracy(f) for f in z[task][method]]
            own = accuracy(full[task][method])
            table.add_row(
                task,
                method,
                f"{trainable(z[task][method][0]):,}",
                f"{100 * statistics.mean(scores):.1f} ± {100 * statistics.stdev(scores):.1f}%"
                if len(scores) > 1 else f"{100 * scores[0]:.1f}%",
                f"{100 * own:.1f}% ({trainable(full[task][method]):,})",
                f"{100 * statistics.mean(scores) / own:.1f}%",
                f"{100 * best:.1f}% (lr {lr})" if method == METHODS[0] else "",
            )  # fmt: skip
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
