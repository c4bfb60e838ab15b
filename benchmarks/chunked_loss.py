"""The chunked output layer + cross-entropy (`train.fused_loss`) against the model's own head.

SmolLM2-135M-Instruct (49,152-token vocabulary) with LoRA, packed rows of 512 tokens, batch
8 — 4,096 tokens a step, whose logits alone are 805 MB in float32. Two kinds of data: plain
AG News text, where every token counts in the loss (with and without gradient
checkpointing), and the bundled SST-2 chat sample, where only the answers do. Each run is
`deltacli train` in its own process (`--steps` steps, evaluation on 8 rows at batch 1 so
that it does not set the peak); the two sides alternate A-B-B-A. Printed: peak RSS,
training tokens/s and the training loss of the same steps (the two sides compute the same
sum, so they agree to float32 rounding).

    python benchmarks/chunked_loss.py                # 2 runs per side, about 30 minutes
    python benchmarks/chunked_loss.py --repeats 1 --steps 2
    python benchmarks/chunked_loss.py --only evaluation --tag eval --repeats 1 --steps 1
    python benchmarks/chunked_loss.py --markdown benchmarks/results/chunked-loss-DATE.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console

from measure import alternating, by_side, measured, median_range, sampled_csv, write_results

AGNEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews"
SIDES = {"model's head": "false", "chunked": "true"}


def data_rows(work: Path) -> dict[str, list[str]]:
    """Each row's overrides: AG News as plain text, with and without gradient checkpointing
    (which leaves the logits the largest thing a step holds), and the bundled chat sample."""
    text = sampled_csv(AGNEWS / "train.csv", work / "agnews-train.csv", 2000)
    held = sampled_csv(AGNEWS / "test.csv", work / "agnews-test.csv", 8)
    plain = [f"data.train={text}", f"data.eval={held}", "data.format=text", "data.text=text"]
    recompute = "train.gradient_checkpointing=true"
    return {
        "plain text, every token counts": plain,
        "plain text, gradient checkpointing": [*plain, recompute],
        "chat, the answers count, gradient checkpointing": [
            "data.eval=[{path: 'sst2_chat:validation', rows: 8}]", recompute,
        ],
        "evaluation: 64 rows of 512 tokens in one batch, gradient checkpointing": [
            *plain, f"data.eval={long_rows(work, 64)}", "train.eval_batch_size=64", recompute,
        ],
    }  # fmt: skip


def long_rows(work: Path, count: int) -> Path:
    """`count` long documents, eight AG News articles each (242 to 529 SmolLM2 tokens for
    64 of them): an eval batch of them is padded to max_length, 512 positions."""
    path = work / f"agnews-long-{count}.csv"
    if not path.is_file():
        source = sampled_csv(AGNEWS / "test.csv", work / "agnews-test-long.csv", 8 * count)
        with open(source, newline="", encoding="utf-8") as file:
            texts = [row["text"] for row in csv.DictReader(file)]
        with open(path, "w", newline="", encoding="utf-8") as sink:
            writer = csv.writer(sink)
            writer.writerow(["text"])
            writer.writerows([" ".join(texts[i : i + 8])] for i in range(0, len(texts), 8))
    return path


def run(work: Path, data: list[str], fused: str, steps: int) -> dict:
    output = Path(tempfile.mkdtemp(dir=work)) / "run"
    command = [
        "deltacli", "train", "--method", "lora_instruct", "-o", str(output),
        "train.eval_batch_size=1", *data, "data.packing=true", "data.max_length=512",
        "train.batch_size=8", f"train.max_steps={steps}", "train.preview=0",
        f"train.fused_loss={fused}",
    ]  # fmt: skip
    wall, peak, _ = measured(command)
    metrics = json.loads((output / "metrics.json").read_text())
    seconds = metrics["train"]["seconds"]
    return {
        "fused_loss": fused,
        "peak_rss_mb": round(peak),
        "tokens_per_second": round(metrics["train"]["samples"] * 512 / seconds, 1),
        "train_loss": metrics["train"]["loss"],
        "loss_tokens": metrics["data"]["loss_tokens"],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs per side (A-B-B-A)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/deltacli-chunked-loss"))
    parser.add_argument("--markdown", type=Path, help="print README's table from this raw file")
    parser.add_argument("--only", help="run the rows whose name contains this")
    parser.add_argument("--tag", help="raw file chunked-loss-TAG-DATE.json (another sitting)")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())["runs"]))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    rows = {row: data for row, data in data_rows(args.work).items() if (args.only or "") in row}
    for row, data in rows.items():
        for side in (s for r in range(args.repeats) for s in alternating(list(SIDES), r)):
            result = {"row": row, "side": side, **run(args.work, data, SIDES[side], args.steps)}
            Console(stderr=True).print(result)
            results.append(result)
    path = write_results(
        "-".join(filter(None, ["chunked-loss", args.tag])),
        "peak RSS and speed of LoRA on SmolLM2, the model's head vs chunked", results,
        steps=args.steps, repeats=args.repeats, only=args.only,
    )  # fmt: skip
    print(markdown(results))
    Console(stderr=True).print(f"raw runs: {path}")


def markdown(results: list[dict]) -> str:
    """README's table: per row and side, median [min–max] of the runs and the ratio of the
    medians to the model's own head."""
    lines = [
        "| data | loss through | peak RSS (MB) | vs the head | tokens/s | vs the head | train loss "
        "| runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = (0.0, 0.0)
    for row, side, runs in by_side(results, "row", list(SIDES)):
        peaks, speeds = ([r[key] for r in runs] for key in ("peak_rss_mb", "tokens_per_second"))
        peak, speed = statistics.median(peaks), statistics.median(speeds)
        base = (peak, speed) if side == next(iter(SIDES)) else base
        lines.append(
            f"| {row} | {side} | {median_range(peaks, '{:,.0f}')} | {peak / base[0]:.2f}× | "
            f"{median_range(speeds, '{:,.1f}')} | {speed / base[1]:.2f}× | "
            f"{runs[0]['train_loss']:.6f} | {len(runs)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
