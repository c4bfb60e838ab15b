"""PEFT interop for causal LMs: our deltas load in PEFT, PEFT's adapters load in deltacli."""

import json

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from deltacli.build import prepare_model
from deltacli.storage.delta_folder import read_delta, save_delta
from helpers import assert_close, logits64, perturbed, randomize_trainable, tiny_recipe


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
    ids = {"input_ids": torch.randint(4, 40, (2, 9))}
    assert_close(logits64(model, ids), logits64(peft, ids))


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
    ids = {"input_ids": torch.randint(4, 40, (2, 9))}
    assert_close(logits64(model.eval(), ids), logits64(peft, ids))


def test_a_peft_adapter_without_task_type_merges_and_scores(
    tiny_llama, instructions, tmp_path, cli
):
    """PEFT's own default `LoraConfig()` saves `task_type: null`, as many published adapters
    are: the base's config (a LlamaForCausalLM) gives the task; the merge equals PEFT's."""
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4))
    randomize_trainable(peft, seed=5, std=0.3)
    peft.save_pretrained(tmp_path / "adapter")
    assert (
        json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] is None
    )
    code, _, err = cli("merge", tiny_llama, tmp_path / "adapter", tmp_path / "merged")
    assert code == 0, err
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    theirs = peft.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert_close(ours[name], tensor, rel=1e-6)
    code, out, err = cli(
        "eval", "--delta", tmp_path / "adapter", "--model", tiny_llama,
        "--data", instructions["eval"], "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["perplexity"] > 1
