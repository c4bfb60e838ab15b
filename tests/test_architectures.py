"""The architecture table: every shipped kind attaches to a tiny model of every entry, changes
its outputs once its tensors move, and detaches without a trace."""

import pytest
import torch

from deltacli.deltas import KINDS, attach
from deltacli.deltas.adapter import AdapterConfig
from deltacli.deltas.ia3 import IA3Config
from deltacli.deltas.lora import LoraConfig
from deltacli.deltas.prefix import PrefixConfig
from deltacli.deltas.prompt import PromptConfig
from deltacli.deltas.sift import SiftConfig
from deltacli.deltas.specify import BitFitConfig, FullConfig, LayerNormConfig, ModulesConfig
from deltacli.errors import DeltacliError
from deltacli.models.architectures import ARCHITECTURES
from helpers import batch, randomize_trainable, tiny_model

# Kinds that train the model's own tensors: detaching leaves the trained values in place.
SPECIFICATION = {"bitfit", "layernorm", "modules", "full"}
# Encoder-decoders are built as seq2seq models (their classifiers need token ids, which a
# prompt replaces by embeddings); every other family as a classifier.
ENCODER_DECODERS = {"t5", "bart"}


def configs(model_type: str) -> dict:
    """One config per shipped kind (both adapter placements), each on its defaults."""
    return {
        "lora": LoraConfig(r=2),
        "adapter-sequential-attention": AdapterConfig(at="attention", r=4),
        "adapter-parallel-ffn": AdapterConfig(at="ffn", placement="parallel", r=4),
        "prefix": PrefixConfig(length=2),
        "prompt": PromptConfig(length=2),
        "ia3": IA3Config(),
        "sift": SiftConfig(density=0.1, select="magnitude"),
        "bitfit": BitFitConfig(),
        "layernorm": LayerNormConfig(),
        "modules": ModulesConfig(targets=[ARCHITECTURES[model_type].output]),
        "full": FullConfig(),
    }


# Kinds that wrap another kind: what they attach depends on files of their own.
WRAPPERS = {"subspace": "trains a fitted method through z; tests/test_subspace.py attaches it"}


def test_the_cases_cover_every_registered_kind():
    assert {type(c).kind for c in configs("bert").values()} | set(WRAPPERS) == set(KINDS)


def model_and_inputs(model_type: str):
    if model_type in ENCODER_DECODERS:
        model = tiny_model(model_type, "seq2seq")
        inputs = batch()
        inputs["decoder_input_ids"] = batch(lengths=(3, 3, 3), seed=2)["input_ids"]
        return model, inputs
    return tiny_model(model_type), batch()


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def refusal(model, name: str) -> str | None:
    """What the table or the model itself says cannot work, with the line that says so."""
    if name == "bitfit" and not any(n.endswith(".bias") for n, _ in model.named_parameters()):
        return "the bitfit delta chose no parameters"
    if name == "prefix" and not ARCHITECTURES[model.config.model_type].attention_interface:
        return "prefix tuning enters through transformers' attention interface"
    return None


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize("name", list(configs("bert")))
def test_every_kind_attaches_to_every_architecture(model_type, name):
    model, inputs = model_and_inputs(model_type)
    before = outputs(model, inputs)
    config = configs(model_type)[name]
    expected_refusal = refusal(model, name)
    if expected_refusal:
        with pytest.raises(DeltacliError, match=expected_refusal):
            attach(model, [config], None)
        return
    deltas = attach(model, [config], None)
    assert deltas.parameters(), "the delta trains nothing"
    deltas.calibrate(model, [], None)  # SIFT chooses its entries (by magnitude here)
    randomize_trainable(model, seed=3, std=0.5)
    assert not torch.allclose(outputs(model, inputs), before), "the delta changes nothing"
    if name not in SPECIFICATION:
        deltas.detach()
        assert torch.equal(outputs(model, inputs), before)
