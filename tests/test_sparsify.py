"""`deltacli sparsify`: exact top-k of a dense update, lossless at density 1, masks reused."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from deltacli.build import prepare_model
from deltacli.commands.sparsify import sparsify
from deltacli.storage.delta_folder import read_delta
from deltacli.training.runs import train
from helpers import assert_close, logits64, tiny_recipe


@pytest.fixture
def tuned(tiny_bert, tmp_path):
    """A 'fully fine-tuned' model: every linear weight and the head of the tiny BERT moved."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    torch.manual_seed(9)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn_like(module.weight) * 0.05)
    model.save_pretrained(tmp_path / "tuned")
    return tmp_path / "tuned"


def inputs():
    torch.manual_seed(3)
    ids = torch.randint(5, 27, (4, 9))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_of(folder, base):
    saved = read_delta(folder, model=str(base))
    model, deltas = prepare_model(saved.recipe)
    saved.load_into(deltas)
    return logits64(model.eval(), inputs())


def updates(base, tuned_dir):
    before, after = (
        load_file(base / "model.safetensors"),
        load_file(tuned_dir / "model.safetensors"),
    )
    return {
        n: (after[n] - before[n]).reshape(-1)
        for n in after
        if n.endswith(".weight")
        and after[n].ndim == 2
        and "embeddings" not in n
        and not n.startswith("classifier")
    }


def test_density_one_is_lossless(tiny_bert, tuned, tmp_path):
    report = sparsify(str(tiny_bert), str(tuned), tmp_path / "sparse", density=1.0)
    expected = logits64(AutoModelForSequenceClassification.from_pretrained(tuned).eval(), inputs())
    assert_close(logits_of(tmp_path / "sparse", tiny_bert), expected)
    assert report.norm_kept == pytest.approx(1.0) and report.dropped == []


def test_per_matrix_keeps_exactly_the_top_k(tiny_bert, tuned, tmp_path):
    report = sparsify(str(tiny_bert), str(tuned), tmp_path / "sparse", density=0.1)
    saved = load_file(tmp_path / "sparse" / "adapter_model.safetensors")
    for name, delta in updates(tiny_bert, tuned).items():
        module = name.removesuffix(".weight")
        k = math.ceil(0.1 * delta.numel())
        expected = torch.topk(delta.abs(), k).indices.sort().values
        assert torch.equal(saved[f"base_model.model.{module}.sift_indices"], expected), name
        assert torch.allclose(saved[f"base_model.model.{module}.sift_values"], delta[expected])
    assert 0 < report.norm_kept < 1


def test_global_keeps_the_top_k_over_all_matrices(tiny_bert, tuned, tmp_path):
    sparsify(str(tiny_bert), str(tuned), tmp_path / "sparse", density=0.05, by="global")
    saved = load_file(tmp_path / "sparse" / "adapter_model.safetensors")
    deltas = updates(tiny_bert, tuned)
    everything = torch.cat([d.abs() for d in deltas.values()])
    budget = math.ceil(0.05 * everything.numel())
    threshold = torch.topk(everything, budget).values[-1]
    kept = 0
    for name, delta in deltas.items():
        indices = saved[f"base_model.model.{name.removesuffix('.weight')}.sift_indices"]
        assert torch.all(delta.abs()[indices] >= threshold)
        kept += len(indices)
    assert kept == budget
    recipe = read_delta(tmp_path / "sparse").recipe
    assert recipe.deltas[0].counts is not None  # per-matrix sizes vary, so they are saved
    logits_of(tmp_path / "sparse", tiny_bert)  # and the delta loads with them


def test_a_lora_delta_is_densified_and_flagged_as_approximate(tiny_bert, sentiment, tmp_path):
    result = train(
        tiny_recipe(tiny_bert, sentiment, {"kind": "lora", "r": 2}, max_steps=3), tmp_path / "lora"
    )
    report = sparsify(
        str(tiny_bert),
        str(result.output),
        tmp_path / "sparse",
        density=1.0,
        targets=["query", "value"],
    )
    assert "approximates" in report.note
    assert_close(logits_of(tmp_path / "sparse", tiny_bert), logits_of(result.output, tiny_bert))


def test_a_sparsified_lora_targets_the_matrices_it_changed_and_merges_like_it(
    tiny_bert, sentiment, tmp_path, cli
):
    """The README's example: no --targets. The sparse delta names the base's query/value
    matrices (not lora_A/lora_B), spends nothing elsewhere, and at density 1 merges to the
    LoRA's own merge (up to float32 rounding of W + (W' - W))."""
    train(
        tiny_recipe(tiny_bert, sentiment, {"kind": "lora", "r": 2}, max_steps=3), tmp_path / "lora"
    )
    code, _, err = cli(
        "sparsify", tiny_bert, tmp_path / "lora", tmp_path / "sparse", "--density", "1"
    )
    assert code == 0, err
    recipe = read_delta(tmp_path / "sparse").recipe
    assert recipe.deltas[0].targets == ["query", "value"]
    keys = load_file(tmp_path / "sparse" / "adapter_model.safetensors")
    assert {k.split(".")[-2] for k in keys if "sift" in k} == {"query", "value"}
    for delta in ("lora", "sparse"):
        code, _, err = cli("merge", tiny_bert, tmp_path / delta, tmp_path / f"merged-{delta}")
        assert code == 0, err
    code, _, err = cli("inspect", tmp_path / "sparse", "--json")
    assert code == 0, err
    code, out, err = cli(
        "eval",
        "--delta",
        tmp_path / "sparse",
        "--data",
        sentiment["eval"],
        "--text",
        "text",
        "--json",
    )
    assert code == 0 and json.loads(out)["examples"] == 64, err
    lora, sparse = (
        load_file(tmp_path / f"merged-{d}" / "model.safetensors") for d in ("lora", "sparse")
    )
    assert lora.keys() == sparse.keys()
    for name, weight in lora.items():
        bound = 4 * torch.finfo(torch.float32).eps * max(1.0, float(weight.abs().max()))
        assert (weight - sparse[name]).abs().max() <= bound, name


def test_two_bare_encoders_are_sparsified_on_the_matrices_both_have(tiny_bert, tmp_path):
    """A tuned model without a task head (a domain-adapted encoder saved by AutoModel)."""
    from transformers import BertModel

    for name, shift in (("base", 0.0), ("tuned", 0.05)):
        body = BertModel.from_pretrained(tiny_bert)
        torch.manual_seed(9)
        with torch.no_grad():
            for module in body.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.add_(torch.randn_like(module.weight) * shift)
        body.save_pretrained(tmp_path / name)
    report = sparsify(str(tmp_path / "base"), str(tmp_path / "tuned"), tmp_path / "sparse", 0.01)
    assert report.matrices and not read_delta(tmp_path / "sparse").recipe.head
    assert all(m.kept == math.ceil(0.01 * m.size) for m in report.matrices)


def test_full_fine_tuning_reports_what_it_leaves_out(tiny_bert, sentiment, tmp_path):
    result = train(
        tiny_recipe(tiny_bert, sentiment, {"kind": "full"}, max_steps=2, lr=1e-3), tmp_path / "full"
    )
    report = sparsify(str(tiny_bert), str(result.output), tmp_path / "sparse", density=0.5)
    assert report.note is None
    assert any(name.endswith("LayerNorm.weight") for name in report.dropped)
    assert report.norm_kept_overall < report.norm_kept <= 1.0


def test_cli_sparsify_scores_sparse_beside_dense(cli, tiny_bert, tuned, sentiment, tmp_path):
    # A whole tuned model knows its labels only as ids: score it on 0/1 labels.
    rows = sentiment["eval"].read_text().replace(",neg", ",0").replace(",pos", ",1")
    (tmp_path / "dev.csv").write_text(rows)
    args = ["--eval", tmp_path / "dev.csv", "--text", "text", "--json"]
    code, out, err = cli(
        "sparsify", tiny_bert, tuned, tmp_path / "sparse", "--density", "1.0", *args
    )
    assert code == 0, err
    scores = json.loads(out)["scores"]
    assert scores["sparse"]["examples"] == scores["dense"]["examples"] == 64
    assert scores["sparse"]["accuracy"] == scores["dense"]["accuracy"]  # lossless at density 1


def test_masks_from_gradients_are_reused_by_train(cli, tiny_bert, sentiment, tmp_path):
    code, _, err = cli(
        "sparsify", "--from-gradients", "--model", tiny_bert, "--data", sentiment["train"],
        "--text", "text", "--density", "0.02", "--targets", "query,value", tmp_path / "masks",
    )  # fmt: skip
    assert code == 0, err
    masks = load_file(tmp_path / "masks" / "adapter_model.safetensors")
    code, _, err = cli(
        "train", "--method", "sift", "--model", tiny_bert, "--data", sentiment["train"],
        "--eval-data", sentiment["eval"], "data.text=text", "train.max_steps=2",
        "deltas.0.targets=[query,value]", "--mask", tmp_path / "masks", "-o", tmp_path / "trained",
    )  # fmt: skip
    assert code == 0, err
    trained = load_file(tmp_path / "trained" / "adapter_model.safetensors")
    indices = [k for k in masks if k.endswith("sift_indices")]
    assert indices and all(torch.equal(masks[k], trained[k]) for k in indices)
    code, out, _ = cli("inspect", tmp_path / "masks", "--json")
    densities = json.loads(out)["densities"]
    assert len(densities) == 4 and all(0.02 <= share < 0.021 for share in densities.values())
