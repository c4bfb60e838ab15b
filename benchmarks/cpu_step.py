"""The fast-step options on a CPU: eager, fused AdamW, and compiled layers + fused AdamW.

The embedded all-MiniLM-L6-v2 trains on the bundled SST-2 sample with shipped recipes
(batch 32, dynamic padding), `--steps` optimizer steps per run, each run `deltacli train` in
its own process, the sides in A-B-C-C-B-A order. Speed is the trainer's own training
examples/s (`metrics.json`), which for the compiled side includes compiling the layers
during the first steps, as a user's run does. The training loss of the same steps is
printed beside it: the sides compute the same update, so it agrees to float rounding.

    python benchmarks/cpu_step.py                      # lora and full, 2 runs per side
    python benchmarks/cpu_step.py --methods lora adapter prefix --repeats 3
    python benchmarks/cpu_step.py --methods lora --steps 188 --tag 3-epochs \
        --sides eager "compiled + fused AdamW"         # 3 epochs: does compiling pay off?
    python benchmarks/cpu_step.py --markdown benchmarks/results/cpu-step-DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console

from measure import alternating, by_side, measured, median_range, write_results

SIDES = {
    "eager": ["train.fused_adamw=false", "train.compile=false"],
    "fused AdamW": ["train.fused_adamw=true", "train.compile=false"],
    "compiled + fused AdamW": ["train.fused_adamw=true", "train.compile=true"],
}


def run(work: Path, method: str, side: str, steps: int) -> dict:
    output = Path(tempfile.mkdtemp(dir=work)) / "run"
    command = [
        "deltacli", "train", "--method", method, "-o", str(output), *SIDES[side],
        f"train.max_steps={steps}", "data.eval=[{path: 'sst2:validation', rows: 32}]",
    ]  # fmt: skip
    wall, peak, _ = measured(command)
    metrics = json.loads((output / "metrics.json").read_text())
    return {
        "method": method,
        "side": side,
        "samples_per_second": metrics["train"]["samples_per_second"],
        "train_loss": metrics["train"]["loss"],
        "peak_rss_mb": round(peak),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="runs per side")
    parser.add_argument("--work", type=Path, default=Path("/tmp/deltacli-cpu-step"))
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    parser.add_argument("--tag", default="", help="a suffix for the raw file's name")
    parser.add_argument("--markdown", type=Path, help="print README's table from this raw file")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())["runs"]))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for method in args.methods:
        for side in (s for r in range(args.repeats) for s in alternating(args.sides, r)):
            result = run(args.work, method, side, args.steps)
            Console(stderr=True).print(result)
            results.append(result)
    name = f"cpu-step-{args.tag}" if args.tag else "cpu-step"
    path = write_results(
        name, "training speed on a CPU: eager, fused AdamW, compiled layers", results,
        steps=args.steps, repeats=args.repeats, sides={s: SIDES[s] for s in args.sides},
    )  # fmt: skip
    print(markdown(results))
    Console(stderr=True).print(f"raw runs: {path}")


def markdown(results: list[dict]) -> str:
    """README's table: per method and side, median [min–max] examples/s and the ratio of
    the medians to eager."""
    lines = [
        "| method | step | examples/s | vs eager | train loss | runs |",
        "|---|---|---|---|---|---|",
    ]
    eager = 0.0
    for method, side, runs in by_side(results, "method", list(SIDES)):
        speeds = [r["samples_per_second"] for r in runs]
        speed = statistics.median(speeds)
        eager = speed if side == "eager" else eager
        lines.append(
            f"| {method} | {side} | {median_range(speeds, '{:.1f}')} | {speed / eager:.2f}× "
            f"| {runs[0]['train_loss']:.5f} | {len(runs)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
