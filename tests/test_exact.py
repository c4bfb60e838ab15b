"""The same training whatever the split: a step's loss is the sum over all its loss terms
(tokens, or examples) divided by their count, so one process at batch 8, batch 4 ×
grad_accum 2, 2 processes × batch 4 and 2 processes × batch 2 × grad_accum 2 train the same
delta — for classification, causal LMs whose responses differ in length, chat records, packed
rows and seq2seq, the last (shorter) step included. And packed examples are truly apart: a
packed step's gradient equals the unpacked one's over the same examples.

Everything runs through the real data path, collator and trainer, in float64.
"""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from deltacli.recipe import parse_recipe
from deltacli.training.logs import MetricsLog
from deltacli.training.trainer import Trainer
from helpers import (
    ACCELERATE,
    LM_WORDS,
    assert_close,
    free_port,
    launcher,
    run_offline,
    sentiment_rows,
    tiny_model,
    what_failed,
    word_tokenizer,
    write_csv,
    write_jsonl,
)

ROWS = 20  # steps of 8, 8 and 4 examples: the last one is shorter
WORDS = [w for w in LM_WORDS if w.isalpha()]


def responses(count: int, seed: int) -> list[str]:
    """Answers from 1 to 12 words: micro-batches then hold very different token counts."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for _ in range(count)]


def alpaca(count: int, seed: int) -> list[dict]:
    return [
        {"instruction": "say this", "input": text, "output": answer}
        for (text, _), answer in zip(
            sentiment_rows(count, seed), responses(count, seed + 7), strict=True
        )
    ]


def chat(count: int, seed: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": record["input"]},
                {"role": "assistant", "content": record["output"]},
                {"role": "user", "content": "and this"},
                {"role": "assistant", "content": record["output"].split()[0]},
            ]
        }
        for record in alpaca(count, seed)
    ]


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_bert_no_dropout, tiny_llama) -> dict[str, dict]:
    """Raw recipes, one per kind of data (float64, no dropout, one epoch)."""
    folder = tmp_path_factory.mktemp("exact")
    t5 = folder / "t5"  # the tiny T5 without dropout: splits then compare exactly
    tokenizer = word_tokenizer(add_eos=True)
    tokenizer.save_pretrained(t5)
    tiny_model(
        "t5", "seq2seq", vocab_size=len(tokenizer), eos_token_id=3, dropout_rate=0.0
    ).save_pretrained(t5)
    write_csv(folder / "sst.csv", sentiment_rows(ROWS, seed=3))
    write_jsonl(folder / "alpaca.jsonl", alpaca(ROWS, seed=4))
    write_jsonl(folder / "chat.jsonl", chat(ROWS, seed=5))
    pairs = [{"source": r["input"], "target": r["output"]} for r in alpaca(ROWS, seed=6)]
    write_jsonl(folder / "pairs.jsonl", pairs)
    train = {"epochs": 1, "lr": 1e-2, "warmup_ratio": 0.0, "seed": 5, "keep_best": False}

    def recipe(model, task, data, deltas, **columns) -> dict:
        return {
            "name": "exact", "model": str(model), "task": task, "base_dtype": "fp64",
            "data": {"train": str(folder / data), "eval": str(folder / data), **columns},
            "deltas": deltas, "train": dict(train),
        }  # fmt: skip

    lora = [{"kind": "lora", "r": 4}]
    return {
        "classification": recipe(tiny_bert_no_dropout, "sequence-classification", "sst.csv",
                                 lora, text="text"),
        "causal-lm": recipe(tiny_llama, "causal-lm", "alpaca.jsonl", lora, max_length=64),
        "causal-lm prompt": recipe(tiny_llama, "causal-lm", "alpaca.jsonl",
                                   [{"kind": "prompt", "length": 3}], max_length=64),
        "chat": recipe(tiny_llama, "causal-lm", "chat.jsonl", lora, max_length=96),
        "packed": recipe(tiny_llama, "causal-lm", "alpaca.jsonl", lora, max_length=24,
                         packing=True),
        "seq2seq": recipe(t5, "seq2seq", "pairs.jsonl", lora, text="source", target="target",
                          max_length=32),
    }  # fmt: skip


def split(raw: dict, batch_size: int, accum: int) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["train"] |= {"batch_size": batch_size, "grad_accum": accum}
    return raw


def trained(raw: dict) -> dict[str, torch.Tensor]:
    trainer = Trainer(parse_recipe(raw), console=None)
    trainer.fit(MetricsLog(None))
    return {k: v.detach().clone() for k, v in trainer.deltas.state_dict().items()}


@pytest.mark.parametrize(
    "case", ["classification", "causal-lm", "causal-lm prompt", "chat", "packed", "seq2seq"]
)
def test_batch_8_trains_what_batch_4_times_accumulation_2_trains(cases, case):
    whole = trained(split(cases[case], 8, 1))
    halves = trained(split(cases[case], 4, 2))
    quarters = trained(split(cases[case], 2, 4))
    for name, tensor in whole.items():
        assert torch.equal(tensor.isfinite(), torch.ones_like(tensor, dtype=torch.bool))
        assert_close(halves[name], tensor, rel=1e-10)
        assert_close(quarters[name], tensor, rel=1e-10)


def test_uneven_token_counts_do_not_weigh_micro_batches_apart(cases):
    """The bug this guards against: with every micro-batch's own mean, batch 8 and batch 4
    × 2 disagree once responses differ in length. The step's loss is one weighted mean."""
    trainer = Trainer(parse_recipe(split(cases["causal-lm"], 4, 2)), console=None)
    order = trainer.epoch_permutation()
    counts = [
        sum(trainer.units[i] for i in micro.indices)
        for micro in trainer.plan.micro_batches(order, 0)
    ]
    assert len(set(counts)) > 1  # the two halves hold different numbers of tokens


SPLITS = """
import json, sys
from safetensors.torch import save_file
from deltacli.recipe import parse_recipe
from deltacli.training.logs import MetricsLog
from deltacli.training.trainer import Trainer

cases, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
for name, raw in cases.items():
    trainer = Trainer(parse_recipe(raw), console=None)
    assert trainer.accelerator.num_processes == 2
    trainer.fit(MetricsLog(None))
    state = {k: v.detach().contiguous() for k, v in trainer.deltas.state_dict().items()}
    if trainer.accelerator.is_main_process:
        save_file(state, f"{out}/{name}.safetensors")
"""


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_two_processes_train_what_one_process_trains(cases, tmp_path):
    """2 processes × batch 4, and 2 × batch 2 × grad_accum 2, against 1 × batch 8."""
    chosen = ["classification", "causal-lm", "chat", "packed", "seq2seq"]
    runs = {}
    for case in chosen:
        runs[f"{case}--4x1"] = split(cases[case], 4, 1)
        runs[f"{case}--2x2"] = split(cases[case], 2, 2)
    (tmp_path / "cases.json").write_text(json.dumps(runs))
    (tmp_path / "splits.py").write_text(SPLITS)
    done = run_offline(
        [*launcher(), str(tmp_path / "splits.py"), str(tmp_path / "cases.json"), str(tmp_path)],
        tmp_path,
    )
    assert done.returncode == 0, what_failed(done)
    for case in chosen:
        one = trained(split(cases[case], 8, 1))
        for how in ("4x1", "2x2"):
            two = load_file(tmp_path / f"{case}--{how}.safetensors")
            for name, tensor in one.items():
                assert_close(two[name], tensor, rel=1e-10)


@pytest.mark.parametrize("attention", ["auto", "eager"])
def test_a_packed_step_has_the_gradient_of_its_examples_apart(cases, monkeypatch, attention):
    """One row holding every example (max_length = their total) against the same examples
    one per row: through the real collator and trainer, the first step's gradients agree —
    with transformers' own kernel (sdpa) and with `attention: eager`, each building the
    block-diagonal mask from the positions."""
    unpacked = split(cases["causal-lm"], ROWS, 1)
    unpacked["attention"] = attention
    unpacked["data"] |= {"max_length": 256, "max_train_rows": 9}
    plain = Trainer(parse_recipe(unpacked), console=None)
    total = sum(len(ids) for ids in plain.data.train["input_ids"])
    assert total <= 256  # one packed row holds them all (the model's positions allow 256)
    packed = json.loads(json.dumps(unpacked))
    packed["data"] |= {"packing": True, "max_length": total}
    row = Trainer(parse_recipe(packed), console=None)
    assert len(row.data.train) == 1 and "attention_mask" not in row.data.train.column_names
    kernel = row.accelerator.unwrap_model(row.model).config._attn_implementation
    assert kernel == ("sdpa" if attention == "auto" else attention)

    def first_gradients(trainer: Trainer) -> list[torch.Tensor]:
        grads = []

        def capture():
            grads.extend(p.grad.detach().clone() for p in trainer.params)

        monkeypatch.setattr(trainer.optimizer, "step", capture)
        order = trainer.epoch_permutation()
        trainer._step(order, 0)
        return grads

    for theirs, ours in zip(first_gradients(plain), first_gradients(row), strict=True):
        assert_close(ours, theirs, rel=1e-10)


def test_packed_rows_reach_the_model_without_an_attention_mask(cases):
    """What training feeds: the collated packed batch has positions and no mask, so the
    model builds the block-diagonal mask (a mask of ones would let examples see each other)."""
    raw = split(cases["packed"], 4, 1)
    raw["data"]["max_length"] = 64  # rows of about three examples
    trainer = Trainer(parse_recipe(raw), console=None)
    batch, counts = trainer.micro_batches(trainer.epoch_permutation(), 0)[0]
    assert counts and "position_ids" in batch and "attention_mask" not in batch
    model = trainer.model.eval()
    row = next(r for r, p in enumerate(batch["position_ids"].tolist()) if p.count(0) > 1)
    ids, positions = batch["input_ids"][row : row + 1], batch["position_ids"][row : row + 1]
    starts = [i for i, p in enumerate(positions[0].tolist()) if p == 0]
    start, end = starts[1], starts[2] if len(starts) > 2 else ids.shape[1]
    with torch.no_grad():
        together = model(input_ids=ids, position_ids=positions).logits[0, start:end]
        alone = model(input_ids=ids[:, start:end]).logits[0]
    assert_close(together, alone, rel=1e-10)


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_two_machines_train_one_run_as_one_machine_with_two_processes(cases, tmp_path):
    """Two launchers on this machine, one process each (`--num_machines 2`, ranks 0 and 1,
    the main process at 127.0.0.1): one run, one delta, one log, and the delta of one
    process at the same total batch."""
    import os
    import subprocess

    port = free_port()
    raw = split(cases["classification"], 4, 1)
    (tmp_path / "recipe.yaml").write_text(json.dumps(raw))  # JSON is YAML
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def machine(rank: int) -> list[str]:
        return [
            ACCELERATE, "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
            "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "deltacli", "train", "--recipe", "recipe.yaml", "-o", "out",
        ]  # fmt: skip

    machines = [
        subprocess.Popen(
            machine(rank),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=600) for machine in machines]
    for machine, (_, err) in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert sum(out.count("deltacli train ·") for out, _ in outputs) == 1  # one summary
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    one = Trainer(parse_recipe(split(cases["classification"], 8, 1)), console=None)
    one.fit(MetricsLog(None))
    keys = one.deltas.keys()
    for name, tensor in one.deltas.state_dict().items():
        assert_close(saved[keys[name]], tensor, rel=1e-10)
