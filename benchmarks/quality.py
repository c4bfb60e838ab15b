"""Every shipped recipe on GLUE SST-2 with the embedded MiniLM: the quality table.

Each recipe trains with its own defaults under the same budget (3 epochs over the same
training rows, batch 32, max length 128, seed 42), each run in its own process so that wall
time and peak RSS are its own; then dev accuracy on the 872-row SST-2 dev set.

    python benchmarks/quality.py                                 # the bundled 2,000-row sample
    python benchmarks/quality.py --train ../shared/data/sst2/train.tsv --rows 8000
    python benchmarks/quality.py --recipes lora mam
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deltacli.deltas.subspace import SubspaceConfig
from deltacli.recipe import load_recipe, shipped_recipes
from measure import add_budget_arguments, budget_overrides, measured

DELTACLI = str(Path(sys.executable).parent / "deltacli")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    classifiers = [  # the subspace recipe needs a fitted subspace: benchmarks/subspace.py
        name
        for name, path in sorted(shipped_recipes().items())
        if load_recipe(path).task == "sequence-classification"
        and SubspaceConfig.kind not in {d.kind for d in load_recipe(path).deltas}
    ]
    parser.add_argument("--recipes", nargs="+", default=classifiers)
    add_budget_arguments(parser)
    args = parser.parse_args()

    console = Console()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    budget = budget_overrides(args)
    table = Table(
        title=f"MiniLM on SST-2 dev · {args.epochs:g} epochs over {args.train} "
        f"(first {args.rows or 'all'} rows)"
    )
    for column in (
        "recipe",
        "trainable",
        "dev accuracy",
        "macro-F1",
        "samples/s",
        "wall",
        "peak RSS",
    ):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.recipes:
            out = Path(scratch) / name
            wall, peak, _ = measured(
                [DELTACLI, "train", "--method", name, "-o", str(out), *budget], env
            )
            metrics = json.loads((out / "metrics.json").read_text())
            params, scores = metrics["params"], metrics["eval"]
            row = (
                name,
                f"{params['trainable']:,} ({params['trainable_percent']:.3f}%)",
                f"{100 * scores['accuracy']:.1f}%",
                f"{100 * scores['macro_f1']:.1f}",
                f"{metrics['train']['samples_per_second']:.0f}",
                f"{wall:.0f} s",
                f"{peak:,.0f} MB",
            )
            console.print(*row)
            table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
