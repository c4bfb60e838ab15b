"""The fast step computes what the plain step computes: with the chunked head + loss
(`train.fused_loss`) and compiled layers (`train.compile`), one training step's loss and
gradients equal the eager step's, for every kind, on padded and on packed rows (float32,
through the trainer's own step), and no kind's hooks break a compiled layer's graph. The
chunked loss never holds the whole logits; liger's kernel (`train.loss_kernel=liger`) gives
the same step.

Every kind's hooks are traced with dynamo + AOT autograd (`aot_eager`: the graphs the
compiler is given, without generating code, a few seconds each); LoRA also runs through
inductor itself, as users run it.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

import deltacli.tasks.fused_loss as fused_loss
import deltacli.training.compiling as compiling
from deltacli.commands.subspace import fit
from deltacli.recipe import parse_recipe, recipe_to_dict
from deltacli.storage.delta_folder import WEIGHTS_FILE
from deltacli.tasks.evaluation import evaluate
from deltacli.training.runs import train
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
    {"kind": "bitfit"},  # on a Llama with biases (Llama has none)
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
    # Compiled: dynamo captured the layers as graphs (none when it fell back to eager),
    # each layer whole: no delta's hook broke its graph.
    assert (counters["stats"]["unique_graphs"] > 0) == recipe.train.compile
    assert not counters["graph_break"], dict(counters["graph_break"])
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


def assert_fast_step_is_eager(model, instructions, delta, rows, monkeypatch) -> None:
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    monkeypatch.setattr(fused_loss, "CHUNK_ENTRIES", 1)  # a chunk per token
    eager = first_step(recipe(model, instructions, delta, rows, fused_loss=False), monkeypatch)
    fast = first_step(
        recipe(model, instructions, delta, rows, fused_loss=True, compile=True), monkeypatch
    )
    assert_same_step(eager, fast)


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("delta", KINDS, ids=lambda d: "-".join(map(str, d.values())))
def test_the_fast_step_equals_the_eager_step(request, instructions, delta, rows, monkeypatch):
    model = request.getfixturevalue("biased_llama" if delta["kind"] == "bitfit" else "tiny_llama")
    assert_fast_step_is_eager(model, instructions, delta, rows, monkeypatch)


@pytest.fixture(scope="module")
def llama_space(tmp_path_factory, tiny_llama, instructions) -> Path:
    """A subspace fitted on the tiny Llama to a LoRA and an IA3 run (an epoch each)."""
    root = tmp_path_factory.mktemp("llama-space")
    folders = []
    for delta in ({"kind": "lora", "r": 4}, {"kind": "ia3"}):
        made = tiny_recipe(tiny_llama, instructions, delta, task="causal-lm", epochs=1)
        folders.append(root / delta["kind"])
        train(parse_recipe({**recipe_to_dict(made), "name": delta["kind"]}), folders[-1])
    fit(folders, root / "space", dim=3, steps=5, lr=1e-2)
    return root / "space"


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("through", ["lora", "ia3"])
def test_the_fast_step_through_a_subspace_equals_the_eager_step(
    tiny_llama, llama_space, instructions, through, rows, monkeypatch
):
    """The subspace kind computes its method's tensors from z by parametrizations, which
    the compiled layers trace with the rest."""
    delta = {"kind": "subspace", "subspace": str(llama_space), "through": through}
    assert_fast_step_is_eager(tiny_llama, instructions, delta, rows, monkeypatch)


def test_inductor_compiles_the_lora_step_to_the_eager_step(tiny_llama, instructions, monkeypatch):
    """Code generated by inductor, as users run it (padded rows; packed ones are traced
    above), with a LoRA on the output layer that the chunked loss calls."""
    rows, delta = "padded", {"kind": "lora", "r": 4, "targets": ["q_proj", "v_proj", "lm_head"]}
    eager = first_step(recipe(tiny_llama, instructions, delta, rows, fused_loss=False), monkeypatch)
    fast = first_step(
        recipe(tiny_llama, instructions, delta, rows, fused_loss=True, compile=True), monkeypatch
    )
    assert_same_step(eager, fast)


HEADS = {
    # A plain output layer: each chunk's gradients computed in the forward pass, once.
    "plain head": ({"kind": "lora"}, 1),
    # A LoRA on it: called as a module, each chunk recomputed in the backward pass.
    "head with a delta": ({"kind": "lora", "targets": ["q_proj", "lm_head"]}, 2),
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_the_chunked_loss_projects_only_counted_tokens_a_chunk_at_a_time(
    tiny_llama, instructions, monkeypatch, head
):
    """The output layer sees the answer tokens only, never more rows at once than a chunk —
    so the logits of the whole batch never exist — once per chunk where its gradients come
    with the forward pass, twice where the backward pass recomputes it."""
    delta, passes = HEADS[head]
    monkeypatch.setattr(fused_loss, "CHUNK_ENTRIES", 5 * 41)  # 41: the tiny vocabulary
    trainer = Trainer(recipe(tiny_llama, instructions, delta, "padded"), None)
    assert trainer.head_loss is not None and trainer.head_loss.head.out_features == 41
    assert trainer.head_loss.reads_weight == (passes == 1)
    rows: list[int] = []
    trainer.head_loss.head.register_forward_hook(lambda m, i, out: rows.append(out.shape[0]))
    logits = fused_loss._logits
    monkeypatch.setattr(fused_loss, "_logits", lambda *a: rows.append(len(a[0])) or logits(*a))
    monkeypatch.setattr(trainer.optimizer, "step", lambda: None)
    order = trainer.epoch_permutation()
    trainer._step(order, 0)
    counted = sum(trainer.units[i] for i in trainer.plan.step_examples(order, 0))
    assert max(rows) == 5 and sum(rows) == passes * counted


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
        code, out_text, err = cli("train", "--model", tiny_llama, "--method", "lora", "task=causal-lm",
                           "--data", instructions["train"], "--eval-data", instructions["eval"],
                           "train.max_steps=3", "train.batch_size=8", "data.max_length=64",
                           f"train.compile={compiled}", "-o", out)  # fmt: skip
        assert code == 0, err
        assert ("train.compile: 2 layers compile" in out_text + err) == (compiled == "true")
        runs[compiled] = load_file(out / WEIGHTS_FILE)
    assert runs["true"].keys() == runs["false"].keys()
    for name, tensor in runs["false"].items():
        assert_close(runs["true"][name], tensor, rel=1e-5)


def test_a_batch_with_no_counted_token_adds_a_zero_that_reaches_the_head(tiny_llama, instructions):
    """Answers cut away by max_length leave nothing to count: the loss is 0, as the plain
    cross-entropy's is, and the backward pass still reaches a trained output layer."""
    delta = {"kind": "lora", "r": 4, "targets": ["q_proj", "lm_head"]}
    trainer = Trainer(recipe(tiny_llama, instructions, delta, "padded"), None)
    batch, _ = trainer.micro_batches(trainer.epoch_permutation(), 0)[0]
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, _ = trainer._summed_loss(batch)
    loss.backward()
    assert loss.item() == 0.0
    head_b = next(p for name, p in trainer.deltas.parameters().items() if "lm_head" in name)
    assert head_b.grad is not None and not head_b.grad.any()


def test_over_a_bf16_base_the_chunks_run_under_the_forwards_autocast(
    tiny_llama, instructions, monkeypatch
):
    """A half-precision base runs under accelerate's autocast, which wraps the model's
    forward only: the output layer, called outside it, must run under the same autocast
    (the plain head computes its logits in bf16 there). Equal to bf16's rounding."""
    delta = {"kind": "lora", "r": 4}
    eager = first_step(
        recipe(tiny_llama, instructions, delta, "padded", fused_loss=False, base_dtype="bf16"),
        monkeypatch,
    )
    fast = first_step(
        recipe(tiny_llama, instructions, delta, "padded", base_dtype="bf16"), monkeypatch
    )
    assert fast[0] == pytest.approx(eager[0], rel=1e-3)
    for ours, theirs in zip(fast[1], eager[1], strict=True):
        assert_close(ours, theirs, rel=1e-2)


EVAL_CASES = {
    "padded": ({"kind": "lora", "r": 4, "targets": ["q_proj", "lm_head"]}, "padded"),
    "packed": ({"kind": "lora", "r": 4}, "packed"),
    "prompt": ({"kind": "prompt", "length": 4}, "padded"),  # positions prepended
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_evaluation_scores_with_the_chunked_head_what_the_whole_logits_score(
    tiny_llama, instructions, monkeypatch, case
):
    """Evaluation runs the output layer a chunk of counted positions at a time too (a
    64-row eval batch's logits would otherwise be the run's peak): the same loss and token
    count as from the whole logits, the head never seeing more than a chunk."""
    delta, rows = EVAL_CASES[case]
    monkeypatch.setattr(fused_loss, "CHUNK_ENTRIES", 3 * 41)  # 41: the tiny vocabulary
    trainer = Trainer(recipe(tiny_llama, instructions, delta, rows), None)
    randomize_trainable(trainer.model, seed=3, std=0.05)
    head = trainer.head_loss.head
    seen: list[int] = []
    hook = head.register_forward_hook(lambda m, i, out: seen.append(out.shape[0]))
    chunked = evaluate(trainer.model, trainer.eval_batches, trainer.accelerator, trainer.task,
                       train=trainer.recipe.train)  # fmt: skip
    hook.remove()
    trainer.recipe.train.fused_loss = False  # train.fused_loss=false: the whole logits
    whole = evaluate(trainer.model, trainer.eval_batches, trainer.accelerator, trainer.task,
                     train=trainer.recipe.train)  # fmt: skip
    assert chunked["tokens"] == whole["tokens"] == sum(seen) > 0
    assert max(seen) == 3
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_evaluation_over_a_bf16_base_chunks_under_the_forwards_autocast(tiny_llama, instructions):
    trainer = Trainer(recipe(tiny_llama, instructions, {"kind": "lora"}, "padded",
                             base_dtype="bf16"), None)  # fmt: skip
    train = trainer.recipe.train
    chunked = evaluate(trainer.model, trainer.eval_batches, trainer.accelerator, trainer.task,
                       train=train)  # fmt: skip
    train.fused_loss = False
    whole = evaluate(trainer.model, trainer.eval_batches, trainer.accelerator, trainer.task,
                     train=train)  # fmt: skip
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-2)


LIGER_CASES = {
    "lora": {"kind": "lora", "r": 4},
    "full": {"kind": "full"},  # the output layer's weight trains: liger's weight gradient
}


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("case", sorted(LIGER_CASES))
def test_liger_s_kernel_steps_as_the_models_head(tiny_llama, instructions, case, rows, monkeypatch):
    """`train.loss_kernel=liger`: liger-kernel's fused linear cross-entropy (its Triton
    kernels run by Triton's interpreter on the CPU) gives the plain step's loss and
    gradients, padded and packed, and it is what ran."""
    ran: list[int] = []
    summed = fused_loss.LigerHeadLoss._summed
    monkeypatch.setattr(fused_loss.LigerHeadLoss, "_summed",
                        lambda self, hidden, targets: ran.append(len(targets)) or summed(self, hidden, targets))  # fmt: skip
    delta = LIGER_CASES[case]
    eager = first_step(recipe(tiny_llama, instructions, delta, rows, fused_loss=False), monkeypatch)
    assert not ran
    liger = first_step(
        recipe(tiny_llama, instructions, delta, rows, loss_kernel="liger"), monkeypatch
    )
    assert ran and all(ran)
    assert_same_step(eager, liger)


def test_liger_over_a_bf16_base_gives_the_models_head_s_step(tiny_llama, instructions, monkeypatch):
    """Over a half-precision base (bf16 hidden states and output layer) liger's kernels
    give the plain head's step, to bf16's rounding."""
    delta = {"kind": "lora", "r": 4}
    eager = first_step(
        recipe(tiny_llama, instructions, delta, "padded", fused_loss=False, base_dtype="bf16"),
        monkeypatch,
    )
    liger = first_step(
        recipe(tiny_llama, instructions, delta, "padded", loss_kernel="liger", base_dtype="bf16"),
        monkeypatch,
    )
    assert liger[0] == pytest.approx(eager[0], rel=1e-3)
    for ours, theirs in zip(liger[1], eager[1], strict=True):
        assert_close(ours, theirs, rel=1e-2)


def test_liger_leaves_a_head_with_a_delta_to_the_chunked_loss(
    cli, tiny_llama, instructions, tmp_path
):
    """liger reads the output layer's weight, so a LoRA on it (a hook) would be lost: the
    chunked loss runs, and the run says so."""
    code, out, err = cli("train", "--model", tiny_llama, "--method", "lora", "task=causal-lm",
                         "--data", instructions["train"], "--eval-data", instructions["eval"],
                         "deltas.0.targets=[q_proj,lm_head]", "train.loss_kernel=liger",
                         "train.max_steps=1", "-o", tmp_path / "run")  # fmt: skip
    assert code == 0, err
    assert "train.loss_kernel=liger: a delta or quantisation changes the output layer" in out + err


@pytest.mark.parametrize("where", ["cpu", "not installed"])
def test_liger_where_it_cannot_run_is_one_line(
    cli, tiny_llama, instructions, tmp_path, monkeypatch, where
):
    if where == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")  # a CPU without the interpreter
        message = "train.loss_kernel=liger runs Triton kernels on a GPU; this run is on the cpu: use train.loss_kernel=chunked"
    else:
        monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
        message = "train.loss_kernel=liger needs liger-kernel: pip install 'deltacli[liger]'"
    code, _, err = cli("train", "--model", tiny_llama, "--method", "lora", "task=causal-lm",
                       "--data", instructions["train"], "--eval-data", instructions["eval"],
                       "train.loss_kernel=liger", "-o", tmp_path / "run")  # fmt: skip
    assert code == 2 and err.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists()
