"""`deltacli sweep` and `deltacli report`: a grid of methods × learning rates × seeds runs,
survives a kill without redoing finished runs, and is summarised (mean ± std over seeds,
figures); trackers get the training log."""

import json
import statistics
import sys
from pathlib import Path

import pytest

from deltacli.commands.sweep import PLAN_FILE
from deltacli.files.outputs import MARKER
from helpers import run_offline

# The CLI, killed (SIGKILL) once the training log of its `K`-th run records step 2.
KILLING = """
import os, signal, sys
from deltacli.training import logs
from deltacli.cli import main

at, runs = int(sys.argv.pop(1)), []
write = logs.MetricsLog.write

def write_then_kill(self, **record):
    write(self, **record)
    if record.get("step") == 1 and "loss" in record:
        runs.append(None)
    if len(runs) == at and record.get("step") == 2 and "loss" in record:
        os.kill(os.getpid(), signal.SIGKILL)

logs.MetricsLog.write = write_then_kill
sys.exit(main())
"""


def sweep_args(tiny_bert, sentiment, folder: Path) -> list[str]:
    return [
        "sweep", "--methods", "lora,bitfit", "--grid", "train.lr=x0.5,x1", "--seeds", "1,2",
        "--model", str(tiny_bert), "--data", str(sentiment["train"]),
        "--eval-data", str(sentiment["eval"]), "-o", str(folder),
        "data.text=text", "train.max_steps=4", "train.batch_size=16", "train.save_every=1",
        "train.log_every=1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_bert, sentiment) -> tuple[Path, dict[str, float], str]:
    """The 2 × 2 × 2 sweep, killed inside its third run and started again."""
    folder = tmp_path_factory.mktemp("sweep")
    script = folder / "killing.py"
    script.write_text(KILLING)
    killed = run_offline(
        [sys.executable, str(script), "3", *sweep_args(tiny_bert, sentiment, folder / "s")], folder
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    finished = {
        p.name: (p / MARKER).stat().st_mtime
        for p in (folder / "s").iterdir()
        if (p / MARKER).is_file()
    }
    assert len(finished) == 2
    again = run_offline(
        [sys.executable, "-m", "deltacli", *sweep_args(tiny_bert, sentiment, folder / "s")], folder
    )
    assert again.returncode == 0, again.stderr[-2000:]
    return folder / "s", finished, again.stderr


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_runs(swept):
    folder, finished, log = swept
    assert "sweep: 2 already done, 5 trained, 1 resumed" in " ".join(log.split())
    for name, written in finished.items():
        assert (folder / name / MARKER).stat().st_mtime == written  # not trained again
    runs = json.loads((folder / PLAN_FILE).read_text())["runs"]
    assert len(runs) == 8 and all((folder / r["name"] / MARKER).is_file() for r in runs)
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


@pytest.mark.slow
def test_report_gives_each_method_s_best_lr_mean_and_std_over_seeds(swept, cli):
    folder, _, _ = swept
    code, out, err = cli("report", folder, "--json", "--csv", folder / "report.csv")
    assert code == 0, err
    rows = {row["method"]: row for row in json.loads(out)}
    assert set(rows) == {"lora", "bitfit"}
    plan = json.loads((folder / PLAN_FILE).read_text())["runs"]
    for method, row in rows.items():
        by_lr: dict[str, list[float]] = {}
        for entry in plan:
            if entry["method"] == method:
                metrics = json.loads((folder / entry["name"] / "metrics.json").read_text())
                by_lr.setdefault(entry["grid"]["train.lr"], []).append(metrics["eval"]["accuracy"])
        best = max(by_lr, key=lambda lr: statistics.mean(by_lr[lr]))
        assert row["best"] == {"train.lr": best} and row["seeds"] == 2
        assert row["mean"] == pytest.approx(statistics.mean(by_lr[best]))
        assert row["std"] == pytest.approx(statistics.stdev(by_lr[best]))
    assert (folder / "report.csv").read_text().startswith("method,")


@pytest.mark.slow
def test_report_draws_valid_pngs(swept, cli):
    matplotlib = pytest.importorskip("matplotlib.image")
    folder, _, _ = swept
    code, _, err = cli("report", folder, "--plots", folder / "figures")
    assert code == 0, err
    for name in ("metric-vs-share.png", "curves.png"):
        image = folder / "figures" / name
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.imread(image).shape[0] > 100
    run_curves = next(folder.glob("lora*/curves.png"))  # every run draws its own
    assert matplotlib.imread(run_curves).ndim == 3


@pytest.mark.slow
def test_dry_run_lists_every_run_and_its_status(swept, cli, tiny_bert, sentiment):
    folder, _, _ = swept
    code, out, err = cli(*sweep_args(tiny_bert, sentiment, folder), "--dry-run", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert len(listed) == 8 and {row["status"] for row in listed} == {"done"}
    assert listed[0]["run"] == "lora--lr=x0.5--seed=1"


def test_tensorboard_receives_the_training_log(tiny_bert, sentiment, tmp_path, cli):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, _, err = cli(
        "train", "--method", "lora", "--model", tiny_bert, "--data", sentiment["train"],
        "--eval-data", sentiment["eval"], "data.text=text", "train.max_steps=3",
        "train.log_every=1", "train.report_to=[tensorboard]", "-o", tmp_path / "out",
    )  # fmt: skip
    assert code == 0, err
    (events,) = (tmp_path / "out" / "trackers").glob("*/events.out.tfevents.*")  # the scalars
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert [event.step for event in losses] == [1, 2, 3]
    logged = [
        json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in logged if "loss" in r])
    assert accumulator.Scalars("eval/accuracy")


@pytest.mark.slow
def test_jobs_2_and_submitit_finish_the_runs_that_one_at_a_time_does(
    tiny_bert_no_dropout, sentiment, tmp_path, cli
):
    """The same two runs, one after another in this process, two at once as commands of
    their own (each with half the CPU's threads), and through submitit's local executor:
    the same deltas (float64: the runs' thread counts differ, their sums barely)."""
    from safetensors.torch import load_file

    def sweep(folder: str, *extra: str) -> Path:
        code, _, err = cli(
            "sweep", "--methods", "lora,bitfit", "--model", tiny_bert_no_dropout,
            "--data", sentiment["train"], "--eval-data", sentiment["eval"],
            "-o", tmp_path / folder, "data.text=text", "train.max_steps=3",
            "train.batch_size=16", "base_dtype=fp64", *extra,
        )  # fmt: skip
        assert code == 0, err
        return tmp_path / folder

    serial = sweep("serial")
    parallel = sweep("parallel", "--jobs", "2")
    submitted = sweep("submitted", "--jobs", "2", "--executor", "submitit-local")
    assert sorted(p.name for p in (parallel / ".logs").iterdir()) == [
        "bitfit--seed=42.log",
        "lora--seed=42.log",
    ]
    for run in ("lora--seed=42", "bitfit--seed=42"):
        expected = load_file(serial / run / "adapter_model.safetensors")
        for other in (parallel, submitted):
            assert (other / run / MARKER).is_file()
            got = load_file(other / run / "adapter_model.safetensors")
            assert got.keys() == expected.keys()
            for key, tensor in expected.items():
                assert (got[key] - tensor).abs().max() <= 1e-10
    code, _, err = cli("sweep", "--methods", "lora", "--jobs", "2", "--executor", "slurm",
                       "--dry-run", "-o", tmp_path / "x")  # fmt: skip
    assert code == 0, err


def test_slots_split_gpus_or_threads():
    from deltacli.commands.parallel import slots
    from deltacli.errors import DeltacliError

    assert slots(2, 0, 8) == [{"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}] * 2
    assert slots(2, 8, 16) == [
        {"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
        {"CUDA_VISIBLE_DEVICES": "4,5,6,7"},
    ]
    with pytest.raises(DeltacliError, match="more than this machine's 2 GPU"):
        slots(3, 2, 16)
