"""Every method learns causal-LM and seq2seq tasks: Llama, T5, GPT-2, BART."""

import pytest

from deltacli.errors import DeltacliError
from deltacli.tasks.evaluation import evaluate
from deltacli.training.logs import MetricsLog
from deltacli.training.trainer import Trainer
from helpers import tiny_recipe

LLAMA_METHODS = {
    "lora": {"kind": "lora", "r": 4},
    "houlsby-adapter": {"kind": "adapter", "at": "attention", "r": 8},
    "parallel-adapter": {"kind": "adapter", "placement": "parallel", "r": 8, "scale": 4.0},
    "prefix": {"kind": "prefix", "length": 4},
    "prompt": {"kind": "prompt", "length": 4},
    "ia3": {"kind": "ia3"},
    "layernorm": {"kind": "layernorm"},
    "sift": {"kind": "sift", "density": 0.05},
    "full": {"kind": "full"},
}
T5_METHODS = {**LLAMA_METHODS, "bitfit": None}  # T5 has no biases either


def loss_goes_down(recipe):
    trainer = Trainer(recipe, console=None)
    before = evaluate(trainer.model, trainer.eval_batches, trainer.accelerator, trainer.task)
    after = trainer.fit(MetricsLog(None))["eval"]
    assert after["loss"] < before["loss"]
    assert after["perplexity"] < before["perplexity"]
    return trainer


@pytest.mark.parametrize("method", LLAMA_METHODS)
def test_every_method_learns_instructions_on_a_tiny_llama(tiny_llama, instructions, method):
    lr = 1e-3 if method == "full" else 1e-2
    loss_goes_down(
        tiny_recipe(tiny_llama, instructions, LLAMA_METHODS[method], lr=lr, task="causal-lm")
    )


@pytest.mark.parametrize("method", [m for m, d in T5_METHODS.items() if d])
def test_every_method_learns_pairs_on_a_tiny_t5(tiny_t5, pairs, method):
    lr = 1e-3 if method == "full" else 1e-2
    loss_goes_down(tiny_recipe(tiny_t5, pairs, T5_METHODS[method], lr=lr, task="seq2seq"))


@pytest.mark.parametrize(
    "method", ["lora", "houlsby-adapter", "parallel-adapter", "prefix", "prompt", "ia3"]
)
def test_methods_learn_on_gpt2_and_bart_too(tiny_gpt2, tiny_bart, instructions, pairs, method):
    loss_goes_down(tiny_recipe(tiny_gpt2, instructions, LLAMA_METHODS[method], task="causal-lm"))
    loss_goes_down(tiny_recipe(tiny_bart, pairs, LLAMA_METHODS[method], task="seq2seq"))


def test_a_combination_that_cannot_work_says_so(tiny_llama, instructions):
    with pytest.raises(DeltacliError, match="the bitfit delta chose no parameters"):
        Trainer(tiny_recipe(tiny_llama, instructions, {"kind": "bitfit"}, task="causal-lm"), None)


def test_packing_and_gradient_checkpointing_train(tiny_llama, instructions):
    recipe = tiny_recipe(
        tiny_llama,
        instructions,
        LLAMA_METHODS["lora"],
        gradient_checkpointing=True,
        task="causal-lm",
    )
    recipe.data.packing = True
    trainer = loss_goes_down(recipe)
    assert "position_ids" in trainer.data.train.column_names


@pytest.mark.parametrize(
    ("attention", "kind", "message"),
    [
        ("flash_attention_2", "lora", "attention: flash_attention_2 cannot run"),
        ("flex_attention", "prefix", "prefix tuning prepends keys through sdpa"),
        ("flex_attention", "lora", "attention: flex_attention cannot train on a CPU"),
    ],
)
def test_an_attention_kernel_that_cannot_run_is_refused_in_one_line(
    cli, tiny_llama, instructions, tmp_path, attention, kind, message
):
    """FlashAttention needs a CUDA GPU and its package; prefix tuning needs sdpa's masks;
    FlexAttention has no backward pass on a CPU."""
    code, _, err = cli(
        "train", "--method", "lora_instruct", "--model", tiny_llama, "-o", tmp_path / "out",
        f"data.train={instructions['train']}", f"data.eval={instructions['eval']}",
        "data.format=auto", f"deltas=[{{kind: {kind}}}]", f"attention={attention}",
        "train.max_steps=1",
    )  # fmt: skip
    assert code == 2 and message in " ".join(err.split()), err
    assert "Traceback" not in err
