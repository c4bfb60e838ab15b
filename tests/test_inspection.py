"""`deltacli inspect`: counts from a config alone, per layer, as a folded tree, and for deltas."""

import json

import pytest
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification

from deltacli.commands.inspection import inspect_delta, inspect_model
from deltacli.recipe import parse_recipe

LLAMA_2_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-70b") / "config.json"
    path.write_text(json.dumps(LLAMA_2_70B))
    return path


def lora(model, **fields):
    return parse_recipe({"model": str(model), "deltas": [{"kind": "lora", **fields}]})


def test_a_70b_config_is_counted_without_weights(llama_70b):
    h, kv, ff, layers, vocab = 8192, 1024, 28672, 80, 32000
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * ff + 2 * h
    body = vocab * h + layers * per_layer + h
    head = 2 * h
    lora_trainable = layers * 8 * ((h + h) + (h + kv)) + head

    report = inspect_model(str(llama_70b), lora(llama_70b, r=8))
    assert report.trainable == lora_trainable
    assert report.total == body + head + layers * 8 * ((h + h) + (h + kv))
    plain = inspect_model(str(llama_70b), None)  # a LlamaForCausalLM: counted with its LM head
    assert plain.total == body + vocab * h == 68_976_648_192  # Llama-2-70B's published count


def test_the_cli_counts_a_causal_config_as_a_causal_lm(cli, llama_70b):
    h, kv, layers = 8192, 1024, 80
    code, out, _ = cli("inspect", llama_70b, "--method", "lora", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["trainable"] == layers * 8 * ((h + h) + (h + kv))  # no 2-label `score` head
    assert report["total"] == 68_976_648_192 + report["trainable"]
    code, out, _ = cli(
        "inspect", llama_70b, "--method", "lora", "--json", "task=sequence-classification"
    )
    assert json.loads(out)["trainable"] == layers * 8 * ((h + h) + (h + kv)) + 2 * h


def test_layer_table_adds_up(llama_70b):
    report = inspect_model(str(llama_70b), lora(llama_70b, r=4))
    assert len(report.layers) == 81  # 80 layers + what is outside them
    assert sum(row.parameters for row in report.layers) == report.total
    assert sum(row.trainable for row in report.layers) == report.trainable
    assert {row.trainable for row in report.layers if row.layer is not None} == {
        4 * (2 * 8192 + 8192 + 1024)
    }


def test_tree_folds_identical_layers(llama_70b):
    tree = inspect_model(str(llama_70b), lora(llama_70b)).tree
    layers = next(c for c in tree.children if c.name == "model").children
    stack = next(c for c in layers if c.name == "layers")
    assert [(c.name, c.repeat) for c in stack.children] == [("0-79", 80)]
    assert stack.parameters == 80 * stack.children[0].parameters
    assert tree.parameters == inspect_model(str(llama_70b), lora(llama_70b)).total


def test_layers_differing_in_what_trains_do_not_fold(tiny_bert):
    recipe = parse_recipe(
        {"model": str(tiny_bert), "deltas": [{"kind": "layernorm", "layers": [1]}]}
    )
    tree = inspect_model(str(tiny_bert), recipe).tree
    encoder = next(c for c in tree.children[0].children if c.name == "encoder")
    assert [c.name for c in encoder.children[0].children] == ["0", "1"]


def test_counts_match_peft_for_the_embedded_shapes(tiny_bert):
    report = inspect_model(str(tiny_bert), lora(tiny_bert, r=4, targets=["query", "key", "value"]))
    peft = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert),
        LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "key", "value"]),
    )
    assert report.trainable == peft.get_nb_trainable_parameters()[0]


def test_a_peft_adapter_directory_is_summarised(tiny_bert, tmp_path):
    peft = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert),
        LoraConfig(task_type=TaskType.SEQ_CLS, r=4),
    )
    peft.save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        (tmp_path / "adapter_config.json")
        .read_text()
        .replace('"base_model_name_or_path": null', f'"base_model_name_or_path": "{tiny_bert}"')
    )
    report = inspect_delta(tmp_path)
    assert report.source == "peft"
    assert report.methods == ["lora", "head"]
    assert report.parameters == peft.get_nb_trainable_parameters()[0]
    assert {g.role for g in report.groups} == {"lora", "head"}


def test_cli_shows_the_folded_tree_and_layer_table(cli, llama_70b):
    code, out, err = cli("inspect", llama_70b, "--method", "lora", "--tree", "--by", "layer")
    assert code == 0, err
    assert "layers.0-79 ×80" in out
    assert "parameters by layer" in out and "outside layers" in out
    code, out, _ = cli("inspect", llama_70b, "--method", "lora", "--json")
    assert json.loads(out)["tree"]["type"] == "LlamaForCausalLM"


def test_a_bare_config_cannot_be_trained(cli, llama_70b, tmp_path):
    code, _, err = cli("train", "--method", "lora", "--model", llama_70b, "-o", tmp_path / "o")
    assert code == 2
    assert "is a bare config; this needs a model directory with weights" in err
