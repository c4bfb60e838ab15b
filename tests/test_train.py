"""The trainer on a tiny learnable task: it learns, saves what it learned, and writes atomically."""

import json

import pytest
import torch
import yaml

from deltacli.commands.evaluate import score_delta
from deltacli.errors import DeltacliError
from deltacli.storage.delta_folder import LOG_FILE, METRICS_FILE, RECIPE_FILE
from deltacli.tasks.evaluation import evaluate
from deltacli.tasks.tables import load_table
from deltacli.training import trainer as trainer_module
from deltacli.training.logs import MetricsLog
from deltacli.training.runs import train
from deltacli.training.trainer import Throughput, Trainer
from helpers import tiny_recipe

METHODS = {
    "lora": {"kind": "lora", "r": 4, "alpha": 8},
    "bitfit": {"kind": "bitfit"},
    "layernorm": {"kind": "layernorm"},
    "full": {"kind": "full"},
    "adapter": {"kind": "adapter", "r": 8},
    "scaled-parallel-adapter": {"kind": "adapter", "r": 8, "placement": "parallel", "scale": 4.0},
    "ia3": {"kind": "ia3"},
    "prefix": {"kind": "prefix", "length": 4},
    "prefix-mlp": {"kind": "prefix", "length": 4, "projection": 16},
    "prompt": {"kind": "prompt", "length": 4},
}
LEARNING_RATES = {"full": 1e-3}


def logged_losses(folder):
    lines = [json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_loss_goes_down_and_the_delta_moves(tiny_bert, sentiment, method):
    recipe = tiny_recipe(
        tiny_bert, sentiment, METHODS[method], epochs=4, lr=LEARNING_RATES.get(method, 1e-2)
    )
    trainer = Trainer(recipe, console=None)
    start = {n: t.clone() for n, t in trainer.deltas.deltas[0].params.items()}
    before = evaluate(trainer.model, trainer.eval_batches, trainer.accelerator, trainer.task)
    after = trainer.fit(MetricsLog(None))["eval"]
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.9
    moved = [(trainer.deltas.deltas[0].params[n] - t).abs().max() for n, t in start.items()]
    assert min(moved) > 0


# Methods that can turn the representation round on their own. BitFit, LayerNorm, IA3 and
# prompt tuning cannot within this budget on this tiny model: they only rescale or shift what
# is there (or, for the prompt, add four tokens), and rely on the head.
EXPRESSIVE = ["lora", "full", "adapter", "scaled-parallel-adapter", "prefix", "prefix-mlp"]


@pytest.mark.parametrize("method", EXPRESSIVE)
def test_the_delta_alone_undoes_a_wrong_head(tiny_bert, sentiment, method):
    # The head is frozen and turned the wrong way round, so the delta alone must learn.
    recipe = tiny_recipe(
        tiny_bert, sentiment, METHODS[method], epochs=8, lr=LEARNING_RATES.get(method, 3e-2)
    )
    recipe.head = False
    trainer = Trainer(recipe, console=None)
    with torch.no_grad():
        trainer.model.classifier.weight.neg_()
        trainer.model.classifier.bias.neg_()
    before = evaluate(trainer.model, trainer.eval_batches, trainer.accelerator, trainer.task)
    after = trainer.fit(MetricsLog(None))["eval"]
    assert after["loss"] < 0.8 * before["loss"]
    assert after["accuracy"] > before["accuracy"] + 0.3


@pytest.mark.parametrize("method", METHODS)
def test_saved_delta_scores_exactly_what_training_measured(tiny_bert, sentiment, tmp_path, method):
    recipe = tiny_recipe(tiny_bert, sentiment, METHODS[method], epochs=2)
    result = train(recipe, tmp_path / "out")
    scores = score_delta(result.output, str(sentiment["eval"]))
    best = result.metrics["eval"]
    assert scores["accuracy"] == best["accuracy"]
    assert scores["loss"] == pytest.approx(best["loss"], abs=1e-6)


def test_best_epoch_is_kept_and_logged(tiny_bert, sentiment, tmp_path):
    recipe = tiny_recipe(tiny_bert, sentiment, METHODS["bitfit"], epochs=3)
    metrics = train(recipe, tmp_path / "out").metrics
    ranked = [(epoch["accuracy"], -epoch["loss"]) for epoch in metrics["history"]]
    assert len(ranked) == 3
    assert metrics["best_epoch"] == ranked.index(max(ranked)) + 1
    assert metrics["eval"] == {
        k: v
        for k, v in metrics["history"][metrics["best_epoch"] - 1].items()
        if k not in ("epoch", "step")
    }


def test_string_labels_are_mapped_and_the_mapping_saved(tiny_bert, sentiment, tmp_path):
    result = train(tiny_recipe(tiny_bert, sentiment, METHODS["lora"], max_steps=2), tmp_path / "o")
    saved = yaml.safe_load((result.output / RECIPE_FILE).read_text())
    assert saved["data"]["labels"] == ["neg", "pos"]
    assert json.loads((result.output / METRICS_FILE).read_text())["train"]["steps"] == 2


def test_gradient_accumulation_counts_optimizer_steps(tiny_bert, sentiment, tmp_path):
    recipe = tiny_recipe(tiny_bert, sentiment, METHODS["lora"], epochs=1, grad_accum=3)
    metrics = train(recipe, tmp_path / "out").metrics
    assert metrics["train"]["steps"] == 3  # 128 rows / 16 = 8 batches -> ceil(8 / 3)
    assert metrics["train"]["samples"] == 128


def test_without_eval_data_a_share_of_train_is_held_out(tiny_bert, sentiment, tmp_path):
    recipe = tiny_recipe(
        tiny_bert, {"train": sentiment["train"], "eval": None}, METHODS["bitfit"], max_steps=1
    )
    recipe.data.eval = None
    metrics = train(recipe, tmp_path / "out").metrics
    assert metrics["eval"]["examples"] == 13  # 10% of 128 rows, rounded up
    assert metrics["train"]["samples"] == 16


def test_sentence_pairs_are_encoded_as_pairs(tiny_bert, tmp_path):
    rows = "premise,hypothesis,label\n" + "".join(
        f"the movie was {a},the film was {b},{int(a == b)}\n"
        for a in ("good", "bad", "fine")
        for b in ("good", "bad", "fine")
    )
    (tmp_path / "pairs.csv").write_text(rows)
    data = {"train": tmp_path / "pairs.csv", "eval": tmp_path / "pairs.csv"}
    recipe = tiny_recipe(tiny_bert, data, METHODS["lora"], max_steps=2)
    recipe.data.text, recipe.data.text_pair = "premise", "hypothesis"
    trainer = Trainer(recipe, console=None)
    first = trainer.data.train[0]
    assert 1 in first["token_type_ids"] and first["input_ids"].count(3) == 2  # two [SEP]
    assert trainer.data.labels == [0, 1]


def test_overwrite_replaces_only_what_deltacli_wrote(tiny_bert, sentiment, tmp_path):
    recipe = tiny_recipe(tiny_bert, sentiment, METHODS["lora"], max_steps=1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("a user's own file")
    with pytest.raises(DeltacliError, match="exists; pass --overwrite"):
        train(recipe, mine)
    with pytest.raises(DeltacliError, match="was not written by deltacli"):
        train(recipe, mine, overwrite=True)
    assert (mine / "keep.txt").read_text() == "a user's own file"
    out = tmp_path / "out"
    train(recipe, out)
    (out / "stale.txt").write_text("from the first run")
    train(recipe, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / RECIPE_FILE).exists()


def test_a_crash_leaves_nothing_that_looks_complete(tiny_bert, sentiment, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("deltacli.training.trainer.evaluate", broken)
    recipe = tiny_recipe(tiny_bert, sentiment, METHODS["lora"], max_steps=1)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(recipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".tsv", ".json", ".jsonl", ".parquet"])
def test_every_file_format_reads_the_same_rows(sentiment, tmp_path, suffix):
    table = load_table(str(sentiment["train"]))
    path = tmp_path / f"rows{suffix}"
    if suffix == ".tsv":
        table.to_csv(str(path), sep="\t", index=False)
    elif suffix == ".json":
        path.write_text(json.dumps(table.to_list()))
    elif suffix == ".jsonl":
        table.to_json(str(path), lines=True)
    else:
        table.to_parquet(str(path))
    assert load_table(str(path)).to_list() == table.to_list()


def test_bundled_sample_is_addressed_by_name():
    train_rows, dev_rows = load_table("sst2:train"), load_table("sst2:validation")
    assert len(train_rows) == 2000 and len(dev_rows) == 872
    assert train_rows.column_names == ["sentence", "label"]


def test_training_is_reproducible_with_a_seed(tiny_bert, sentiment, tmp_path):
    recipe = tiny_recipe(tiny_bert, sentiment, METHODS["lora"], max_steps=3)
    first = train(recipe, tmp_path / "a").metrics["eval"]["loss"]
    second = train(recipe, tmp_path / "b").metrics["eval"]["loss"]
    assert first == second
    assert torch.equal(
        torch.tensor(logged_losses(tmp_path / "a")), torch.tensor(logged_losses(tmp_path / "b"))
    )


def test_a_delta_s_own_lr_overrides_train_lr(tiny_bert, sentiment, tmp_path):
    """MAM's prefix and adapter want learning rates 10× apart: each delta may set its own."""
    from transformers import AutoModelForSequenceClassification

    from deltacli.storage.delta_folder import read_delta

    still = {"kind": "lora", "r": 2, "lr": 1e-12}
    train(tiny_recipe(tiny_bert, sentiment, still, {"kind": "bitfit"}, epochs=1), tmp_path / "r")
    tensors = read_delta(tmp_path / "r").tensors
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert).state_dict()
    lora_b = [value for key, value in tensors.items() if "lora_B" in key]
    assert lora_b and max(float(b.abs().max()) for b in lora_b) < 1e-9  # starts at zero
    moved = [
        float((value - base[key.removeprefix("base_model.model.")]).abs().max())
        for key, value in tensors.items()
        if key.endswith("attention.self.query.bias")
    ]
    assert moved and min(moved) > 1e-3


def test_throughput_counts_no_time_while_paused(monkeypatch):
    """Evaluation and saving happen while the meter is paused; the rate read after the last
    pause (the one metrics.json records) must count training time only."""
    now = [0.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: now[0])
    meter = Throughput()
    meter.add(50, 1.0)
    now[0] = 10.0
    meter.pause()
    now[0] = 100.0  # evaluating, saving
    assert meter.rate == pytest.approx(5.0)
    meter.resume()
    now[0] = 110.0
    assert meter.rate == pytest.approx(2.5)


def test_lora_plus_trains_b_at_its_ratio_of_a_s_rate_and_saves_a_plain_lora(
    tiny_bert, sentiment, tmp_path
):
    """LoRA+ (`lr_ratio`): AdamW's groups put B at ratio × A's rate; the delta it writes is
    an ordinary LoRA (PEFT's adapter_config.json has no LoRA+ field: it is how one trains)."""
    recipe = tiny_recipe(tiny_bert, sentiment, {"kind": "lora", "r": 4, "lr_ratio": 16}, lr=1e-3)
    trainer = Trainer(recipe, console=None)
    names = iter(trainer.param_names)  # the groups' parameters, in order
    peak = {
        next(names): g["initial_lr"] for g in trainer.optimizer.param_groups for _ in g["params"]
    }
    b = [rate for name, rate in peak.items() if ".lora_B." in name]
    a = [rate for name, rate in peak.items() if ".lora_A." in name]
    assert b and a and b == pytest.approx([1.6e-2] * len(b)) and a == pytest.approx([1e-3] * len(a))
    result = train(recipe, tmp_path / "delta")
    config = json.loads((tmp_path / "delta" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and result.metrics["eval"]["loss"] > 0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fused_adamw_trains_the_delta_the_multi_tensor_adamw_trains(tiny_bert, sentiment, method):
    """`train.fused_adamw` (the default) changes how the update runs, not what it is."""
    trained = {}
    for fused in (True, False):
        recipe = tiny_recipe(tiny_bert, sentiment, METHODS[method], fused_adamw=fused, lr=1e-3)
        trainer = Trainer(recipe, console=None)
        assert bool(trainer.optimizer.optimizer.defaults["fused"]) is fused
        trainer.fit(MetricsLog(None))
        trained[fused] = {n: t.detach().clone() for n, t in trainer.deltas.parameters().items()}
    assert trained[True].keys() == trained[False].keys()
    for name, tensor in trained[True].items():
        torch.testing.assert_close(tensor, trained[False][name], rtol=1e-5, atol=1e-6, msg=name)
