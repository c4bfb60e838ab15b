"""`deltacli merge`: merged logits equal base + delta, PEFT's merge agrees, shards survive."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertModel

from deltacli.build import prepare_model
from deltacli.commands.merge import INDEX_FILE, merge
from deltacli.deltas.specify import BitFit
from deltacli.errors import DeltacliError, VerificationError
from deltacli.models.shards import ShardWriter
from deltacli.recipe import parse_recipe
from deltacli.storage.delta_folder import read_delta, save_delta
from helpers import assert_close, logits64, randomize_trainable, tiny_config

METHODS = {
    "lora": [{"kind": "lora", "r": 4, "alpha": 8}],
    "bitfit": [{"kind": "bitfit"}],
    "layernorm": [{"kind": "layernorm"}],
    "modules": [{"kind": "modules", "targets": ["intermediate.dense"], "layers": [1]}],
    "full": [{"kind": "full"}],
    "ia3": [{"kind": "ia3"}],
    "lora+bitfit": [{"kind": "lora", "r": 2}, {"kind": "bitfit"}],
    "ia3+lora": [{"kind": "ia3"}, {"kind": "lora", "r": 2, "targets": ["key", "query"]}],
}


def probe():
    torch.manual_seed(3)
    ids = torch.randint(5, 27, (4, 9))
    mask = torch.ones_like(ids)
    mask[2:, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def saved_delta(base, folder, deltas, seed=4, labels=(0, 1)):
    """A delta whose every tensor is random (so nothing matches by accident), saved."""
    recipe = parse_recipe({"model": str(base), "deltas": deltas, "data": {"labels": list(labels)}})
    model, attached = prepare_model(recipe)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in attached.parameters().values():
            param.add_(torch.randn_like(param) * 0.3)
    folder.mkdir()
    save_delta(folder, attached, recipe, str(base), None)
    return model.eval()


def logits(model):
    return logits64(model, probe())


def load(folder):
    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


@pytest.mark.parametrize("method", METHODS)
def test_merged_logits_equal_base_plus_delta(tiny_bert, tmp_path, method):
    live = saved_delta(tiny_bert, tmp_path / "delta", METHODS[method])
    report = merge(str(tiny_bert), [tmp_path / "delta"], tmp_path / "merged")
    assert_close(logits(load(tmp_path / "merged")), logits(live))
    assert report.tensors_changed > 0


def test_peft_lora_merges_to_peft_merge_and_unload_weights(tiny_bert, tmp_path):
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value", "dense"]
    )
    peft_model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert), config
    )
    randomize_trainable(peft_model, seed=7, std=0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = (
        PeftModel.from_pretrained(load(tiny_bert), tmp_path / "adapter")
        .merge_and_unload()
        .state_dict()
    )
    merge(str(tiny_bert), [tmp_path / "adapter"], tmp_path / "merged")
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(ours) == set(expected)
    for name, tensor in expected.items():
        assert_close(ours[name], tensor, rel=1e-6)


def test_gpt2_conv1d_lora_merges_transposed(tmp_path):
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(tiny_config("gpt2")).save_pretrained(
        tmp_path / "base"
    )
    live = saved_delta(
        tmp_path / "base",
        tmp_path / "delta",
        [{"kind": "lora", "r": 2, "targets": ["c_attn", "c_fc"]}],
    )
    merge(str(tmp_path / "base"), [tmp_path / "delta"], tmp_path / "merged")
    assert_close(logits(load(tmp_path / "merged")), logits(live))


def test_a_bare_body_checkpoint_gains_the_head(tmp_path, tiny_bert):
    """all-MiniLM ships a BertModel (keys without `bert.`, no classifier): the merge writes a
    BertForSequenceClassification that loads without new weights."""
    body = BertModel.from_pretrained(tiny_bert, add_pooling_layer=True)
    body.save_pretrained(tmp_path / "body")
    (tmp_path / "body" / "vocab.txt").write_text("unused")
    live = saved_delta(
        tmp_path / "body", tmp_path / "delta", METHODS["lora"], labels=["a", "b", "c"]
    )
    report = merge(str(tmp_path / "body"), [tmp_path / "delta"], tmp_path / "merged")
    merged = load(tmp_path / "merged")
    assert merged.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert_close(logits(merged), logits(live))
    assert report.tensors_added == 2  # classifier.weight, classifier.bias
    assert (tmp_path / "merged" / "vocab.txt").read_text() == "unused"


def test_sharded_base_keeps_its_shards(tmp_path):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(tiny_config("llama"))
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    index = json.loads((tmp_path / "base" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    live = saved_delta(
        tmp_path / "base", tmp_path / "delta", [{"kind": "lora", "r": 2, "targets": ["all-linear"]}]
    )
    merge(str(tmp_path / "base"), [tmp_path / "delta"], tmp_path / "merged", verify=True)
    merged_index = json.loads((tmp_path / "merged" / INDEX_FILE).read_text())
    assert merged_index["weight_map"] == index["weight_map"]
    total = sum((tmp_path / "merged" / f).stat().st_size for f in set(index["weight_map"].values()))
    assert merged_index["metadata"]["total_size"] == total
    assert_close(logits(load(tmp_path / "merged")), logits(live))


def test_deltas_apply_in_order_with_weights(tiny_bert, tmp_path):
    saved_delta(tiny_bert, tmp_path / "a", METHODS["lora"], seed=1)
    saved_delta(tiny_bert, tmp_path / "b", METHODS["lora"], seed=2)
    merge(
        str(tiny_bert), [tmp_path / "a", tmp_path / "b"], tmp_path / "merged", weights=[0.5, 0.25]
    )
    base = load_file(tiny_bert / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    name = "bert.encoder.layer.1.attention.self.value"
    expected = base[f"{name}.weight"].clone()
    for folder, weight in ((tmp_path / "a", 0.5), (tmp_path / "b", 0.25)):
        tensors = read_delta(folder).tensors
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        expected += weight * 2.0 * b @ a
    assert_close(merged[f"{name}.weight"], expected, rel=1e-6)


def test_bf16_output_verifies_within_bf16_tolerance(tiny_bert, tmp_path):
    saved_delta(tiny_bert, tmp_path / "delta", METHODS["lora"])
    report = merge(
        str(tiny_bert), [tmp_path / "delta"], tmp_path / "merged", dtype="bf16", verify=True
    )
    assert all(
        t.dtype == torch.bfloat16
        for t in load_file(tmp_path / "merged" / "model.safetensors").values()
    )
    assert 0 < report.max_logit_difference < 0.1


def test_failed_verification_writes_nothing(tiny_bert, tmp_path, monkeypatch):
    saved_delta(tiny_bert, tmp_path / "delta", METHODS["bitfit"])
    monkeypatch.setattr(BitFit, "delta_weights", lambda self, values: {})  # a broken fold
    with pytest.raises(VerificationError, match="differ from base \\+ delta"):
        merge(str(tiny_bert), [tmp_path / "delta"], tmp_path / "merged", verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]


def test_a_crash_mid_merge_leaves_no_output(tmp_path, monkeypatch):
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(tiny_config("llama")).save_pretrained(
        tmp_path / "base", max_shard_size="40KB"
    )
    saved_delta(tmp_path / "base", tmp_path / "delta", METHODS["layernorm"])
    calls = []
    real_write = ShardWriter.write

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        merge(str(tmp_path / "base"), [tmp_path / "delta"], tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "delta"]


@pytest.mark.parametrize(
    "deltas",
    [
        [{"kind": "adapter", "r": 4}],
        [{"kind": "prefix", "length": 2}],
        [{"kind": "prompt", "length": 2}],
    ],
    ids=["adapter", "prefix", "prompt"],
)
def test_deltas_that_are_not_linear_are_refused_before_writing(cli, tiny_bert, tmp_path, deltas):
    saved_delta(tiny_bert, tmp_path / "delta", deltas)
    code, _, err = cli("merge", tiny_bert, tmp_path / "delta", tmp_path / "merged")
    assert code == 2
    assert f"holds a {deltas[0]['kind']} delta, which is not linear in the base weights" in err
    assert not (tmp_path / "merged").exists()


def test_a_delta_for_another_base_is_refused(tiny_bert, tmp_path):
    saved_delta(tiny_bert, tmp_path / "delta", METHODS["lora"])
    wider = tiny_config("bert", vocab_size=27, hidden_size=64)
    AutoModelForSequenceClassification.from_config(wider).save_pretrained(tmp_path / "other")
    with pytest.raises(DeltacliError, match=r"does not fit this model|has shape"):
        merge(str(tmp_path / "other"), [tmp_path / "delta"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_cli_merge_verifies_and_reports(cli, tiny_bert, tmp_path):
    saved_delta(tiny_bert, tmp_path / "delta", METHODS["lora"])
    code, out, err = cli(
        "merge", tiny_bert, tmp_path / "delta", tmp_path / "merged", "--verify", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["max_logit_difference"] < 1e-3  # float32 rounding, far below a wrong merge
    code, _, err = cli("merge", tiny_bert, tmp_path / "delta", tmp_path / "merged")
    assert code == 2 and "exists; pass --overwrite" in err
    code, _, err = cli("merge", tiny_bert, tmp_path / "merged")
    assert code == 2 and "merge needs BASE, at least one DELTA, and OUT" in err
