"""Bases stored as users load them: bf16 (deltas train in float32 beside it), and 4- or 8-bit
(bitsandbytes' CPU backend): training, saving, eval, merge and PEFT interop."""

import importlib.util
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from deltacli.build import prepare_model
from deltacli.commands.evaluate import score_delta
from deltacli.commands.inspection import inspect_model
from deltacli.commands.merge import merge
from deltacli.storage.delta_folder import WEIGHTS_FILE, read_delta
from deltacli.tasks.evaluation import evaluate
from deltacli.training.logs import MetricsLog
from deltacli.training.runs import train
from deltacli.training.trainer import Trainer
from helpers import assert_close, tiny_recipe

SHARED = {
    "lora": {"kind": "lora", "r": 4},
    "ia3": {"kind": "ia3"},
    "adapter": {"kind": "adapter", "placement": "parallel", "r": 8},
    "prefix": {"kind": "prefix", "length": 4},
    "prompt": {"kind": "prompt", "length": 4},
    "layernorm": {"kind": "layernorm"},
    "bitfit": {"kind": "bitfit"},
    "sift": {"kind": "sift", "density": 0.05},
}


@pytest.mark.parametrize("method", SHARED)
def test_a_bf16_base_trains_float32_deltas_and_learns(tiny_bert, sentiment, method):
    recipe = tiny_recipe(tiny_bert, sentiment, SHARED[method], base_dtype="bf16", epochs=3)
    trainer = Trainer(recipe, console=None)
    # The frozen matrices (a norm's tensors move to float32 with a trained bias: autocast
    # runs norms in one dtype).
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad and p.ndim == 2}
    trained = {p.dtype for p in trainer.deltas.parameters().values()}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert trainer.accelerator.mixed_precision == "bf16"  # autocast meets both in one type
    before = evaluate(trainer.model, trainer.eval_batches, trainer.accelerator, trainer.task)
    after = trainer.fit(MetricsLog(None))["eval"]
    assert after["loss"] < before["loss"]


def test_a_bf16_run_saves_scores_merges_and_loads_in_peft(tiny_bert, sentiment, tmp_path):
    recipe = tiny_recipe(tiny_bert, sentiment, SHARED["lora"], base_dtype="bf16", max_steps=4)
    result = train(recipe, tmp_path / "delta")
    saved = load_file(tmp_path / "delta" / WEIGHTS_FILE)
    assert {t.dtype for t in saved.values()} == {torch.float32}
    scores = score_delta(tmp_path / "delta", str(sentiment["eval"]))
    assert scores["accuracy"] == pytest.approx(result.metrics["eval"]["accuracy"], abs=0.05)
    merge(str(tiny_bert), [tmp_path / "delta"], tmp_path / "merged", verify=True)

    ids = {"input_ids": torch.randint(5, 27, (3, 8))}
    model, deltas = prepare_model(read_delta(tmp_path / "delta").recipe)
    read_delta(tmp_path / "delta").load_into(deltas)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, dtype=torch.bfloat16)
    theirs = PeftModel.from_pretrained(base, tmp_path / "delta").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, expected = model.eval()(**ids).logits, theirs(**ids).logits
    assert_close(ours, expected, rel=2e-2)  # a bf16 base: bf16's step, 2^-7, bounds it


def test_inspect_reports_the_base_dtype_and_float32_deltas(tiny_bert, sentiment):
    report = inspect_model(
        str(tiny_bert), tiny_recipe(tiny_bert, sentiment, SHARED["lora"], base_dtype="bf16")
    )
    assert report.base_dtype == "bfloat16" and report.trainable_dtype == "float32"
    frozen = report.total - report.trainable
    assert report.base_bytes == 2 * frozen


BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not BNB, reason="bitsandbytes (deltacli[quantize]) is not installed")


@pytest.fixture(params=["avx512bf16", "plain"])
def cpu_branch(request, monkeypatch):
    """Both of bitsandbytes' CPU branches on any CPU: `Linear4bit` reads
    `has_avx512bf16()` when built and, where it is true, repacks its weight for an
    inference-only kernel on its first eval forward. Forcing the answer exercises the
    AVX-512-BF16 branch on CPUs without it (and the plain one on CPUs with it)."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param == "avx512bf16")
    return request.param


def packed_layers(model: torch.nn.Module) -> list[str]:
    """4-bit layers whose weight bitsandbytes repacked for its AVX-512-BF16 inference kernel."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(getattr(module, "weight", None), "quant_state", None) is not None
        and getattr(module.weight.quant_state, "packing_format_for_cpu", False)
    ]


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "ia3", "adapter"])
def test_a_quantised_base_trains_lora_ia3_and_adapters(
    tiny_llama, instructions, kind, method, cpu_branch
):
    recipe = tiny_recipe(
        tiny_llama, instructions, SHARED[method], task="causal-lm", quantize=kind, epochs=2
    )
    trainer = Trainer(recipe, console=None)
    linear = trainer.model.model.layers[0].self_attn.q_proj
    assert not linear.weight.is_floating_point()  # stored in 4 or 8 bits
    assert {p.dtype for p in trainer.deltas.parameters().values()} == {torch.float32}
    before = evaluate(trainer.model, trainer.eval_batches, trainer.accelerator, trainer.task)
    after = trainer.fit(MetricsLog(None))["eval"]
    assert after["loss"] < before["loss"]
    assert packed_layers(trainer.model) == []  # evaluated between steps, still trainable


@needs_bnb
def test_the_avx512bf16_branch_repacks_a_plain_quantised_model_in_eval(tiny_llama, cpu_branch):
    """What the fixture forces is what bitsandbytes does on such a CPU: without deltacli's
    `keep_training_layout`, an eval forward repacks the weights (and fails on layers
    narrower than its blocks: the tiny model's 32-wide ones)."""
    from transformers import AutoModelForCausalLM

    from deltacli.models.loading import quantization

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, **quantization("nf4", None)).eval()
    ids = torch.randint(4, 40, (1, 5))
    if cpu_branch == "plain":
        with torch.no_grad():
            base(input_ids=ids)
        assert packed_layers(base) == []
    else:
        with pytest.raises(RuntimeError, match="is invalid for input of size"), torch.no_grad():
            base(input_ids=ids)


@needs_bnb
def test_a_quantised_classifier_keeps_its_head_in_full_precision_and_trains(
    tiny_bert, sentiment, cpu_branch
):
    """int8 and nf4 under a classification head: the head trains, so it is not quantised
    (a quantised `classifier` made training fail at step 1 with no attribute 'CB')."""
    for kind in ("int8", "nf4"):
        recipe = tiny_recipe(tiny_bert, sentiment, SHARED["lora"], quantize=kind, max_steps=2)
        trainer = Trainer(recipe, console=None)
        assert trainer.model.classifier.weight.dtype == torch.float32
        assert trainer.fit(MetricsLog(None))["eval"]["loss"] > 0


@needs_bnb
def test_a_qlora_delta_loads_in_peft_on_the_quantised_base_and_merges_only_in_full_precision(
    tiny_llama, instructions, tmp_path, cli, cpu_branch
):
    from deltacli.models.loading import keep_training_layout, quantization

    recipe = tiny_recipe(
        tiny_llama,
        instructions,
        SHARED["lora"],
        task="causal-lm",
        quantize="nf4",
        max_steps=3,
        lr=5e-2,
    )
    train(recipe, tmp_path / "delta")
    assert (
        json.loads((tmp_path / "delta" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    )
    ids = {"input_ids": torch.randint(4, 40, (2, 9))}
    model, deltas = prepare_model(read_delta(tmp_path / "delta").recipe)
    read_delta(tmp_path / "delta").load_into(deltas)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, **quantization("nf4", None))
    keep_training_layout(base)  # PEFT's side on the same kernels (see the test above)
    theirs = PeftModel.from_pretrained(base, tmp_path / "delta").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close(model.eval()(**ids).logits, theirs(**ids).logits, rel=2e-2)

    base.save_pretrained(tmp_path / "quantised")  # a checkpoint stored in 4 bits
    code, _, err = cli("merge", tmp_path / "quantised", tmp_path / "delta", tmp_path / "merged")
    assert code == 2 and "merge onto the full-precision base" in err
    code, _, err = cli("merge", tiny_llama, tmp_path / "delta", tmp_path / "merged")
    assert code == 0, err


@needs_bnb
def test_inspect_reports_a_quantised_base_s_bytes(tiny_llama, instructions):
    plain = inspect_model(
        str(tiny_llama),
        tiny_recipe(tiny_llama, instructions, SHARED["lora"], task="causal-lm", base_dtype="fp32"),
    )
    nf4 = inspect_model(
        str(tiny_llama),
        tiny_recipe(
            tiny_llama,
            instructions,
            SHARED["lora"],
            task="causal-lm",
            quantize="nf4",
            base_dtype="fp32",
        ),
    )
    assert nf4.base_dtype == "nf4" and nf4.trainable_dtype == "float32"
    assert nf4.base_bytes < plain.base_bytes


def test_sift_refuses_a_quantised_base_with_one_line(tiny_llama, instructions, cli, tmp_path):
    if not BNB:
        pytest.skip("bitsandbytes is not installed")
    code, _, err = cli(
        "train", "--method", "sift", "--model", tiny_llama, "task=causal-lm", "quantize=nf4",
        "--data", instructions["train"], "--eval-data", instructions["eval"], "-o", tmp_path / "o",
    )  # fmt: skip
    assert code == 2 and "SIFT writes into the weights it trains" in err
