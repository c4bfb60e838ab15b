"""`deltas.N.init_from`: a delta starts from a saved one of its kind (SFT before DPO, or a
delta of another task), its head along where the labels are the same."""

import pytest
import torch

from deltacli.storage.delta_folder import read_delta
from deltacli.training.runs import train
from deltacli.training.trainer import Trainer
from helpers import tiny_recipe, write_csv


@pytest.fixture(scope="module")
def trained(tiny_bert, sentiment, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    for kind, delta in {"lora": {"kind": "lora", "r": 4}, "prefix": {"kind": "prefix"}}.items():
        train(tiny_recipe(tiny_bert, sentiment, delta, max_steps=3), folder / kind)
    return folder


def test_a_delta_starts_from_the_saved_one_head_included(tiny_bert, sentiment, trained):
    source = read_delta(trained / "lora")
    recipe = tiny_recipe(
        tiny_bert, sentiment, {"kind": "lora", "r": 4, "init_from": str(trained / "lora")}
    )
    trainer = Trainer(recipe, console=None)
    keys = trainer.deltas.keys()
    start = trainer.deltas.state_dict()
    assert trainer.deltas.head is not None
    for name, value in start.items():
        assert torch.equal(value, source.tensors[keys[name]]), name
    lora = trainer.deltas.deltas[0].params  # what the run keeps as its start
    assert all(torch.equal(trainer.initial[keys[n]], source.tensors[keys[n]]) for n in lora)


def test_a_head_for_other_labels_starts_fresh_and_says_so(tiny_bert, trained, tmp_path, cli):
    rows = [(f"{w} film", label) for w, label in [("good", "a"), ("bad", "b"), ("dull", "c")] * 8]
    data = write_csv(tmp_path / "three.csv", rows)
    code, _, err = cli(
        "train", "--method", "lora", "--model", tiny_bert, "--data", data, "--eval-data", data,
        "data.text=text", "deltas.0.r=4", f"deltas.0.init_from={trained / 'lora'}",
        "train.max_steps=1", "-o", tmp_path / "out",
    )  # fmt: skip
    assert code == 0, err
    assert "the task head starts fresh (it was trained for labels ['neg', 'pos']" in err


@pytest.mark.parametrize(
    ("method", "override", "message"),
    [
        ("lora", "deltas.0.r=8", "does not fit this lora delta"),
        ("ia3", "train.lr=1e-2", "holds lora, not a ia3 delta"),
    ],
)
def test_a_source_of_another_kind_or_size_is_refused(
    tiny_bert, sentiment, trained, tmp_path, cli, method, override, message
):
    code, _, err = cli(
        "train", "--method", method, "--model", tiny_bert, "--data", sentiment["train"],
        "--eval-data", sentiment["eval"], "data.text=text", override,
        f"deltas.0.init_from={trained / 'lora'}", "train.max_steps=1", "-o", tmp_path / "out",
    )  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and message in lines[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()
