"""Helpers the benchmark scripts share: the training budget, and measured runs."""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measured(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of `command`.

    The peak is the kernel's high-water mark (VmHWM) of the process, polled until it exits:
    `ru_maxrss` would report the forking parent's size instead of the command's own. A
    command that prints `seconds N` last reports its own work time as the wall time.
    """
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, _high_water_mb(process.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - started
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {stderr[-2000:]}")
    lines = stdout.strip().splitlines()
    if lines and lines[-1].startswith("seconds "):
        wall = float(lines[-1].split()[1])
    return wall, peak, stdout


def _high_water_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the process has just exited
        return 0.0
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else 0.0


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The training budget every method of one table gets."""
    parser.add_argument("--train", default="sst2:train", help="training rows (file or sample)")
    parser.add_argument("--rows", type=int, default=None, help="use the first N training rows")
    parser.add_argument("--epochs", type=float, default=3)


def budget_overrides(args: argparse.Namespace) -> list[str]:
    """That budget as `deltacli train` overrides."""
    overrides = [f"data.train={args.train}", f"train.epochs={args.epochs}"]
    if args.rows:
        overrides.append(f"data.max_train_rows={args.rows}")
    return overrides


def _commit() -> str:
    """The checked-out commit, `+dirty` with uncommitted changes to tracked files; or
    DELTACLI_COMMIT, where the tree is a copy without .git (a GPU sitting's, which
    scripts/gpu_prepare.sh stamps with the commit it was prepared from)."""
    if os.environ.get("DELTACLI_COMMIT"):
        return os.environ["DELTACLI_COMMIT"]
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    if git("status", "--porcelain", "--untracked-files=no").strip():
        commit += "+dirty"
    return commit


# Read when a script starts: the code it runs is what was checked out then, whatever is
# committed while it runs.
COMMIT = _commit()


def write_results(name: str, what: str, rows: list[dict], **extra) -> Path:
    """A raw results file in benchmarks/results/: what ran, the exact command, the commit
    the script started from, the date and machine, and every run's figures."""
    today = datetime.date.today().isoformat()
    record = {
        "what": what,
        "date": today,
        "commit": COMMIT,
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{_cpus()} CPU(s), Python {platform.python_version()}",
        **extra,
        "runs": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{today}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def sampled_csv(source: Path, target: Path, rows: int, seed: int = 0) -> Path:
    """`rows` rows of a CSV drawn once with `seed` into `target` (kept if it exists), so that
    every script and every re-run trains on the same sample of a large data set."""
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(source, newline="", encoding="utf-8") as file:
            table = list(csv.DictReader(file))
        chosen = random.Random(seed).sample(table, min(rows, len(table)))
        with open(target, "w", newline="", encoding="utf-8") as sink:
            writer = csv.DictWriter(sink, fieldnames=list(chosen[0]))
            writer.writeheader()
            writer.writerows(chosen)
    return target


def alternating(sides: list[str], repeat: int) -> list[str]:
    """The sides' order in repeat `repeat`: A, B, then B, A, ... — a drift over time (a
    warming machine) hits both sides alike."""
    return sides if repeat % 2 == 0 else sides[::-1]


def median_range(values: list[float], fmt: str) -> str:
    """`median [min–max]` of repeated runs, each figure as `fmt` formats it; "—" for none."""
    if not values:
        return "—"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{fmt.format(mid)} [{fmt.format(low)}–{fmt.format(high)}]"


def by_side(results: list[dict], row_key: str, sides: list[str]) -> Iterator[tuple[str, str, list]]:
    """Each (row, side) of a side-by-side table with its runs: rows in the order first run,
    sides in `sides`' order (the reference first), those that ran."""
    for row in dict.fromkeys(r[row_key] for r in results):
        for side in sides:
            runs = [r for r in results if r[row_key] == row and r["side"] == side]
            if runs:
                yield row, side, runs
