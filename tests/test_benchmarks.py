"""The GPU benchmark runs end to end on a CPU (`--tiny`): both sides of a row measure, the
raw file records what ran, and README's table is printed from it. The deltacli side runs
liger's loss (`--loss-kernel liger`; its Triton kernels on Triton's CPU interpreter, which
conftest turns on)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


@pytest.mark.slow
def test_the_gpu_benchmark_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--tiny", "--repeats", "1", "--steps", "1",
         "--warmup", "0", "--rows", "lora", "--work", str(tmp_path), "--batch", "3",
         "--out", str(out), "--loss-kernel", "liger"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["device"] == "CPU (--tiny)" and record["commit"] and record["time"]
    expected = {"repeats": 1, "batch": 3, "length": 64, "loss_kernel": "liger"}
    assert record["flags"] | expected == record["flags"]
    (row,) = record["rows"]
    for side in ("deltacli", "reference"):
        assert len(row[side]) == 1 and all(run["tokens_per_second"] > 0 for run in row[side])
    again = subprocess.run(
        [sys.executable, str(BENCHMARK), "--markdown", str(out)], capture_output=True, text=True
    )
    assert again.returncode == 0 and again.stdout in done.stdout
    line = next(line for line in again.stdout.splitlines() if line.startswith("| lora |"))
    assert line.count("[") == 2 and "| 1 + 1 |" in line  # median [min–max] per side, runs
    assert "| tiny, 3 × 64, liger loss |" in line
