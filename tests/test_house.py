"""The house as built: one set-up path (config read once, dtype decided once), one metric
registry that every reader agrees with, recipe keys explained from the schema, report's
learning rates as the recipe sets them, and a ledger that gives the model back as it was."""

import dataclasses

import pytest
import torch

from deltacli.deltas import attach
from deltacli.deltas.lora import LoraConfig
from deltacli.deltas.specify import LayerNormConfig
from deltacli.recipe import recipe_file
from helpers import tiny_model, tiny_recipe


def test_a_run_reads_the_config_once_and_decides_the_dtype_once(tiny_bert, sentiment, monkeypatch):
    from transformers import AutoConfig

    from deltacli import build
    from deltacli.models import loading
    from deltacli.training.trainer import Trainer

    reads, decisions = [], []
    real_hub, real_stored = loading._from_hub, build.stored_dtype

    def counted_hub(loader, spec, **kwargs):
        if getattr(loader, "__self__", None) is AutoConfig:
            reads.append(spec)
        return real_hub(loader, spec, **kwargs)

    def counted_stored(*args):
        decisions.append(args)
        return real_stored(*args)

    monkeypatch.setattr(loading, "_from_hub", counted_hub)
    monkeypatch.setattr(build, "stored_dtype", counted_stored)
    Trainer(tiny_recipe(tiny_bert, sentiment, {"kind": "lora"}, max_steps=1), console=None)
    assert len(reads) == 1 and len(decisions) == 1


def test_every_metric_a_task_reports_is_in_the_registry_once():
    from deltacli.storage.card import _COLUMNS
    from deltacli.tasks.metrics import METRICS, metric_rows, oriented
    from deltacli.tasks.registry import TASKS
    from deltacli.tasks.scoring import reported_metrics

    named = {m for task in TASKS.values() for m in task.metrics}
    named |= {*reported_metrics(2), *reported_metrics(3)}
    assert named <= set(METRICS)
    assert set(_COLUMNS) == set(METRICS)  # the model card's history table
    assert oriented("loss", 0.2) > oriented("loss", 0.3)
    assert oriented("accuracy", 0.9) > oriented("accuracy", 0.8)
    rows = dict(metric_rows({"f1": 0.5, "positive_class": "pos", "loss": 1.0, "examples": 4}))
    assert rows == {"F1 (positive class: pos)": 0.5}


def test_recipe_keys_lists_every_setting_with_type_default_and_help(cli):
    code, out, err = cli("recipes", "--keys", "lora", "--json")
    assert code == 0, err
    import json

    keys = {key["key"]: key for key in json.loads(out)}
    for name in ("base_dtype", "quantize", "train.save_every", "deltas.0.lr", "deltas.0.r"):
        assert keys[name]["help"], name
    assert keys["deltas.0.r"]["type"] == "integer" and keys["deltas.0.r"]["default"] == "8"
    assert keys["train.lr"]["within"] == "positive"
    assert keys["quantize"]["type"] == "nf4 | int8 or null"
    # A shipped recipe's keys are its deltas', numbered; with no name, every kind's.
    code, out, _ = cli("recipes", "--keys", "mam", "--json")
    mam = {key["key"] for key in json.loads(out)}
    assert {"deltas.0.length", "deltas.1.scale"} <= mam
    code, out, _ = cli("recipes", "--keys", "--json")
    every = json.loads(out)
    assert any(k["key"] == "deltas.N.density" and k["help"].startswith("sift:") for k in every)
    code, _, err = cli("recipes", "--keys", "lorra")
    assert code == 2 and "did you mean 'lora'" in err


def test_report_names_each_delta_s_own_learning_rate():
    from deltacli.commands.report import learning_rates
    from deltacli.recipe import load_recipe

    mam = load_recipe(recipe_file("mam", None), ["deltas.0.lr=4e-2", "deltas.1.lr=2e-3"])
    assert learning_rates(mam) == "prefix 4.0e-02, adapter 2.0e-03"
    lora = load_recipe(recipe_file("lora", None), ["train.lr=1e-3"])
    assert learning_rates(lora) == "1.0e-03"


def test_detach_gives_back_the_base_s_dtypes_and_trainable_flags():
    model = tiny_model("bert").to(torch.bfloat16)
    model.classifier.requires_grad_(False)  # the user's own choice, kept after detach
    before = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    deltas = attach(model, [LoraConfig(r=2), LayerNormConfig()], None)
    recast = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert any("LayerNorm" in n for n in recast)  # trained in float32 over a bf16 base
    deltas.detach()
    assert {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("name", ["lora", "mam"])
def test_a_sweep_grid_value_arrives_typed(name):
    """`x2` multiplies the number the recipe resolves to and is set as a number (no text
    round trip); a plain value is read as YAML."""
    from deltacli.commands.sweep import Run, run_recipe

    run = Run("r", name, name, {"train.lr": "x2", "train.batch_size": "16"}, seed=7)
    recipe = run_recipe(run, [], {})
    base = run_recipe(dataclasses.replace(run, grid={}), [], {})
    assert recipe.train.lr == 2 * base.train.lr and recipe.train.batch_size == 16
    assert recipe.train.seed == 7 and recipe.name == "r"
