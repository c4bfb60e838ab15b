"""PEFT interop for causal LMs: our deltas load in PEFT, PEFT's adapters load in deltacli."""

import json

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM

from deltacli.build import prepare_model
from deltacli.store import read_delta, save_delta
from helpers import perturbed, randomize_trainable, tiny_recipe


@pytest.mark.parametrize(
    "delta",
    [
        {"kind": "lora", "r": 4},
        {"kind": "ia3"},
        {"kind": "prompt", "length": 3},
        {"kind": "prefix", "length": 3},
        {"kind": "prefix", "length": 3, "projection": 8},
    ],
    ids=["lora", "ia3", "prompt", "prefix", "prefix-mlp-folded"],
)
def test_peft_loads_our_causal_lm_deltas_with_equal_logits(
    tiny_llama, instructions, tmp_path, delta
):
    recipe = tiny_recipe(tiny_llama, instructions, delta, task="causal-lm")
    model, deltas = perturbed(recipe)
    save_delta(tmp_path, deltas, recipe, str(tiny_llama), None)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path
    ).eval()
    ids = torch.randint(4, 40, (2, 9))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, peft(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=4),
        IA3Config(task_type=TaskType.CAUSAL_LM),
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
    ],
    ids=["lora", "ia3", "prompt"],
)
def test_peft_causal_lm_adapters_load_in_deltacli(tiny_llama, tmp_path, config):
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config)
    randomize_trainable(peft, seed=5, std=0.3)
    peft.eval().save_pretrained(tmp_path)
    saved = read_delta(tmp_path, model=str(tiny_llama))
    assert saved.recipe.task == "causal-lm"
    model, deltas = prepare_model(saved.recipe)
    saved.load_into(deltas)
    ids = torch.randint(4, 40, (2, 9))
    with torch.no_grad():
        assert (model.eval()(input_ids=ids).logits - peft(input_ids=ids).logits).abs().max() <= 1e-5
