"""Cross-task delta transfer (Ding et al., 2023: a delta trained on one task is a better start
for another than a fresh one): SST-2 → AG News and AG News → SST-2, for LoRA, adapters and
prefix tuning, against a fresh start at equal steps.

Each shipped recipe trains on 1,000 rows of each task (3 epochs, its own learning rate) from
its usual start, and again from the other task's trained delta (`deltas.N.init_from`; the
head, trained for other labels, starts fresh and says so). The accuracy after epoch 1 and
epoch 3 comes from each run's per-epoch evaluation (SST-2: the 872-row dev set; AG News: 1,000
test rows). One seed. Writes benchmarks/results/transfer-tasks-DATE.json.

    python benchmarks/transfer_tasks.py --out /tmp/transfer
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console
from rich.table import Table

from measure import sampled_csv, write_results

DELTACLI = str(Path(sys.executable).parent / "deltacli")
AGNEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews"
METHODS = {"lora": 1, "adapter": 2, "prefix": 1}  # recipe -> how many deltas it holds


def train(folder: Path, method: str, task: list[str], start: Path | None, count: int) -> dict:
    """Train (or reuse) a run; its metrics."""
    if not (folder / "metrics.json").is_file():
        starts = [f"deltas.{i}.init_from={start}" for i in range(count)] if start else []
        done = subprocess.run(
            [DELTACLI, "train", "--method", method, "-o", str(folder), "--overwrite",
             "train.epochs=3", "train.keep_best=false", *task, *starts],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode:
            raise SystemExit(f"training {folder} failed:\n{done.stderr}")
    return json.loads((folder / "metrics.json").read_text())


def by_epoch(metrics: dict) -> dict[int, float]:
    return {int(h["epoch"]): h["accuracy"] for h in metrics["history"] if "accuracy" in h}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/transfer"))
    parser.add_argument("--rows", type=int, default=1000, help="training rows of each task")
    args = parser.parse_args()

    agnews_train = sampled_csv(AGNEWS / "train.csv", args.out / "agnews-train.csv", args.rows)
    agnews_test = sampled_csv(AGNEWS / "test.csv", args.out / "agnews-test.csv", 1000)
    tasks = {
        "SST-2": [f"data.max_train_rows={args.rows}"],
        "AG News": [f"data.train={agnews_train}", f"data.eval={agnews_test}", "data.text=text"],
    }
    other = {"SST-2": "AG News", "AG News": "SST-2"}
    rows = []
    for method, count in METHODS.items():
        fresh = {task: args.out / f"{method}-{task.replace(' ', '').lower()}" for task in tasks}
        scores = {task: by_epoch(train(fresh[task], method, settings, None, count))
                  for task, settings in tasks.items()}  # fmt: skip
        for task, settings in tasks.items():
            source = fresh[other[task]]
            folder = fresh[task].with_name(f"{fresh[task].name}-from-{source.name}")
            moved = by_epoch(train(folder, method, settings, source, count))
            rows.append({
                "method": method, "task": task, "from": other[task],
                "fresh_epoch1": scores[task][1], "fresh_epoch3": scores[task][3],
                "transfer_epoch1": moved[1], "transfer_epoch3": moved[3],
            })  # fmt: skip
            Console().print(rows[-1])

    path = write_results(
        "transfer-tasks",
        "cross-task delta transfer: accuracy from a fresh start vs from the other task's delta",
        rows,
        flags={"rows": args.rows, "epochs": 3, "agnews_test_rows": 1000},
    )
    table = Table(title="accuracy after epoch 1 / epoch 3: fresh start vs the other task's delta")
    for column in ("method", "task (from)", "fresh 1", "transfer 1", "fresh 3", "transfer 3"):
        table.add_column(column, justify="left" if column in ("method", "task (from)") else "right")
    for row in rows:
        table.add_row(
            row["method"], f"{row['task']} (from {row['from']})",
            *(f"{100 * row[k]:.1f}%" for k in
              ("fresh_epoch1", "transfer_epoch1", "fresh_epoch3", "transfer_epoch3")),
        )  # fmt: skip
    Console().print(table)
    Console().print(f"raw results: {path}")


if __name__ == "__main__":
    main()
