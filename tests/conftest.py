"""Fixtures: tiny models and tiny data saved to disk once per session, and the CLI in-process.
What they are built from lives in helpers.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI's consoles are made when it is imported, and the tests read what they print: wide
# enough that long temporary paths do not wrap (pytest-xdist's workers start with COLUMNS=80).
os.environ["COLUMNS"] = "200"
# Triton kernels (liger-kernel's, `train.loss_kernel=liger`) run on the CPU through Triton's
# interpreter: read when a kernel is defined, so before anything imports them.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from transformers import BertTokenizer

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # The suite runs in several workers (pyproject's `-n`): each takes its share of the cores,
    # as two torch processes that each spin every core's threads run several times slower.
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from deltacli.cli import main
from helpers import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    SPECIAL,
    instruction_rows,
    pair_rows,
    preference_rows,
    sentiment_rows,
    tiny_model,
    word_tokenizer,
    write_csv,
    write_jsonl,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests (each starts processes, or trains a real model) first: the two workers
    then end on short tests, not one waiting for the other's long one."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden size 32, word-level vocabulary) saved as a HF directory.

    Like a real checkpoint, its body has learned something: a few full fine-tuning steps on
    sentiment rows of another seed teach it the words' polarity. Its head is then reset, so
    every delta method starts from useful features and a fresh classifier.
    """
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = {word: i for i, word in enumerate(SPECIAL + POSITIVE + NEGATIVE + FILLER)}
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.save_pretrained(folder)
    model = tiny_model("bert", vocab_size=len(vocab)).train()
    rows = sentiment_rows(256, seed=0)
    inputs = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([int(label == "pos") for _, label in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.classifier.reset_parameters()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory, tiny_bert) -> Path:
    """The tiny BERT with dropout off: runs that split batches differently compare exactly."""
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(folder)
    BertTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


def _saved(folder: Path, model_type: str, task_name: str, add_eos: bool, **extra) -> Path:
    """A tiny model with the word-level tokenizer, saved as a HF directory."""
    tokenizer = word_tokenizer(add_eos=add_eos)
    tokenizer.save_pretrained(folder)
    tiny_model(model_type, task_name, vocab_size=len(tokenizer), **extra).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama causal LM (grouped-query attention) with a word-level tokenizer."""
    return _saved(
        tmp_path_factory.mktemp("tiny-llama"), "llama", "causal-lm", False,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=2, eos_token_id=3,
        max_position_embeddings=256,
    )  # fmt: skip


@pytest.fixture(scope="session")
def biased_llama(tmp_path_factory) -> Path:
    """The tiny Llama with biases in attention and MLP (Llama has none), for BitFit."""
    return _saved(
        tmp_path_factory.mktemp("biased-llama"), "llama", "causal-lm", False,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=2, eos_token_id=3,
        max_position_embeddings=256, attention_bias=True, mlp_bias=True,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A 2-layer T5 with the same word-level tokenizer (ending sequences with </s>)."""
    return _saved(tmp_path_factory.mktemp("tiny-t5"), "t5", "seq2seq", True, eos_token_id=3)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 causal LM with the word-level tokenizer."""
    return _saved(
        tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", "causal-lm", False,
        n_positions=128, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory) -> Path:
    """A 2-layer BART with the word-level tokenizer (ending sequences with </s>)."""
    return _saved(
        tmp_path_factory.mktemp("tiny-bart"), "bart", "seq2seq", True,
        max_position_embeddings=128, bos_token_id=2, eos_token_id=3, decoder_start_token_id=3,
    )  # fmt: skip


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory) -> dict[str, Path]:
    """train.csv (128 rows) and dev.csv (64 rows), string labels pos/neg."""
    folder = tmp_path_factory.mktemp("sentiment")
    return {
        "train": write_csv(folder / "train.csv", sentiment_rows(128, seed=1)),
        "eval": write_csv(folder / "dev.csv", sentiment_rows(64, seed=2)),
    }


@pytest.fixture(scope="session")
def instructions(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("instructions")
    return {
        "train": write_jsonl(folder / "train.jsonl", instruction_rows(96, seed=1)),
        "eval": write_jsonl(folder / "dev.jsonl", instruction_rows(32, seed=2)),
    }


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pairs")
    return {
        "train": write_jsonl(folder / "train.jsonl", pair_rows(96, 1)),
        "eval": write_jsonl(folder / "dev.jsonl", pair_rows(32, 2)),
    }


@pytest.fixture(scope="session")
def preferences(tmp_path_factory) -> dict[str, Path]:
    """Preference pairs as strings: 64 to train on, 32 to evaluate."""
    folder = tmp_path_factory.mktemp("preferences")
    return {
        "train": write_jsonl(folder / "train.jsonl", preference_rows(64, seed=1)),
        "eval": write_jsonl(folder / "dev.jsonl", preference_rows(32, seed=2)),
    }


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `deltacli ARGS` in this process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["deltacli", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
