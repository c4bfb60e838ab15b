"""Every shipped recipe on SST-2 at its chosen learning rate, over several seeds.

A `deltacli sweep` of the recipes × `--seeds` (resumable: finished runs are kept), then
`deltacli report` of it: per recipe the dev accuracy as mean ± std over the seeds, each
seed's figure, the share of parameters trained, and the accuracy-vs-parameters figure with
error bars (`--plots`). The raw file (benchmarks/results/quality-sst2-DATE.json) records
the commit, the command and every run's accuracy; README's table is printed from it.

    python benchmarks/quality.py --out /tmp/q3 --plots docs/images      # 14 × 3 runs
    python benchmarks/quality.py --markdown benchmarks/results/quality-sst2-DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from measure import write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = (
    "lora,adapter,prefix,prompt,full,scaled_parallel_adapter,mam,pfeiffer,parallel_adapter,"
    "ia3,sift,bitfit,layernorm,modules"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("sweeps/sst2-seeds"))
    parser.add_argument("--methods", default=RECIPES)
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument(
        "--jobs", type=int, default=2, help="runs at once (each its share of the CPU)"
    )
    parser.add_argument("--plots", type=Path, help="folder for metric-vs-share.png")
    parser.add_argument("--markdown", type=Path, help="print README's table from this raw file")
    parser.add_argument(
        "--trained-at", help="the commit the runs were trained at, when a sweep resumed is older"
    )
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())["runs"]))
        return
    sweep = ["deltacli", "sweep", "--methods", args.methods, "--seeds", args.seeds,
             "--jobs", str(args.jobs), "-o", str(args.out)]  # fmt: skip
    subprocess.run(sweep, check=True)
    report = ["deltacli", "report", str(args.out), "--json"]
    if args.plots:
        report += ["--plots", str(args.plots)]
    rows = json.loads(subprocess.run(report, check=True, capture_output=True, text=True).stdout)
    seeds = {
        run["name"]: run["seed"]
        for run in json.loads((args.out / "sweep.json").read_text())["runs"]
    }
    for row in rows:
        row["per_seed"] = {str(seeds[Path(run).name]): _accuracy(Path(run)) for run in row["runs"]}
    path = write_results(
        "quality-sst2", "shipped recipes on SST-2 at their learning rates, over seeds", rows,
        seeds=args.seeds, jobs=args.jobs, trained_at=args.trained_at,
    )  # fmt: skip
    print(markdown(rows))
    print(f"raw results: {path}")


def _accuracy(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["eval"]["accuracy"]


def markdown(rows: list[dict]) -> str:
    seeds = " / ".join(sorted(rows[0]["per_seed"]))
    lines = [
        f"| method | trainable | dev accuracy, mean ± std | seeds {seeds} | lr |",
        "|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: -r["share"]):
        seeds = " / ".join(f"{100 * row['per_seed'][s]:.1f}" for s in sorted(row["per_seed"]))
        lines.append(
            f"| `{row['method']}` | {row['trainable']:,} ({row['share']:.3f}%) | "
            f"**{100 * row['mean']:.1f} ± {100 * row['std']:.1f}%** | {seeds} | {row['lr']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
