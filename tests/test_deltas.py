"""The delta core: what each kind trains, that it starts as the identity, and that it detaches."""

import pytest
import torch

from deltacli.deltas import attach
from deltacli.deltas.base import Delta, register
from deltacli.deltas.lora import Lora, LoraConfig, resolve_targets
from deltacli.deltas.specify import (
    BitFitConfig,
    FullConfig,
    LayerNormConfig,
    ModulesConfig,
)
from deltacli.errors import DeltacliError
from helpers import assert_close, batch, tiny_model


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


HEAD = {"classifier.weight", "classifier.bias"}


def test_lora_starts_as_the_base_model():
    model = tiny_model()
    inputs = batch()
    before = model(**inputs).logits
    attach(model, [LoraConfig(r=4)], None)
    assert torch.equal(model(**inputs).logits, before)


def test_lora_changes_outputs_once_b_is_nonzero_and_scales_by_alpha_over_r():
    model = tiny_model()
    inputs = batch()
    deltas = attach(model, [LoraConfig(r=4, alpha=8)], None)
    query = model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        query.lora_B.weight.normal_()
    x = torch.randn(2, 32)
    expected = query.weight @ x.T + query.bias[:, None]
    expected += 2.0 * query.lora_B.weight @ query.lora_A.weight @ x.T
    assert_close(query(x), expected.T)
    assert deltas.deltas[0].scaling == 2.0
    assert not torch.equal(model(**inputs).logits, tiny_model()(**inputs).logits)


@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        (
            [LoraConfig(r=2)],
            {
                f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight"
                for i in range(2)
                for m in ("query", "value")
                for ab in "AB"
            },
        ),
        ([BitFitConfig()], "bias"),
        ([LayerNormConfig()], "LayerNorm"),
        ([FullConfig()], "all"),
        (
            [ModulesConfig(targets=["attention.output.LayerNorm"], layers=[1])],
            {
                "bert.encoder.layer.1.attention.output.LayerNorm.weight",
                "bert.encoder.layer.1.attention.output.LayerNorm.bias",
            },
        ),
    ],
    ids=["lora", "bitfit", "layernorm", "full", "one-layernorm-in-one-layer"],
)
def test_only_the_delta_and_the_head_train(configs, expected):
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    if expected == "bias":
        expected = {n for n in names if n.endswith(".bias")}
    elif expected == "LayerNorm":
        expected = {n for n in names if ".LayerNorm." in n}
    elif expected == "all":
        expected = set(names)
    attach(model, configs, ModulesConfig(targets=["classifier"]))
    assert trainable(model) == expected | HEAD


def test_deltas_compose_as_the_union_of_what_they_train():
    alone = trainable_after([LoraConfig(r=2)]) | trainable_after([BitFitConfig()])
    assert trainable_after([LoraConfig(r=2), BitFitConfig()]) == alone


def trainable_after(configs):
    model = tiny_model()
    attach(model, configs, None)
    return trainable(model)


def test_negative_layer_index_counts_from_the_last():
    model = tiny_model()
    attach(model, [LayerNormConfig(layers=[-1])], None)
    assert trainable(model) == {
        f"bert.encoder.layer.1.{m}.LayerNorm.{p}"
        for m in ("attention.output", "output")
        for p in ("weight", "bias")
    }


def test_layer_out_of_range_is_an_error():
    with pytest.raises(DeltacliError, match="layer 5 is out of range: the model has 2 layers"):
        attach(tiny_model(), [BitFitConfig(layers=[5])], None)


def test_detach_leaves_the_model_as_it_was():
    model = tiny_model()
    inputs = batch()
    names = [n for n, _ in model.named_parameters()]
    deltas = attach(model, [LoraConfig(r=2)], None)
    with torch.no_grad():
        for name, param in deltas.parameters().items():
            if "lora_B" in name:
                param.normal_()
    deltas.detach()
    assert [n for n, _ in model.named_parameters()] == names
    assert torch.equal(model(**inputs).logits, tiny_model()(**inputs).logits)


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("bert", "bert.encoder.layer.0.attention.self.query"),
        ("roberta", "roberta.encoder.layer.0.attention.self.query"),
        ("distilbert", "distilbert.transformer.layer.0.attention.q_lin"),
        ("gpt2", "transformer.h.0.attn.c_attn"),
        ("llama", "model.layers.0.self_attn.q_proj"),
    ],
)
def test_lora_presets_need_no_module_names(model_type, expected):
    targets = resolve_targets(tiny_model(model_type), None)
    assert expected in targets
    assert len(targets) == (2 if model_type == "gpt2" else 4)


def test_all_linear_targets_every_linear_but_the_head():
    targets = resolve_targets(tiny_model("llama"), ["all-linear"])
    assert len(targets) == 2 * 7
    assert not any(t.startswith("score") for t in targets)


def test_lora_on_gpt2_conv1d_starts_as_the_base_model():
    model = tiny_model("gpt2")
    inputs = batch()
    before = model(**inputs).logits
    attach(model, [LoraConfig(r=2)], None)
    assert torch.equal(model(**inputs).logits, before)


def test_an_unmatched_pattern_lists_close_names():
    with pytest.raises(DeltacliError) as error:
        attach(tiny_model(), [LoraConfig(targets=["querry"])], None)
    assert "no linear module matches 'querry'" in str(error.value)
    assert "query" in str(error.value)


def test_a_pattern_that_names_no_linear_is_an_error():
    with pytest.raises(DeltacliError, match="no linear module matches 'LayerNorm'"):
        attach(tiny_model(), [LoraConfig(targets=["LayerNorm"])], None)


def test_layernorm_tuning_finds_rmsnorm_in_llama():
    model = tiny_model("llama")
    attach(model, [LayerNormConfig()], None)
    assert trainable(model) == {
        *(
            f"model.layers.{i}.{n}.weight"
            for i in range(2)
            for n in ("input_layernorm", "post_attention_layernorm")
        ),
        "model.norm.weight",
    }


def test_a_kind_cannot_be_registered_twice():
    class Again(Delta):
        kind = Lora.kind
        config_class = LoraConfig

        def attach(self, model):
            pass

    with pytest.raises(ValueError, match="registered twice"):
        register(Again)
