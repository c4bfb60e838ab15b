"""Preference tuning: pairs encoded as TRL encodes them, the reference as the base with the
deltas switched off, every kind training under DPO, and the bad inputs that stop a run."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltacli.config.sections import DataConfig
from deltacli.labels import IGNORE
from deltacli.storage.delta_folder import WEIGHTS_FILE
from deltacli.tasks.preference import encode_pairs, split_prompt
from deltacli.tasks.tables import batches
from deltacli.training.preference import reference_pass
from deltacli.training.trainer import Trainer
from helpers import (
    ACCELERATE,
    STOPPING,
    launcher,
    run_offline,
    tiny_recipe,
    what_failed,
    write_jsonl,
)

# Every kind, and a composition (MAM: prefix + a parallel adapter at the FFN).
KINDS = [
    [{"kind": "lora"}],
    [{"kind": "lora", "init": "pissa"}],  # W gives up its principal part: off gives it back
    [{"kind": "lora", "use_dora": True}],
    [{"kind": "adapter"}],
    [{"kind": "adapter", "placement": "parallel", "at": "attention"}],
    [{"kind": "prefix", "length": 4}],
    [{"kind": "prompt", "length": 4}],
    [{"kind": "ia3"}],
    [{"kind": "bitfit"}],
    [{"kind": "layernorm"}],
    [{"kind": "sift", "density": 0.05, "select": "magnitude"}],
    [{"kind": "modules", "targets": ["mlp.down_proj"]}],
    [{"kind": "full"}],
    [{"kind": "prefix", "length": 4}, {"kind": "adapter", "placement": "parallel", "scale": 4}],
]
HOLDING = ("bitfit", "layernorm", "modules", "full")  # keep the base's values of what trains
RATES = {"full": 3e-3, "ia3": 1e-1}  # the rest: 2e-2


class Quiet:
    """A metrics log that keeps what it is given."""

    def __init__(self) -> None:
        self.lines: list[dict] = []

    def write(self, **line) -> None:
        self.lines.append(line)


def _table(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def test_pairs_are_tokenised_as_trl_does(tiny_llama):
    """String pairs: an end-of-sequence token closes each answer, the prompt's tokens are
    never scored, and a pair whose answer runs past max_length is cut and counted."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [{"prompt": "the movie was good ", "chosen": "positive", "rejected": "negative"}]
    encoded = encode_pairs(_table(rows), tokenizer, DataConfig(max_length=64))
    row = encoded.table[0]
    prompt = tokenizer("the movie was good ")["input_ids"]
    answer = tokenizer.convert_tokens_to_ids(["positive", "</s>"])
    assert row["chosen_input_ids"] == prompt + answer
    assert row["chosen_labels"][: len(prompt)] == [IGNORE] * len(prompt)
    assert row["chosen_labels"][len(prompt) :] == row["chosen_input_ids"][len(prompt) :]
    assert row["rejected_input_ids"][-2:] == tokenizer.convert_tokens_to_ids(["negative", "</s>"])
    assert encoded.truncated == 0
    cut = encode_pairs(_table(rows), tokenizer, DataConfig(max_length=len(prompt) + 1))
    assert cut.truncated == 1 and len(cut.table[0]["chosen_input_ids"]) == len(prompt) + 1


def test_conversational_and_implicit_prompts(tiny_llama):
    """Message lists go through the chat template (the prompt with the generation prompt);
    a record without a prompt is split at the answers' common prefix, as TRL does."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    user = [{"role": "user", "content": "the movie was good"}]
    explicit = {
        "prompt": user,
        "chosen": [{"role": "assistant", "content": "positive"}],
        "rejected": [{"role": "assistant", "content": "negative"}],
    }
    implicit = {"chosen": user + explicit["chosen"], "rejected": user + explicit["rejected"]}
    config = DataConfig(max_length=64)
    a = encode_pairs(_table([explicit]), tokenizer, config).table[0]
    b = encode_pairs(_table([implicit]), tokenizer, config).table[0]
    assert a == b
    pairs = zip(a["chosen_input_ids"], a["chosen_labels"], strict=True)
    answer = [token for token, label in pairs if label != IGNORE]
    assert tokenizer.convert_ids_to_tokens(answer)[0] == "positive"
    assert split_prompt("it is good", "it is bad") == ("it is", " good", " bad")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "hi", "chosen": "yes"}], "needs the columns chosen and rejected"),
        ([{"prompt": "hi", "chosen": "yes", "rejected": "yes"}], "record 1: chosen and rejected"),
        (
            [{"prompt": "the movie " * 40, "chosen": "yes", "rejected": "no"}],
            "record 1: its prompt is",
        ),
    ],
    ids=["no rejected", "same answers", "prompt too long"],
)
def test_bad_pairs_exit_2_with_one_line(cli, tiny_llama, tmp_path, rows, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code, _, err = cli(
        "train", "--method", "lora", f"model={tiny_llama}", "task=preference",
        f"data.train={data}", f"data.eval={data}", "data.max_length=32", "-o", tmp_path / "run",
    )  # fmt: skip
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_preference_loss_needs_the_preference_task(cli, tiny_llama, instructions):
    code, _, err = cli(
        "train", "--method", "lora", f"model={tiny_llama}", "task=causal-lm", "train.loss=dpo",
        f"data.train={instructions['train']}", f"data.eval={instructions['eval']}",
    )  # fmt: skip
    assert code == 2 and "set task: preference" in err


@torch.no_grad()
def _train_loss(trainer: Trainer) -> float:
    """The mean loss of the training step (reference pass included) over the pairs trained
    on, with dropout off."""
    table = trainer.data.train
    trainer.model.eval()
    total = sum(
        float(trainer.pairs(trainer.model, batch)[0])
        for batch in batches(table, trainer.task.collate(trainer.tokenizer, table), 32, False)
    )
    trainer.model.train()
    return total / len(table)


def _label(delta: dict) -> str:
    return delta.get("init") or ("dora" if delta.get("use_dora") else delta["kind"])


@pytest.mark.parametrize("deltas", KINDS, ids=["+".join(map(_label, k)) for k in KINDS])
def test_every_kind_trains_under_dpo_and_the_reference_stays_the_base(
    tiny_llama, biased_llama, preferences, deltas
):
    """A few DPO steps lower the loss on the pairs trained on; reward accuracy is logged at
    every step and scored on the eval pairs; the reference pass (deltas off) gives the
    logits of the untouched base, before and after training (`full` keeps a copy)."""
    kinds = {d["kind"] for d in deltas}
    model = biased_llama if "bitfit" in kinds else tiny_llama
    recipe = tiny_recipe(
        model, preferences, *deltas, task="preference", epochs=3, batch_size=16,
        lr=RATES.get(deltas[0]["kind"], 2e-2), beta=0.5, warmup_ratio=0.0,
    )  # fmt: skip
    trainer = Trainer(recipe, None)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    probe = trainer.task.collate(trainer.tokenizer, trainer.data.eval)(
        [trainer.data.eval[i] for i in range(4)]
    )
    inputs = {k: probe[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        expected = base(**inputs).logits

    def reference_logits() -> torch.Tensor:
        with torch.no_grad(), trainer.deltas.switched_off():
            trainer.model.eval()
            return trainer.model(**inputs).logits

    torch.testing.assert_close(reference_logits(), expected, rtol=0, atol=1e-5)
    before = _train_loss(trainer)
    log = Quiet()
    summary = trainer.fit(log)
    after = _train_loss(trainer)
    assert after < before - 0.003, (before, after)
    steps = [line for line in log.lines if "reward_accuracy" in line and "eval" not in line]
    assert len(steps) == trainer.total_steps
    assert 0.0 <= summary["eval"]["reward_accuracy"] <= 1.0
    torch.testing.assert_close(reference_logits(), expected, rtol=0, atol=1e-5)
    reference = reference_pass(trainer.model, trainer.deltas, probe)
    torch.testing.assert_close(reference, probe["reference_logps"].float())
    assert (summary["reference_bytes"] > 0) == bool(kinds & set(HOLDING))


def test_a_precomputed_reference_trains_exactly_as_the_live_one(tiny_llama, preferences):
    """Computing the reference once before training changes nothing but the cost."""
    runs = []
    for reference in ("base", "precomputed"):
        recipe = tiny_recipe(
            tiny_llama, preferences, {"kind": "lora"}, task="preference", epochs=1,
            batch_size=16, reference=reference,
        )  # fmt: skip
        trainer = Trainer(recipe, None)
        log = Quiet()
        trainer.fit(log)
        runs.append([line["loss"] for line in log.lines if "loss" in line])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
def test_the_other_losses_train(tiny_llama, preferences, loss):
    recipe = tiny_recipe(
        tiny_llama, preferences, {"kind": "lora"}, task="preference", epochs=3, batch_size=16,
        loss=loss, warmup_ratio=0.0,
    )  # fmt: skip
    trainer = Trainer(recipe, None)
    before = _train_loss(trainer)
    trainer.fit(Quiet())
    assert _train_loss(trainer) < before


def test_train_eval_and_chain_from_sft_on_the_command_line(cli, tiny_llama, preferences, tmp_path):
    """`deltacli train` with task=preference writes a delta that `deltacli eval` scores on
    preference data; a DPO run can start from it (`init_from`)."""
    common = [f"model={tiny_llama}", f"data.train={preferences['train']}",
              f"data.eval={preferences['eval']}", "data.max_length=64", "train.epochs=1",
              "train.batch_size=16"]  # fmt: skip
    code, out, err = cli("train", "--method", "lora", "task=preference", *common,
                         "-o", tmp_path / "dpo")  # fmt: skip
    assert code == 0, err
    assert "reward accuracy" in out
    metrics = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    code, out, err = cli(
        "eval", "--delta", tmp_path / "dpo", "--data", preferences["eval"], "--json"
    )
    assert code == 0, err
    scored = json.loads(out)
    for name in ("reward_accuracy", "reward_margin", "chosen_logp", "loss"):
        assert scored[name] == pytest.approx(metrics["eval"][name], rel=1e-5), name
    code, out, err = cli("train", "--method", "lora", "task=preference", *common,
                         f"deltas.0.init_from={tmp_path / 'dpo'}", "-o", tmp_path / "again")  # fmt: skip
    assert code == 0, err


def _pairs_recipe(folder, tiny_llama, preferences, **train) -> str:
    recipe = folder / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": str(tiny_llama), "task": "preference", "base_dtype": "fp64",
        "data": {"train": str(preferences["train"]), "eval": str(preferences["eval"]),
                 "max_length": 64},
        "deltas": [{"kind": "lora", "r": 4}],
        "train": {"lr": 1e-2, "weight_decay": 0.0, "log_every": 1, **train},
    }))  # fmt: skip
    return str(recipe)


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_two_processes_killed_and_resumed_train_what_one_process_trains(
    tiny_llama, preferences, tmp_path
):
    """Two processes × 4 pairs a step, killed (-9) after step 5 of 8 and resumed, end with the
    delta and the logged rewards of one process × 8 pairs never stopped: under DDP the
    reference pass, the eval reference (each process computes a share, computed again on
    resume) and the rewards summed over processes change nothing but speed."""
    recipe = _pairs_recipe(tmp_path, tiny_llama, preferences, epochs=2, save_every=3)
    one = [sys.executable, "-m", "deltacli", "train", "--recipe", recipe, "train.batch_size=8"]
    done = run_offline([*one, "-o", "one"], tmp_path)
    assert done.returncode == 0, what_failed(done)
    script = tmp_path / "stopping.py"
    script.write_text(STOPPING)
    two = ["train", "--recipe", recipe, "train.batch_size=4", "-o", "two"]
    killed = run_offline([*launcher(), str(script), "kill", "5", *two], tmp_path)
    assert killed.returncode != 0
    resumed = run_offline([*launcher(), "-m", "deltacli", "train", "--resume", "two"], tmp_path)
    assert resumed.returncode == 0, what_failed(resumed)
    first, second = (load_file(tmp_path / name / WEIGHTS_FILE) for name in ("one", "two"))
    for key, tensor in first.items():
        torch.testing.assert_close(second[key], tensor, rtol=1e-9, atol=1e-12)
    logs = [
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    assert len(logs[0]) == len(logs[1])
    for a, b in zip(*logs, strict=True):
        for key in ("loss", "reward_accuracy", "reward_margin"):
            if key in a:
                # the logged loss is summed in float32 (the trainer's running total)
                close = 1e-6 if key == "loss" else 1e-9
                assert b[key] == pytest.approx(a[key], rel=close, abs=1e-12), key
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
