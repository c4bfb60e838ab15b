"""A full fine-tune turned into LoRAs of several ranks by `deltacli extract`: the share of the
update's norm each keeps, and SST-2 accuracy beside the dense fine-tune's.

The embedded MiniLM fully fine-tuned on the bundled SST-2 sample (`--method full`,
`--epochs`), then `deltacli extract default FULL OUT --rank r --eval sst2:validation` for
each rank. Figures go to benchmarks/results/extract-ranks-DATE.json.

    python benchmarks/extract_ranks.py
    python benchmarks/extract_ranks.py --ranks 4 16 64 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console
from rich.table import Table

from measure import write_results

DELTACLI = [sys.executable, "-m", "deltacli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--epochs", type=float, default=1)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        full = Path(scratch) / "full"
        subprocess.run([*DELTACLI, "train", "--method", "full", f"train.epochs={args.epochs}",
                        "-o", str(full)], check=True, capture_output=True)  # fmt: skip
        dense = json.loads((full / "metrics.json").read_text())["eval"]["accuracy"]
        for rank in args.ranks:
            out = Path(scratch) / f"r{rank}"
            done = subprocess.run(
                [*DELTACLI, "extract", "default", str(full), str(out), "--rank", str(rank),
                 "--eval", "sst2:validation", "--json"],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            report = json.loads(done.stdout)
            rows.append({
                "rank": rank,
                "norm_kept_targeted": round(report["norm_kept"], 4),
                "norm_kept_overall": round(report["norm_kept_overall"], 4),
                "accuracy": report["scores"]["low-rank"]["accuracy"],
                "dense_accuracy": report["scores"]["dense"]["accuracy"],
                "left_out_tensors": len(report["dropped"]),
            })  # fmt: skip
    table = Table(title=f"MiniLM full fine-tune on SST-2 (accuracy {dense:.1%}) as LoRAs")
    for column in ("rank", "‖ΔW‖ kept (linear layers)", "‖ΔW‖ kept (all)", "accuracy"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["rank"]), f"{row['norm_kept_targeted']:.1%}",
                      f"{row['norm_kept_overall']:.1%}", f"{row['accuracy']:.1%}")  # fmt: skip
    Console().print(table)
    path = write_results(
        "extract-ranks",
        "the embedded MiniLM fully fine-tuned on the bundled SST-2 sample, extracted as LoRAs "
        "of several ranks, scored on the 872-row dev set",
        rows,
        flags={"ranks": args.ranks, "epochs": args.epochs},
        dense_accuracy=dense,
    )
    Console().print(f"raw results: {path}")


if __name__ == "__main__":
    main()
