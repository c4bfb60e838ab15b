"""Interrupted runs resume exactly: after kill -9 or Ctrl-C, `train --resume` reaches the same
delta, bit for bit, with the same losses and eval scores at every step as a run that was
never stopped (one process, and two under gloo)."""

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltacli.files.outputs import MARKER
from deltacli.storage.delta_folder import WEIGHTS_FILE
from helpers import ACCELERATE, STOPPING, launcher, run_offline, what_failed


def args(tiny_bert, sentiment, output, *extra) -> list[str]:
    """Two epochs of 8 steps (dropout on, so random state matters), a checkpoint every
    3 steps and at each epoch's end."""
    return [
        "train", "--method", "lora", "--model", str(tiny_bert), "--data", str(sentiment["train"]),
        "--eval-data", str(sentiment["eval"]), "--output", str(output), "data.text=text",
        "train.epochs=2", "train.batch_size=16", "train.log_every=1", "train.save_every=3",
        "train.keep_checkpoints=2",
        *extra,
    ]  # fmt: skip


def deltacli(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "deltacli", *arguments]


def stopping(script: Path, how: str, step: int, *arguments: str) -> list[str]:
    return [sys.executable, str(script), how, str(step), *arguments]


def outcome(folder: Path) -> tuple[dict, list[dict], list]:
    """The delta's tensors, the training log without clock readings, the eval history."""
    tensors = load_file(folder / WEIGHTS_FILE)
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    history = json.loads((folder / "metrics.json").read_text())["history"]
    return tensors, log, history


def assert_same(resumed: Path, uninterrupted: Path) -> None:
    tensors, log, history = outcome(resumed)
    expected_tensors, expected_log, expected_history = outcome(uninterrupted)
    assert tensors.keys() == expected_tensors.keys()
    assert all(torch.equal(tensors[k], expected_tensors[k]) for k in tensors)  # bit for bit
    assert log == expected_log  # every step's loss and lr, every epoch's scores
    assert history == expected_history


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert, sentiment) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    done = run_offline(deltacli(*args(tiny_bert, sentiment, "out")), folder)
    assert done.returncode == 0, what_failed(done)
    return folder / "out"


@pytest.mark.slow
@pytest.mark.parametrize(("how", "step", "code"), [("kill", 7, -9), ("int", 10, 130)])
def test_a_stopped_run_resumes_to_the_same_delta(
    tmp_path, tiny_bert, sentiment, uninterrupted, how, step, code
):
    script = tmp_path / "stopping.py"
    script.write_text(STOPPING)
    stopped = run_offline(stopping(script, how, step, *args(tiny_bert, sentiment, "out")), tmp_path)
    assert stopped.returncode == code, what_failed(stopped)
    assert not (tmp_path / "out").exists()  # nothing that looks complete
    if how == "int":  # one line: where the checkpoint is, and how to continue
        (line,) = stopped.stderr.strip().splitlines()[-1:]
        assert line.startswith("interrupted: stopped at step 10 of 16; checkpoint saved in ")
        assert line.endswith("continue with: deltacli train --resume out")
    resumed = run_offline(deltacli("train", "--resume", "out"), tmp_path)
    assert resumed.returncode == 0, what_failed(resumed)
    assert "resumed from" in resumed.stderr
    assert_same(tmp_path / "out", uninterrupted)
    assert (tmp_path / "out" / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stopping.py"]  # no leftovers


def test_resume_refuses_what_would_change_the_run_and_what_cannot_resume(
    tmp_path, tiny_bert, sentiment, cli
):
    code, _, err = cli("train", "--resume", tmp_path / "nothing")
    assert code == 2 and "no checkpoint of a run writing" in err
    code, _, err = cli("train", "--resume", tmp_path / "out", "data.max_length=16")
    assert code == 2 and "other train.* settings may change" in err
    code, _, err = cli("train", "--resume", tmp_path / "out", "--method", "lora")
    assert code == 2 and "--resume continues a run with its saved recipe" in err
    code, _, err = cli(*args(tiny_bert, sentiment, tmp_path / "done", "train.max_steps=1"))
    assert code == 0, err
    code, _, err = cli("train", "--resume", tmp_path / "done")
    assert code == 2 and "is a finished run" in err


# Runs the CLI with the second process reading its random state from a checkpoint 3 s late.
LATE_READER = """
import sys, time
from deltacli.training import trainer
from deltacli.cli import main

restore = trainer.restore_random_state

def late(path, rank):
    if rank == 1:
        time.sleep(3)
    restore(path, rank)

trainer.restore_random_state = late
sys.exit(main())
"""


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_two_processes_resume_to_the_same_delta_after_kill_9(tmp_path, tiny_bert, sentiment):
    two = [*args(tiny_bert, sentiment, "out"), "train.batch_size=8"]
    reference = tmp_path / "reference"
    reference.mkdir()
    done = run_offline([*launcher(), "-m", "deltacli", *two], reference)
    assert done.returncode == 0, what_failed(done)

    script = tmp_path / "stopping.py"
    script.write_text(STOPPING)
    killed = run_offline([*launcher(), str(script), "kill", "5", *two], tmp_path)
    assert killed.returncode != 0
    # The second process reads its part of the checkpoint last, as a slower machine may: the
    # main one must not move the folder it reads from meanwhile (a race CI once lost).
    late = tmp_path / "late.py"
    late.write_text(LATE_READER)
    resumed = run_offline([*launcher(), str(late), "train", "--resume", "out"], tmp_path)
    assert resumed.returncode == 0, what_failed(resumed)
    assert_same(tmp_path / "out", reference / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_exit_143(tmp_path, tiny_bert, sentiment):
    script = tmp_path / "stopping.py"
    script.write_text(STOPPING.replace("signal.SIGINT", "signal.SIGTERM"))
    stopped = run_offline(stopping(script, "term", 4, *args(tiny_bert, sentiment, "out")), tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, what_failed(stopped)
    assert "checkpoint saved in" in stopped.stderr and "--resume out" in stopped.stderr


def test_a_checkpoint_of_another_process_count_is_refused(tmp_path):
    """Each process continues its own random state: a run checkpointed by 2 processes
    resumes with 2 (FSDP's shards are gathered whole in the file; the refusal is about the
    per-process random state and data shares)."""
    from safetensors.torch import save_file

    from deltacli.errors import DeltacliError
    from deltacli.training.checkpoints import STATE_JSON, STATE_TENSORS, read_checkpoint

    (tmp_path / STATE_JSON).write_text(json.dumps({"processes": 2}))
    save_file({"order": torch.zeros(1)}, tmp_path / STATE_TENSORS)
    with pytest.raises(DeltacliError, match=r"written by 2 process\(es\); resume it with as many"):
        read_checkpoint(tmp_path, 0, 1)
