"""Shared fixtures: tiny models built in code and tiny data written to disk, all offline."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from deltacli.cli import main
from deltacli.recipe import Recipe, parse_recipe

POSITIVE = ["good", "great", "fine", "nice", "happy", "superb"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "dull"]
FILLER = ["the", "movie", "was", "a", "film", "plot", "really", "very", "this", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

TINY_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)


def sentiment_rows(count: int, seed: int) -> list[tuple[str, str]]:
    """Short sentences whose label is the polarity of the one sentiment word in them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(FILLER, 4)
        words.insert(rng.randrange(5), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def randomize_trainable(model: torch.nn.Module, seed: int, std: float = 1.0) -> None:
    """Draw every trainable tensor at random, so that no comparison passes by accident."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(std=std)


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return path


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
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(vocab), **TINY_BERT))
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
def sentiment(tmp_path_factory) -> dict[str, Path]:
    """train.csv (128 rows) and dev.csv (64 rows), string labels pos/neg."""
    folder = tmp_path_factory.mktemp("sentiment")
    return {
        "train": write_csv(folder / "train.csv", sentiment_rows(128, seed=1)),
        "eval": write_csv(folder / "dev.csv", sentiment_rows(64, seed=2)),
    }


def tiny_recipe(model: Path, data: dict[str, Path], *deltas: dict, **train) -> Recipe:
    """A recipe for the tiny model and data: fast steps and a high learning rate."""
    return parse_recipe(
        {
            "name": "tiny",
            "model": str(model),
            "data": {"train": str(data["train"]), "eval": str(data["eval"]), "text": "text"},
            "deltas": list(deltas),
            "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "log_every": 1, **train},
        }
    )


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `deltacli ARGS` in this process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["deltacli", *map(str, args)])
        monkeypatch.setenv("COLUMNS", "200")
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def tiny_config(model_type: str, **extra):
    """A two-layer config of `model_type` small enough to build in milliseconds."""
    from transformers import AutoConfig

    sizes = {
        "bert": TINY_BERT,
        "roberta": TINY_BERT,
        "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
        "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
        "llama": dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
        ),
    }[model_type]
    return AutoConfig.for_model(model_type, vocab_size=64, pad_token_id=0, **{**sizes, **extra})


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


LM_WORDS = [
    "###",
    "Instruction",
    "Input",
    "Response",
    ":",
    "the",
    "movie",
    "was",
    "good",
    "bad",
    "great",
    "awful",
    "film",
    "plot",
    "really",
    "very",
    "this",
    "and",
    "is",
    "positive",
    "negative",
    "review",
    "sentiment",
    "of",
    "what",
    "say",
    "hello",
    "hi",
    "there",
    "yes",
    "no",
    "a",
    "an",
    "it",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
]


def word_tokenizer(add_eos: bool = False):
    """A fast word-level tokenizer (offsets included) over a small vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {word: i for i, word in enumerate(special + LM_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    single = "$A </s>" if add_eos else "<s> $A"
    core.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama causal LM with a word-level tokenizer, saved as a HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A 2-layer T5 with the same word-level tokenizer (ending sequences with </s>)."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = word_tokenizer(add_eos=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64,
        pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
    )  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def instruction_rows(count: int, seed: int) -> list[dict]:
    """Alpaca records whose answer is the review's polarity word."""
    rows = []
    for text, label in sentiment_rows(count, seed):
        answer = "positive" if label == "pos" else "negative"
        rows.append(
            {"instruction": "what is the sentiment of this review", "input": text, "output": answer}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def instructions(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("instructions")
    return {
        "train": write_jsonl(folder / "train.jsonl", instruction_rows(96, seed=1)),
        "eval": write_jsonl(folder / "dev.jsonl", instruction_rows(32, seed=2)),
    }


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> dict[str, Path]:
    """seq2seq rows: the source is a review, the target its polarity word."""
    folder = tmp_path_factory.mktemp("pairs")

    def make(count, seed):
        return [
            {"source": text, "target": "positive" if label == "pos" else "negative"}
            for text, label in sentiment_rows(count, seed)
        ]

    return {
        "train": write_jsonl(folder / "train.jsonl", make(96, 1)),
        "eval": write_jsonl(folder / "dev.jsonl", make(32, 2)),
    }


def lm_recipe(model: Path, data: dict[str, Path], task: str, *deltas: dict, **train) -> Recipe:
    fields = {"text": "source", "target": "target"} if task == "seq2seq" else {}
    return parse_recipe(
        {
            "name": "tiny-lm",
            "model": str(model),
            "task": task,
            "data": {
                "train": str(data["train"]),
                "eval": str(data["eval"]),
                "max_length": 64,
                **fields,
            },
            "deltas": list(deltas),
            "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "log_every": 1, **train},
        }
    )
