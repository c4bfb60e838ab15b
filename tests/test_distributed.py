"""Two CPU processes (gloo) through `accelerate launch`: one job, trained together, saved once."""

import json
import sys

import pytest
from safetensors.torch import load_file

from helpers import ACCELERATE, assert_close, launcher, run_offline, what_failed


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_two_processes_train_one_delta_and_save_it_once(tiny_bert, sentiment, tmp_path):
    command = [
        *launcher(), "-m", "deltacli", "train", "--method", "lora",
        "--model", str(tiny_bert), "--data", str(sentiment["train"]),
        "--eval-data", str(sentiment["eval"]), "--output", "out",
        "data.text=text", "train.epochs=2", "train.batch_size=8", "train.lr=1e-2", "train.log_every=1",
    ]  # fmt: skip
    done = run_offline(command, tmp_path, timeout=300)
    assert done.returncode == 0, what_failed(done)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # 128 rows in batches of 8 on each of 2 processes: 8 steps an epoch.
    assert metrics["train"]["steps"] == 16 and metrics["train"]["samples"] == 256
    assert metrics["eval"]["examples"] == 64  # gathered from both ranks, duplicates dropped
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses[-1] < losses[0]
    assert done.stdout.count("deltacli train · lora") == 1  # one summary, from rank 0


CHOOSE = """
import hashlib, json, sys
import torch
from deltacli.recipe import parse_recipe
from deltacli.training.trainer import Trainer

trainer = Trainer(parse_recipe(json.loads(sys.argv[1])), console=None)
indices = torch.cat([s.module.sift_indices for s in trainer.deltas.deltas[0].sites.values()])
digest = hashlib.sha1(indices.numpy().tobytes()).hexdigest()
rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
with open(f"{sys.argv[2]}/chosen-{rank}", "w") as out:  # one file a rank: no interleaving
    out.write(f"{rank} {world} {digest}")
"""


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_sift_chooses_the_same_entries_on_every_rank(tiny_bert, sentiment, tmp_path):
    script = tmp_path / "choose.py"
    script.write_text(CHOOSE)
    recipe = {
        "model": str(tiny_bert),
        "data": {"train": str(sentiment["train"]), "eval": str(sentiment["eval"]), "text": "text"},
        "deltas": [{"kind": "sift", "density": 0.02, "select_batches": 2}],
        "train": {"batch_size": 8},
    }
    command = [*launcher(), str(script), json.dumps(recipe), str(tmp_path)]
    done = run_offline(command, tmp_path, timeout=300)
    assert done.returncode == 0, what_failed(done)
    chosen = sorted(path.read_text().split() for path in tmp_path.glob("chosen-*"))
    assert [rank for rank, _, _ in chosen] == ["0", "1"]
    assert {world for _, world, _ in chosen} == {"2"}
    assert len({digest for _, _, digest in chosen}) == 1  # chosen from the summed gradients


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
@pytest.mark.parametrize(
    "deltas",
    [
        # LoRA on query/value and SIFT on key/attention output, composed: one run tests both.
        [
            {"kind": "lora", "r": 4},
            {
                "kind": "sift",
                "density": 0.05,
                "select_batches": 2,
                "targets": ["key", "attention.output.dense"],
            },
        ],
        [{"kind": "full"}],
    ],
    ids=["lora+sift", "full"],
)
def test_two_processes_with_batch_b_equal_one_with_batch_2b(
    tiny_bert_no_dropout, sentiment, tmp_path, deltas
):
    """Data parallelism changes nothing but speed: 2 processes × 8 examples a step train the
    delta 1 process × 16 does (same seed, the same 16 examples a step), to float64 rounding."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": str(tiny_bert_no_dropout), "base_dtype": "fp64",
        "data": {"train": str(sentiment["train"]), "eval": str(sentiment["eval"]), "text": "text"},
        "deltas": deltas, "train": {"max_steps": 4, "lr": 1e-2, "weight_decay": 0.0},
    }))  # fmt: skip
    runs = {
        "one": [sys.executable, "-m", "deltacli", "train", "train.batch_size=16"],
        "two": [*launcher(), "-m", "deltacli", "train", "train.batch_size=8"],
    }
    for name, command in runs.items():
        done = run_offline([*command, "--recipe", str(recipe), "-o", name], tmp_path, timeout=300)
        assert done.returncode == 0, what_failed(done)
    one, two = (load_file(tmp_path / name / "adapter_model.safetensors") for name in runs)
    assert one.keys() == two.keys()
    moved = 0
    for key, tensor in one.items():
        assert_close(two[key], tensor, rel=1e-9)
        moved += int(tensor.is_floating_point() and bool((tensor != 0).any()))
    assert moved  # the comparison saw trained values
