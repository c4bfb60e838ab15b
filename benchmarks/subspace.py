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
    python benchmarks/subspace.py --markdown benchmarks/results/subspace-DATE.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from rich.console import Console

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
    parser.add_argument("--out", type=Path, help="the folder of every run (required to run)")
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", default="42,43,44", help="seeds of every z run")
    parser.add_argument("--agnews-seeds", help="seeds of the AG News z runs (default: --seeds)")
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
    parser.add_argument(
        "--trained-at", help="the commit the runs were trained at, when they are older"
    )
    parser.add_argument("--markdown", type=Path, help="print README's tables from this raw file")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())["runs"][0]))
        return
    if args.out is None:
        parser.error("--out is required to run")
    seeds = {
        "SST-2": [int(seed) for seed in args.seeds.split(",")],
        "AG News": [int(seed) for seed in (args.agnews_seeds or args.seeds).split(",")],
    }
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
                    *data[task], f"train.seed={seed}") for seed in seeds[task]]
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
    print(markdown(results))
    if not args.quick:
        flags = {"dim": args.dim, "steps": args.steps, "seeds": seeds, "head_lrs": head_lrs,
                 "agnews_rows": args.agnews_rows, "agnews_eval_rows": args.agnews_eval_rows,
                 "grid": args.grid, "landscape_rows": args.landscape_rows,
                 "trained_at": args.trained_at}  # fmt: skip
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
    return [f"deltas.0.subspace={space}", f"deltas.0.through={fitted_name(space, method)}"]


def fitted_name(space: Path, method: str) -> str:
    """The name the space gave `method`'s delta (its recipe's name: `lora`, or the quality
    sweep's `lora--seed=42`); the space is fitted on METHODS' deltas in that order."""
    methods = json.loads((space / "subspace.json").read_text())["methods"]
    return methods[METHODS.index(method)]["name"]


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
        decode(space, fitted_name(space, to), output, z_delta=z_delta, overwrite=True)
    return score_delta(output, data)["accuracy"]


def accuracy(folder: Path) -> float:
    return json.loads((folder / METRICS_FILE).read_text())["eval"]["accuracy"]


def markdown(results: dict) -> str:
    """README's tables from a results record: each fit, z against the full space and the
    head-only floor (mean ± std over seeds), and the decoded-transfer matrices."""
    lines = []
    for task, scores in results["fit"].items():
        lines += [
            f"\n**The subspace fitted to the {task} solutions**\n",
            "| method | parameters | own accuracy | at its point | ‖θ − Dec(Enc θ)‖ / ‖θ‖ |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {row['parameters']:,} | {pct(row['own']['accuracy'])} | "
            f"{pct(row['point']['accuracy'])} | {row['reconstruction_error']:.3f} |"
            for name, row in scores.items()
        ]
    lines += [
        "\n**Training only z (of the SST-2 subspace) + the head**\n",
        "| task | through | z, mean ± std (each seed) | full space | z / full | head only, "
        "best lr |",
        "|---|---|---|---|---|---|",
    ]
    for task, methods in results["z"].items():
        floor = results["head_only"][task]
        lr = max(floor, key=floor.get)
        for method, row in methods.items():
            scores = row["z"]
            spread = f" ± {pct(statistics.stdev(scores), '')}" if len(scores) > 1 else ""
            each = ", ".join(pct(x, "") for x in scores)
            lines.append(
                f"| {task} | {method} | {pct(statistics.mean(scores))}{spread} ({each}) | "
                f"{pct(row['full'])} | {pct(statistics.mean(scores) / row['full'])} | "
                + (f"{pct(floor[lr])} (lr {lr}) |" if method == next(iter(methods)) else " |")
            )
    for task in results["z"]:
        rows = [r for r in results["transfers"] if r["task"] == task]
        lines += [
            f"\n**{task}: z (first seed) decoded as another method, no retraining** "
            "(accuracy, and its share of that method's own)\n",
            "| z trained through | " + " | ".join(f"as {m}" for m in METHODS) + " |",
            "|---|" + "---|" * len(METHODS),
        ]
        for source in METHODS:
            cells = [transfer_cell(rows, source, target) for target in METHODS]
            lines.append(f"| {source} | " + " | ".join(cells) + " |")
    shares = [r["accuracy"] / r["full"] for r in results["transfers"]]
    lines.append(
        f"\nMean share over the {len(shares)} transfers: {pct(statistics.mean(shares))} "
        f"(Yi et al.: 82.6%)."
    )
    return "\n".join(lines)


def transfer_cell(rows: list[dict], source: str, target: str) -> str:
    """`accuracy (share of the target's own)` of z trained through `source` decoded as
    `target`; "—" on the diagonal (z is trained there)."""
    for row in rows:
        if row["from"] == source and row["to"] == target:
            return f"{pct(row['accuracy'])} ({pct(row['accuracy'] / row['full'])})"
    return "—"


def pct(value: float, sign: str = "%") -> str:
    return f"{100 * value:.1f}{sign}"


if __name__ == "__main__":
    main()
