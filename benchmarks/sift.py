"""SIFT against full fine-tuning and LoRA on the embedded MiniLM and SST-2, same budget.

Trains full fine-tuning, LoRA, and SIFT at densities 0.008 and 0.05 (q, k, v, o) with the
shipped recipes, each in its own process, and reports dev accuracy, trainable parameters,
the bytes of AdamW's state, samples/s and peak RSS in one table.

    python benchmarks/sift.py
    python benchmarks/sift.py --train ../shared/data/sst2/train.tsv --rows 8000
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

from measure import add_budget_arguments, budget_overrides, measured

DELTACLI = str(Path(sys.executable).parent / "deltacli")
RUNS = {
    "full fine-tuning": ["--method", "full"],
    "LoRA r=8 (q, v)": ["--method", "lora"],
    "SIFT 0.008 (q, k, v, o)": ["--method", "sift", "deltas.0.density=0.008"],
    "SIFT 0.05 (q, k, v, o)": ["--method", "sift", "deltas.0.density=0.05"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_budget_arguments(parser)
    args = parser.parse_args()

    console = Console()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    budget = budget_overrides(args)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, options in RUNS.items():
            out = Path(scratch) / str(len(rows))
            _, peak, _ = measured([DELTACLI, "train", *options, "-o", str(out), *budget], env)
            metrics = json.loads((out / "metrics.json").read_text())
            rows.append((name, metrics, peak))
            console.print(name, metrics["eval"]["accuracy"], metrics["optimizer_state_bytes"], peak)
    full_state = rows[0][1]["optimizer_state_bytes"]
    table = Table(
        title=f"SIFT vs full fine-tuning and LoRA · MiniLM · SST-2 dev · {args.epochs:g} epochs"
    )
    for column in (
        "run",
        "dev accuracy",
        "trainable",
        "AdamW state",
        "vs full",
        "samples/s",
        "peak RSS",
    ):
        table.add_column(column, justify="right")
    for name, metrics, peak in rows:
        state = metrics["optimizer_state_bytes"]
        table.add_row(
            name,
            f"{100 * metrics['eval']['accuracy']:.1f}%",
            f"{metrics['params']['trainable']:,}",
            f"{state / 2**20:.2f} MB",
            f"{100 * state / full_state:.2f}%",
            f"{metrics['train']['samples_per_second']:.0f}",
            f"{peak:,.0f} MB",
        )
    console.print(table)


if __name__ == "__main__":
    main()
