"""The second round of trust (issue 18) where one bad-input line is not the whole story: runs
that must not replace or mix with one another, writes that fail half-way, output for people
and for scripts. Each test goes through the command line, as a user would."""

import errno
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import SafetensorError

from deltacli.files.outputs import MARKER
from deltacli.storage.delta_folder import RECIPE_FILE
from helpers import write_csv

OUT = "out"


def train_args(fx: dict, out: Path, *extra: str) -> list:
    return [
        "train", "--method", "lora", "--model", fx["bert"], "--data", fx["train"],
        "--eval-data", fx["eval"], "data.text=text", *extra, "-o", out,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fx(tiny_bert, sentiment, tmp_path_factory) -> dict:
    from deltacli.training.runs import train
    from helpers import tiny_recipe

    folder = tmp_path_factory.mktemp("trust")
    for kind in ("lora", "prefix"):
        train(tiny_recipe(tiny_bert, sentiment, {"kind": kind}, max_steps=1), folder / kind)
    return {"bert": tiny_bert, "train": sentiment["train"], "eval": sentiment["eval"]} | {
        "lora": folder / "lora",
        "prefix": folder / "prefix",
    }


def one_error_line(err: str, message: str, label: str = "error") -> None:
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith(f"{label}: ") and message in " ".join(lines[-1].split()), err
    assert sum(line.startswith(("error:", "interrupted:")) for line in lines) == 1, err


def interrupted_run(fx, cli, monkeypatch, out: Path, *extra: str) -> None:
    """A run whose final write failed after a checkpoint: it leaves a resumable scratch."""
    from deltacli.training import runs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(runs, "save_delta", full)
        code, _, err = cli(*train_args(fx, out, "train.max_steps=4", "train.save_every=2", *extra))
    assert code == 2 and "its last checkpoint is kept" in err, err


def test_resume_does_not_replace_a_newer_finished_run(fx, cli, monkeypatch, tmp_path):
    interrupted_run(fx, cli, monkeypatch, tmp_path / OUT)
    code, _, err = cli(*train_args(fx, tmp_path / OUT, "train.max_steps=2"))  # run B finishes
    assert code == 0, err
    newer = (tmp_path / OUT / "adapter_model.safetensors").read_bytes()
    code, _, err = cli("train", "--resume", tmp_path / OUT)
    assert code == 2
    one_error_line(err, "holds a run that finished after this checkpoint")
    assert (tmp_path / OUT / "adapter_model.safetensors").read_bytes() == newer


def test_a_run_that_finds_its_output_taken_at_the_end_keeps_both(fx, cli, monkeypatch, tmp_path):
    """Two runs writing one -o at once: the second to finish must not replace the first."""
    from deltacli.training import runs

    real = runs.save_delta

    def and_another_run_finishes(*args, **kwargs):
        real(*args, **kwargs)
        (tmp_path / OUT).mkdir()
        (tmp_path / OUT / MARKER).write_text("{}")
        (tmp_path / OUT / "theirs.txt").write_text("the other run's delta")

    monkeypatch.setattr(runs, "save_delta", and_another_run_finishes)
    code, _, err = cli(*train_args(fx, tmp_path / OUT, "train.max_steps=1"))
    assert code == 2
    one_error_line(err, "was written by another command meanwhile; this result was saved to")
    assert (tmp_path / OUT / "theirs.txt").is_file()  # the other run's result stands
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(f"{OUT}-")]
    assert len(kept) == 1 and (kept[0] / "adapter_model.safetensors").is_file()


def test_resume_refuses_changed_data_and_a_budget_below_the_checkpoint(
    fx, cli, monkeypatch, tmp_path
):
    data = write_csv(tmp_path / "train.csv", [(f"good film {i}", "pos") for i in range(12)])
    with data.open("a") as file:
        file.writelines(f"bad film {i},neg\n" for i in range(12))
    args = ["--data", str(data)]
    interrupted_run(fx, cli, monkeypatch, tmp_path / OUT, *args)
    code, _, err = cli("train", "--resume", tmp_path / OUT, "train.max_steps=1")
    assert code == 2
    one_error_line(
        err, "the run is 1 steps long with these settings, but its checkpoint is at step"
    )

    rows = data.read_text().replace("good film 3,pos", "good film 3,neg")  # a label flipped
    data.write_text(rows)
    code, _, err = cli("train", "--resume", tmp_path / OUT)
    assert code == 2
    one_error_line(err, "the training data changed since")
    assert not (tmp_path / OUT).exists()


def test_a_saved_recipe_names_its_base_and_data_wherever_it_is_read(fx, cli, monkeypatch, tmp_path):
    """Relative paths are saved absolute: `eval` from another folder uses the same base (a
    relative `base` there would have been another model)."""
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(fx["bert"], work / "base")
    shutil.copy(fx["train"], work / "train.csv")
    monkeypatch.chdir(work)
    code, _, err = cli(
        "train", "--method", "lora", "--model", "base", "--data", "train.csv", "--eval-data",
        fx["eval"], "data.text=text", "train.max_steps=1", "-o", "delta",
    )  # fmt: skip
    assert code == 0, err
    saved = yaml.safe_load((work / "delta" / RECIPE_FILE).read_text())
    assert saved["model"] == str(work / "base") and saved["data"]["train"] == str(
        work / "train.csv"
    )
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "base").mkdir(parents=True)  # a different folder called base
    monkeypatch.chdir(elsewhere)
    code, out, err = cli("eval", "--delta", work / "delta", "--data", fx["eval"], "--json")
    assert code == 0, err
    assert "accuracy" in json.loads(out)


def test_a_sweep_folder_refuses_other_data_instead_of_calling_it_done(fx, cli, tmp_path):
    sweep = ["sweep", "--methods", "lora", "--model", fx["bert"], "--eval-data", fx["eval"]]
    common = ["data.text=text", "train.max_steps=1", "-o", tmp_path / "sweep"]
    code, _, err = cli(*sweep, "--data", fx["train"], *common)
    assert code == 0, err
    plan = (tmp_path / "sweep" / "sweep.json").read_text()
    other = write_csv(tmp_path / "other.csv", [("fine", "pos"), ("dull", "neg")] * 4)
    code, _, err = cli(*sweep, "--data", other, *common)
    assert code == 2
    one_error_line(err, "holds a sweep with other settings")
    assert (tmp_path / "sweep" / "sweep.json").read_text() == plan


def failing_write(monkeypatch, name_part: str) -> None:
    """safetensors fails (a full disk, as it reports it) when writing a file whose name
    holds `name_part`; other files are written."""
    from deltacli.files import tensors as tensor_files

    real = tensor_files.save_file

    def save(tensors, path, metadata=None):
        if name_part in Path(path).name:
            raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(tensor_files, "save_file", save)


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ("initial", "No space left on device"),
        ("rng-", "No space left on device"),
        ("state", "cannot write the checkpoint at step 2"),
        ("adapter_model", "cannot write the trained delta"),
    ],
)
def test_a_full_disk_at_each_training_write_is_one_line(
    fx, cli, monkeypatch, tmp_path, file, message
):
    failing_write(monkeypatch, file)
    code, _, err = cli(*train_args(fx, tmp_path / OUT, "train.max_steps=4", "train.save_every=2"))
    assert code == 2
    one_error_line(err, message)
    assert not (tmp_path / OUT).exists()
    if file in ("initial", "rng-", "state"):  # no checkpoint was kept: nothing is left
        assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_sparsify_and_subspace_is_one_line(fx, cli, monkeypatch, tmp_path):
    failing_write(monkeypatch, "adapter_model")
    code, _, err = cli("sparsify", fx["bert"], fx["lora"], tmp_path / OUT)
    assert code == 2
    one_error_line(err, "No space left on device")
    failing_write(monkeypatch, "subspace")
    code, _, err = cli(
        "subspace", "fit", fx["lora"], fx["prefix"], "-o", tmp_path / OUT, "--steps", "1"
    )
    assert code == 2
    one_error_line(err, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_text_column_of_digits_trains(fx, cli, tmp_path):
    rows = [(str(1000 + i), "pos" if i % 2 else "neg") for i in range(16)]
    data = write_csv(tmp_path / "digits.csv", rows)
    code, _, err = cli(
        "train", "--method", "lora", "--model", fx["bert"], "--data", data,
        "--eval-data", data, "data.text=text", "train.max_steps=1", "-o", tmp_path / OUT,
    )  # fmt: skip
    assert code == 0, err


def test_overwrite_through_a_symlink_leaves_no_stray_link(fx, cli, tmp_path):
    import shutil

    shutil.copytree(fx["lora"], tmp_path / "real")
    (tmp_path / OUT).symlink_to(tmp_path / "real")
    code, _, err = cli(*train_args(fx, tmp_path / OUT, "train.max_steps=1", "--overwrite"))
    assert code == 0, err
    assert (tmp_path / OUT / MARKER).is_file() and not (tmp_path / OUT).is_symlink()
    assert (tmp_path / "real" / MARKER).is_file()  # the link's target is not deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == [OUT, "real"]
    code, _, err = cli(*train_args(fx, tmp_path / OUT, "train.max_steps=1", "--overwrite"))
    assert code == 0 and "removed" not in err, err


def test_library_log_lines_are_kept_off_stderr(capsys):
    from deltacli.cli import quiet_libraries

    quiet_libraries()
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm")
    logging.getLogger("datasets.builder").warning("a datasets line")
    assert capsys.readouterr().err == ""


def test_a_second_ctrl_c_says_the_checkpoint_is_kept_and_how_to_resume(
    fx, cli, monkeypatch, tmp_path
):
    from deltacli.training.interrupts import Stopped
    from deltacli.training.trainer import Trainer

    real = Trainer._step

    def step(self, order, index):
        if self.step == 3:  # after the checkpoint at step 2: a Ctrl-C that stops at once
            raise Stopped(signal.SIGINT)
        return real(self, order, index)

    monkeypatch.setattr(Trainer, "_step", step)
    code, _, err = cli(*train_args(fx, tmp_path / OUT, "train.max_steps=6", "train.save_every=2"))
    assert code == 130
    one_error_line(
        err,
        f"last checkpoint (step-000002) is kept: continue it with deltacli train --resume "
        f"{tmp_path / OUT}",
        label="interrupted",
    )
    monkeypatch.undo()
    code, _, err = cli("train", "--resume", tmp_path / OUT)
    assert code == 0, err


@pytest.mark.slow
def test_recipes_print_raw_yaml_when_piped():
    """`deltacli recipes NAME > my.yaml`: the file is the recipe, byte for byte."""
    from deltacli.recipe import shipped_recipes

    longest = max(
        shipped_recipes().items(), key=lambda item: max(map(len, item[1].read_text().splitlines()))
    )
    printed = subprocess.run(
        [sys.executable, "-m", "deltacli", "recipes", longest[0]],
        capture_output=True, text=True, env={"COLUMNS": "40", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == longest[1].read_text()
    assert max(map(len, printed.stdout.splitlines())) > 40  # long lines were not wrapped


def test_training_off_a_terminal_prints_plain_progress_lines(fx, cli, tmp_path):
    code, _, err = cli(*train_args(fx, tmp_path / OUT, "train.max_steps=4", "train.log_every=2"))
    assert code == 0, err
    lines = [line for line in err.splitlines() if " step " in line]
    assert [line.split(" step ")[1].split(" ")[0] for line in lines] == ["2/4", "4/4"], err
    assert all("loss" in line and "samples/s" in line and "ETA" in line for line in lines)


def test_report_csv_into_a_missing_folder_creates_it(fx, cli, tmp_path):
    code, _, err = cli("report", fx["lora"], "--csv", tmp_path / "new" / "deeper" / "t.csv")
    assert code == 0, err
    header = (tmp_path / "new" / "deeper" / "t.csv").read_text().splitlines()[0]
    assert header.startswith("method,trainable,share,metric,mean,std")
    assert [p.name for p in (tmp_path / "new" / "deeper").iterdir()] == ["t.csv"]  # no partial
