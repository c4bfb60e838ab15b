"""The fast step computes what the plain step computes: with the chunked head + loss
(`train.fused_loss`) and compiled layers (`train.compile`), one training step's loss and
gradients equal the eager step's, for every kind, on padded and on packed rows (float32,
through the trainer's own step). And the chunked loss never holds the whole logits.

Every kind's hooks are traced with dynamo + AOT autograd (`aot_eager`: the graphs the
compiler is given, without generating code, a few seconds each); LoRA also runs through
inductor itself, as users run it.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

import deltacli.training.compiling as compiling
import deltacli.training.fused_loss as fused_loss
from deltacli.storage.delta_folder import WEIGHTS_FILE
from deltacli.training.trainer import Trainer
from helpers import assert_close, randomize_trainable, tiny_recipe

KINDS = [
    {"kind": "lora", "r": 4},
    {"kind": "lora", "r": 4, "use_dora": True},
    {"kind": "adapter"},
    {"kind": "adapter", "placement": "parallel", "scale": 4.0},
    {"kind": "prefix", "length": 4},
    {"kind": "prompt", "length": 4},
    {"kind": "ia3"},
    {"kind": "layernorm"},
    {"kind": "sift", "density": 0.05, "select": "magnitude"},
    {"kind": "modules", "targets": ["mlp.down_proj"]},
    {"kind": "full"},
]
ROWS = {"padded": {"max_length": 64}, "packed": {"max_length": 48, "packing": True}}


def first_step(recipe, monkeypatch) -> tuple[float, list[torch.Tensor]]:
    """The first optimizer step's loss and the gradients it hands the optimizer, from
    deltas drawn at random (so no gradient is zero by construction)."""
    torch._dynamo.reset()  # each case compiles anew (no graphs left from another kind)
    counters.clear()
    trainer = Trainer(recipe, console=None)
    randomize_trainable(trainer.model, seed=3, std=0.05)
    grads: list[torch.Tensor] = []
    monkeypatch.setattr(
        trainer.optimizer, "step", lambda: grads.extend(p.grad.clone() for p in trainer.params)
    )
    loss = trainer._step(trainer.epoch_permutation(), 0)
    # Compiled: dynamo captured the layers as graphs (none when it fell back to eager).
    assert (counters["stats"]["unique_graphs"] > 0) == recipe.train.compile
    return loss, grads


def recipe(tiny_llama, instructions, delta: dict, rows: str, **fast):
    made = tiny_recipe(tiny_llama, instructions, delta, task="causal-lm", batch_size=8, **fast)
    for key, value in ROWS[rows].items():
        setattr(made.data, key, value)
    return made


def assert_same_step(eager, fast) -> None:
    assert fast[0] == pytest.approx(eager[0], rel=1e-5)
    assert len(fast[1]) == len(eager[1]) > 0
    for ours, theirs in zip(fast[1], eager[1], strict=True):
        assert theirs.abs().max() > 0
        assert_close(ours, theirs, rel=1e-5)


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("delta", KINDS, ids=lambda d: "-".join(map(str, d.values())))
def test_the_fast_step_equals_the_eager_step(tiny_llama, instructions, delta, rows, monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    monkeypatch.setattr(fused_loss, "CHUNK_ENTRIES", 1)  # a chunk per token
    eager = first_step(recipe(tiny_llama, instructions, delta, rows, fused_loss=False), monkeypatch)
    fast = first_step(
        recipe(tiny_llama, instructions, delta, rows, fused_loss=True, compile=True), monkeypatch
    )
    assert_same_step(eager, fast)


@pytest.mark.parametrize("rows", sorted(ROWS))
def test_inductor_compiles_the_lora_step_to_the_eager_step(
    tiny_llama, instructions, rows, monkeypatch
):
    delta = {"kind": "lora", "r": 4, "targets": ["q_proj", "v_proj", "lm_head"]}
    eager = first_step(recipe(tiny_llama, instructions, delta, rows, fused_loss=False), monkeypatch)
    fast = first_step(
        recipe(tiny_llama, instructions, delta, rows, fused_loss=True, compile=True), monkeypatch
    )
    assert_same_step(eager, fast)


def test_the_chunked_loss_projects_only_counted_tokens_a_chunk_at_a_time(
    tiny_llama, instructions, monkeypatch
):
    """The output layer sees the answer tokens only, never more rows at once than a chunk —
    in the forward pass and in the backward pass's recomputation — so the logits of the
    whole batch never exist."""
    monkeypatch.setattr(fused_loss, "CHUNK_ENTRIES", 5 * 41)  # 41: the tiny vocabulary
    trainer = Trainer(recipe(tiny_llama, instructions, {"kind": "lora"}, "padded"), None)
    assert trainer.head_loss is not None and trainer.head_loss.head.out_features == 41
    rows: list[int] = []
    trainer.head_loss.head.register_forward_hook(lambda m, i, out: rows.append(out.shape[0]))
    monkeypatch.setattr(trainer.optimizer, "step", lambda: None)
    order = trainer.epoch_permutation()
    trainer._step(order, 0)
    counted = sum(trainer.units[i] for i in trainer.plan.step_examples(order, 0))
    assert max(rows) == 5 and sum(rows) == 2 * counted  # forward + recomputed in backward


def test_the_models_head_stays_when_off_or_when_logits_change_after_it(
    tiny_llama, instructions, tmp_path
):
    made = recipe(tiny_llama, instructions, {"kind": "lora"}, "padded")
    assert Trainer(made, None).head_loss is not None
    made.train.fused_loss = False
    assert Trainer(made, None).head_loss is None
    capped = tmp_path / "capped"  # a model that soft-caps its logits (as Gemma 2 does)
    shutil.copytree(tiny_llama, capped)
    config = json.loads((capped / "config.json").read_text())
    (capped / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    assert Trainer(recipe(capped, instructions, {"kind": "lora"}, "padded"), None).head_loss is None


def test_a_compiled_classifier_steps_as_the_eager_one(tiny_bert_no_dropout, sentiment, monkeypatch):
    """The embedded model's family (BERT layers) compiles too; classification has no chunked
    loss, so only the layers change."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    delta = {"kind": "lora", "r": 4}
    eager = first_step(
        tiny_recipe(tiny_bert_no_dropout, sentiment, delta, batch_size=8), monkeypatch
    )
    fast = first_step(
        tiny_recipe(tiny_bert_no_dropout, sentiment, delta, batch_size=8, compile=True),
        monkeypatch,
    )
    assert_same_step(eager, fast)


def test_a_compiled_run_saves_the_delta_an_eager_run_saves(
    cli, tiny_llama, instructions, tmp_path, monkeypatch
):
    """Through the command users run: compiling changes no tensor name and no result."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    runs = {}
    for compiled in ("false", "true"):
        out = tmp_path / compiled
        code, _, err = cli("train", "--model", tiny_llama, "--method", "lora", "task=causal-lm",
                           "--data", instructions["train"], "--eval-data", instructions["eval"],
                           "train.max_steps=3", "train.batch_size=8", "data.max_length=64",
                           f"train.compile={compiled}", "-o", out)  # fmt: skip
        assert code == 0, err
        runs[compiled] = load_file(out / WEIGHTS_FILE)
    assert runs["true"].keys() == runs["false"].keys()
    for name, tensor in runs["false"].items():
        assert_close(runs["true"][name], tensor, rel=1e-5)
