"""DoRA (`use_dora`): the outputs PEFT's DoRA gives, both ways round, and an exact merge."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from deltacli.build import prepare_model
from deltacli.commands.merge import merge
from deltacli.recipe import parse_recipe
from deltacli.storage.delta_folder import read_delta, save_delta
from helpers import logits64

DORA = [{"kind": "lora", "r": 4, "alpha": 8, "use_dora": True}]


def probe():
    torch.manual_seed(3)
    return {"input_ids": torch.randint(4, 30, (3, 7))}


def _perturbed_dora(base, folder=None, seed=5):
    recipe = parse_recipe({"model": str(base), "task": "causal-lm", "deltas": DORA})
    model, deltas = prepare_model(recipe)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in deltas.parameters().values():
            param.add_(torch.randn_like(param) * 0.2)
    if folder is not None:
        folder.mkdir()
        save_delta(folder, deltas, recipe, str(base), None)
    return model, deltas


def test_dora_starts_at_the_base_and_peft_loads_it(tiny_llama, tmp_path):
    fresh, _ = prepare_model(
        parse_recipe({"model": str(tiny_llama), "task": "causal-lm", "deltas": DORA})
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.testing.assert_close(logits64(fresh, probe()), logits64(base, probe()), rtol=0, atol=1e-6)
    model, _ = _perturbed_dora(tiny_llama, tmp_path / "dora")
    ours = logits64(model, probe())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, tmp_path / "dora")
    assert theirs.peft_config["default"].use_dora
    torch.testing.assert_close(logits64(theirs, probe()), ours, rtol=0, atol=1e-5)


def test_a_peft_dora_adapter_loads_in_deltacli(tiny_llama, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    peft = get_peft_model(base, config)
    torch.manual_seed(6)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.2)
    peft.save_pretrained(tmp_path / "peft")
    theirs = logits64(peft, probe())
    saved = read_delta(tmp_path / "peft", model=str(tiny_llama))
    assert saved.recipe.deltas[0].use_dora
    model, deltas = prepare_model(saved.recipe)
    saved.load_into(deltas)
    torch.testing.assert_close(logits64(model, probe()), theirs, rtol=0, atol=1e-5)


def test_dora_merges_exactly(tiny_llama, tmp_path):
    _perturbed_dora(tiny_llama, tmp_path / "dora")
    report = merge(str(tiny_llama), [tmp_path / "dora"], tmp_path / "merged", verify=True)
    assert report.tensors_changed == 4 and report.max_logit_difference < 1e-4
