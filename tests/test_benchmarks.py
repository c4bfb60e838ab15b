"""The GPU benchmark runs end to end on a CPU (`--tiny`): both sides of a row measure, and
the table is written."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


def test_the_gpu_benchmark_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--tiny", "--repeats", "1", "--steps", "2",
         "--warmup", "1", "--rows", "lora", "--work", str(tmp_path),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CPU (--tiny)" in done.stdout and "ratio" in done.stdout
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["lora"]["deltacli"] > 0 and rows["lora"]["reference"] > 0
    assert all(not row["errors"] for row in rows.values())
