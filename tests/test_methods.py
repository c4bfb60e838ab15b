"""The unified-view family: adapters, IA3, prefix and prompt tuning, and their compositions."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from deltacli.deltas import attach
from deltacli.deltas.adapter import AdapterConfig
from deltacli.deltas.ia3 import IA3Config
from deltacli.deltas.lora import LoraConfig
from deltacli.deltas.prefix import PrefixConfig
from deltacli.deltas.prompt import PromptConfig
from deltacli.deltas.specify import BitFitConfig
from deltacli.errors import DeltacliError
from helpers import assert_close, batch, logits64, tiny_config, tiny_model

IDENTITY_AT_START = {
    "houlsby": [AdapterConfig(at="attention", r=4), AdapterConfig(at="ffn", r=4)],
    "pfeiffer": [AdapterConfig(at="ffn", r=4)],
    "parallel": [AdapterConfig(at="ffn", placement="parallel", r=4)],
    "scaled-parallel-attention": [
        AdapterConfig(at="attention", placement="parallel", r=4, scale=4.0)
    ],
    "ia3": [IA3Config()],
}
ALL = {
    **IDENTITY_AT_START,
    "prefix": [PrefixConfig(length=3)],
    "prefix-mlp": [PrefixConfig(length=3, projection=8)],
    "prompt": [PromptConfig(length=3)],
    "mam": [PrefixConfig(length=3), AdapterConfig(at="ffn", placement="parallel", r=8, scale=4.0)],
}
ARCHITECTURES = ["bert", "gpt2", "llama", "distilbert"]


def perturb(deltas, seed=2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in deltas.parameters().values():
            param.add_(torch.randn_like(param) * 0.3)


def logits(model, inputs):
    return logits64(model, inputs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", IDENTITY_AT_START)
def test_starts_as_the_base_model(arch, method):
    model = tiny_model(arch)
    inputs = batch()
    before = logits(model, inputs)
    attach(model, IDENTITY_AT_START[method], None)
    assert torch.equal(logits(model, inputs), before)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ALL)
def test_only_the_method_trains_and_it_changes_outputs(arch, method):
    model = tiny_model(arch)
    inputs = batch()
    before = logits(model, inputs)
    deltas = attach(model, ALL[method], None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(deltas.parameters()) and trainable
    perturb(deltas)
    assert (logits(model, inputs) - before).abs().max() > 1e-6


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ALL)
def test_padded_batch_equals_each_example_alone(arch, method):
    model = tiny_model(arch)
    deltas = attach(model, ALL[method], None)
    perturb(deltas)
    lengths = (7, 4, 5)
    together = logits(model, batch(lengths))
    for row, length in enumerate(lengths):
        alone = batch(lengths)
        alone = {k: v[row : row + 1, :length] for k, v in alone.items()}
        assert_close(logits(model, alone)[0], together[row])


@pytest.mark.parametrize("method", ALL)
def test_detach_restores_the_base_model(method):
    model = tiny_model("bert")
    inputs = batch()
    before = logits(model, inputs)
    names = [n for n, _ in model.named_parameters()]
    deltas = attach(model, ALL[method], None)
    perturb(deltas)
    deltas.detach()
    assert [n for n, _ in model.named_parameters()] == names
    assert torch.equal(logits(model, inputs), before)


def test_hooks_at_different_places_compose_in_either_order():
    configs = ALL["mam"] + [LoraConfig(r=2), BitFitConfig()]
    results = []
    for order in (configs, list(reversed(configs))):
        model = tiny_model("bert")
        deltas = attach(model, order, None)
        torch.manual_seed(3)
        with torch.no_grad():
            for name in sorted(deltas.parameters()):
                param = deltas.parameters()[name]
                param.copy_(
                    torch.randn_like(param) * 0.2 + (1.0 if name.endswith("ia3_l") else 0.0)
                )
        results.append(logits(model, batch()))
    assert_close(results[0], results[1])


def test_prefix_reaches_every_attention_layer():
    model = tiny_model("llama")
    deltas = attach(model, [PrefixConfig(length=4)], None)
    (param,) = deltas.parameters().values()
    assert param.shape == (4, 2 * 2 * 32)  # l × (layers · key/value · kv width), PEFT's layout
    with torch.no_grad():
        param.view(4, 2, 2, 32)[:, 1].normal_()  # only the last layer's prefix
    assert not torch.equal(logits(model, batch()), logits(tiny_model("llama"), batch()))


def test_adapter_needs_a_sublayer_preset_or_explicit_modules():
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert"))
    model.config.model_type = "mystery"
    with pytest.raises(DeltacliError, match="no sublayer preset for model type 'mystery'"):
        attach(model, [AdapterConfig()], None)
    deltas = attach(
        model, [AdapterConfig(reads="intermediate", writes=r"re:.*layer\.\d+\.output\.dense")], None
    )
    assert len(deltas.parameters()) == 2 * 4
