"""SIFT: gradient-chosen sparse increments whose gradients and optimizer state are sparse."""

import math

import pytest
import torch
import torch.nn.functional as F

from deltacli.build import prepare_model
from deltacli.commands.merge import merge
from deltacli.deltas import attach
from deltacli.deltas.sift import SiftConfig
from deltacli.storage.delta_folder import read_delta
from deltacli.training.logs import MetricsLog
from deltacli.training.runs import train
from deltacli.training.trainer import Trainer
from helpers import assert_close, logits64, tiny_recipe

QUERY = "bert.encoder.layer.0.attention.self.query"


def sift(**fields):
    return {"kind": "sift", "density": 0.05, "select": "gradient", **fields}


def batches(count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(5, 27, (4, 9), generator=generator)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([0, 1, 0, 1]),
            }
        )
    return out


class OneProcess:
    def reduce(self, tensor, reduction):
        return tensor


def test_gradient_selection_picks_exactly_the_top_k(tiny_bert, sentiment):
    recipe = tiny_recipe(tiny_bert, sentiment, sift(select_batches=2))
    model, deltas = prepare_model(recipe)
    model.eval()
    data = batches(2)
    expected = {}
    for name, site in deltas.deltas[0].sites.items():
        weight = site.module.weight
        weight.requires_grad_(True)
        expected[name] = torch.zeros_like(weight)
    for batch in data:
        model(**batch).loss.backward()
        for name, site in deltas.deltas[0].sites.items():
            expected[name] += site.module.weight.grad.abs()
            site.module.weight.grad = None
    for site in deltas.deltas[0].sites.values():
        site.module.weight.requires_grad_(False)
    deltas.calibrate(model, data, OneProcess())
    for name, site in deltas.deltas[0].sites.items():
        k = math.ceil(0.05 * site.module.weight.numel())
        top = torch.topk(expected[name].reshape(-1), k).indices.sort().values
        assert torch.equal(site.module.sift_indices, top), name
    assert all(p.grad is None for p in model.parameters())  # selection updates nothing


def test_optimizer_state_is_k_per_matrix_and_no_dense_gradient_survives(tiny_bert, sentiment):
    trainer = Trainer(tiny_recipe(tiny_bert, sentiment, sift(), max_steps=2), console=None)
    trainer.fit(MetricsLog(None))
    sites = trainer.deltas.deltas[0].sites
    state = trainer.optimizer.state_dict()["state"]
    sizes = sorted(s["exp_avg"].numel() for s in state.values())
    expected = sorted(
        [site.count for site in sites.values()]
        + [p.numel() for p in trainer.deltas.head.params.values()]
    )
    assert sizes == expected
    for site in sites.values():
        assert site.module.weight.grad is None and not site.module.weight.requires_grad
        assert site.count == math.ceil(0.05 * site.module.weight.numel())


def test_the_update_of_a_step_is_in_the_next_forward(tiny_bert, sentiment):
    model, deltas = prepare_model(tiny_recipe(tiny_bert, sentiment, sift(select="magnitude")))
    base = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    deltas.calibrate(model, [], OneProcess())
    optimizer = torch.optim.SGD(list(deltas.parameters().values()), lr=0.5)
    model(**batches(1)[0]).loss.backward()
    optimizer.step()
    module = model.bert.encoder.layer[0].attention.self.query
    expected = base.clone().view(-1)
    expected[module.sift_indices] += module.sift_values.detach()
    x = torch.randn(2, 32)
    assert_close(module(x), F.linear(x, expected.view_as(base), module.bias))
    assert module.sift_values.abs().sum() > 0


def test_density_one_reproduces_dense_fine_tuning(tiny_bert_no_dropout, sentiment):
    # In float64: the two paths add gradients in different orders, which float32 rounding
    # (amplified by AdamW's normalisation) would turn into machine-dependent differences.
    common = {"max_steps": 4, "weight_decay": 0.0, "lr": 1e-2, "base_dtype": "fp64"}
    sparse = Trainer(
        tiny_recipe(
            tiny_bert_no_dropout,
            sentiment,
            sift(density=1.0, select="magnitude", targets=["query"]),
            **common,
        ),
        console=None,
    )
    sparse.recipe.head = False
    dense = Trainer(
        tiny_recipe(
            tiny_bert_no_dropout,
            sentiment,
            {"kind": "modules", "targets": ["query.weight"]},
            **common,
        ),
        console=None,
    )
    for trainer in (sparse, dense):
        trainer.fit(MetricsLog(None))
    for layer in (0, 1):
        name = f"bert.encoder.layer.{layer}.attention.self.query"
        site = sparse.deltas.deltas[0].sites[name]
        trained = site.module.weight.detach().clone().view(-1)
        trained[site.module.sift_indices] = site.module.sift_base + site.module.sift_values.detach()
        reference = dict(dense.model.named_parameters())[f"{name}.weight"].detach()
        assert_close(trained.view_as(reference), reference, rel=1e-9)


def test_gradient_accumulation_equals_one_big_batch(tiny_bert_no_dropout, sentiment):
    results = []
    for batch_size, accumulation in ((16, 1), (8, 2)):
        recipe = tiny_recipe(
            tiny_bert_no_dropout,
            sentiment,
            sift(select="magnitude"),
            max_steps=1,
            batch_size=batch_size,
            grad_accum=accumulation,
            base_dtype="fp64",
        )
        trainer = Trainer(recipe, console=None)
        trainer.fit(MetricsLog(None))
        results.append(trainer.deltas.deltas[0].sites[QUERY].module.sift_values.detach().clone())
    assert_close(results[0], results[1], rel=1e-9)


def test_saved_sparse_delta_reloads_and_merges_to_the_trained_logits(
    tiny_bert, sentiment, tmp_path
):
    result = train(tiny_recipe(tiny_bert, sentiment, sift(), max_steps=5), tmp_path / "delta")
    saved = read_delta(result.output)
    assert {k.rsplit(".", 1)[-1] for k in saved.tensors} >= {"sift_indices", "sift_values"}
    assert saved.tensors[f"base_model.model.{QUERY}.sift_indices"].dtype == torch.int64
    live, deltas = prepare_model(saved.recipe)
    saved.load_into(deltas)
    inputs = batches(1)[0]
    inputs.pop("labels")
    expected = logits64(live.eval(), inputs)
    merge(str(tiny_bert), [result.output], tmp_path / "merged", verify=True)
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert_close(logits64(merged, inputs), expected)


def test_inspect_reports_density_per_matrix(tiny_bert, sentiment, tmp_path):
    from deltacli.commands.inspection import inspect_delta

    result = train(
        tiny_recipe(tiny_bert, sentiment, sift(density=0.02), max_steps=1), tmp_path / "delta"
    )
    report = inspect_delta(result.output)
    assert set(report.densities) == {
        f"bert.encoder.layer.{i}.attention.{m}"
        for i in (0, 1)
        for m in ("self.query", "self.key", "self.value", "output.dense")
    }
    assert all(0.02 <= share < 0.021 for share in report.densities.values())


def test_detach_restores_the_base_weights(tiny_bert, sentiment):
    model, deltas = prepare_model(tiny_recipe(tiny_bert, sentiment, sift(select="random")))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".sift_" not in n}
    deltas.calibrate(model, [], OneProcess())
    with torch.no_grad():
        for param in deltas.deltas[0].params.values():
            param.normal_()
    model(**batches(1)[0])  # writes the increments into W
    deltas.detach()
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_sift_attaches_on_meta_with_k_per_matrix(tiny_bert):
    from deltacli.models.loading import build_on_meta

    model = build_on_meta(str(tiny_bert), "sequence-classification", None)
    deltas = attach(model, [SiftConfig(density=0.01, targets=["all-linear"])], None)
    assert sum(p.numel() for p in deltas.parameters().values()) == sum(
        math.ceil(0.01 * m.weight.numel())
        for n, m in model.named_modules()
        if n.endswith(("query", "key", "value", "dense")) and not n.startswith("classifier")
    )


@pytest.mark.parametrize("density", [0.0, 1.5])
def test_density_out_of_range_is_refused(density):
    from deltacli.errors import DeltacliError

    with pytest.raises(DeltacliError, match="sift density must be in"):
        SiftConfig(density=density)
