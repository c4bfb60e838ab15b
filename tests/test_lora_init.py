"""LoRA's initialisations (`init`): gaussian, PiSSA and OLoRA start where PEFT's do, leave the
model's outputs unchanged at step 0, and save as the ordinary rank-2r LoRA PEFT's conversion
writes, which PEFT loads over the original base with equal logits — and back."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from deltacli.build import prepare_model
from deltacli.recipe import parse_recipe
from deltacli.storage.delta_folder import read_delta, save_delta
from helpers import logits64

INITS = ["gaussian", "pissa", "olora"]


def recipe(base, init: str, r: int = 4):
    return parse_recipe({
        "model": str(base), "task": "causal-lm",
        "deltas": [{"kind": "lora", "r": r, "alpha": 8, "init": init}],
    })  # fmt: skip


def probe():
    torch.manual_seed(3)
    return {"input_ids": torch.randint(4, 30, (3, 7))}


@pytest.mark.parametrize("init", INITS)
def test_the_start_is_peft_s_and_changes_no_output(tiny_llama, init):
    model, deltas = prepare_model(recipe(tiny_llama, init))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.testing.assert_close(logits64(model, probe()), logits64(base, probe()), rtol=0, atol=1e-4)
    if init == "gaussian":
        a = next(p for n, p in deltas.parameters().items() if "lora_A" in n)
        assert abs(float(a.detach().std()) - 1 / 4) < 0.05
        return
    peft_base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=init)  # fmt: skip
    peft = dict(get_peft_model(peft_base, config).named_parameters())
    for name, param in deltas.parameters().items():
        key = "base_model.model." + name.replace(".weight", ".default.weight")
        torch.testing.assert_close(param.detach().float(), peft[key].detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_a_trained_delta_loads_in_peft_over_the_original_base(tiny_llama, tmp_path, init):
    model, deltas = prepare_model(recipe(tiny_llama, init))
    torch.manual_seed(5)
    with torch.no_grad():
        for param in deltas.parameters().values():
            param.add_(torch.randn_like(param) * 0.2)
    ours = logits64(model, probe())
    model.float()
    (tmp_path / "d").mkdir()
    save_delta(tmp_path / "d", deltas, recipe(tiny_llama, init), str(tiny_llama), None)
    saved_r = read_delta(tmp_path / "d").recipe.deltas[0].r
    assert saved_r == (4 if init == "gaussian" else 8)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, tmp_path / "d")
    torch.testing.assert_close(logits64(theirs, probe()), ours, rtol=0, atol=1e-4)
    deltas.detach()  # the base weight comes back
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.testing.assert_close(
        logits64(model, probe()), logits64(fresh, probe()), rtol=0, atol=1e-4
    )


def test_a_converted_peft_pissa_adapter_loads_in_deltacli(tiny_llama, tmp_path):
    """PEFT's own PiSSA, saved with `path_initial_model_for_weight_conversion` (an ordinary
    LoRA over the original base), gives the same logits in deltacli."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights="pissa")  # fmt: skip
    peft = get_peft_model(base, config)
    peft.peft_config["default"].init_lora_weights = True  # as PEFT's docs do before saving
    peft.save_pretrained(tmp_path / "initial")
    peft.peft_config["default"].init_lora_weights = "pissa"
    torch.manual_seed(6)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.2)
    theirs = logits64(peft, probe())
    peft.float()
    peft.save_pretrained(tmp_path / "pissa",
                         path_initial_model_for_weight_conversion=str(tmp_path / "initial"))  # fmt: skip
    saved = read_delta(tmp_path / "pissa", model=str(tiny_llama))
    model, deltas = prepare_model(saved.recipe)
    saved.load_into(deltas)
    torch.testing.assert_close(logits64(model, probe()), theirs, rtol=0, atol=1e-4)


def test_an_unconverted_peft_pissa_adapter_is_one_line(cli, tiny_llama, tmp_path):
    """Saved without conversion, PEFT's PiSSA adapter needs the residual base beside it."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa")
    get_peft_model(base, config).save_pretrained(tmp_path / "pissa")
    code, _, err = cli("inspect", tmp_path / "pissa")
    assert code == 2 and "path_initial_model_for_weight_conversion" in err
