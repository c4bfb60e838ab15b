"""What the tests build: tiny models of every architecture, tiny data, recipes, batches.

One factory makes every tiny model (`tiny_config` / `tiny_model`), one builder every recipe
(`tiny_recipe`); fixtures that save them to disk live in conftest.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from deltacli.recipe import Recipe, parse_recipe
from deltacli.tasks.registry import DEFAULT, task

POSITIVE = ["good", "great", "fine", "nice", "happy", "superb"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "dull"]
FILLER = ["the", "movie", "was", "a", "film", "plot", "really", "very", "this", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LM_WORDS = [
    "###", "Instruction", "Input", "Response", ":", "the", "movie", "was", "good", "bad",
    "great", "awful", "film", "plot", "really", "very", "this", "and", "is", "positive",
    "negative", "review", "sentiment", "of", "what", "say", "hello", "hi", "there", "yes", "no",
    "a", "an", "it", "<|user|>", "<|assistant|>", "<|system|>",
]  # fmt: skip

_ENCODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
_DECODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
)
# Two layers of every architecture in deltacli's table, small enough to build in milliseconds.
SIZES: dict[str, dict] = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "xlm-roberta": _ENCODER,
    "electra": {**_ENCODER, "embedding_size": 32},
    "deberta-v2": _ENCODER,
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "phi3": _DECODER,
    "t5": dict(d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64, decoder_start_token_id=0),
    "bart": dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    ),
}


def tiny_config(model_type: str, **extra) -> PretrainedConfig:
    """A two-layer config of `model_type` (any architecture in `SIZES`); `extra` overrides."""
    fields = {"vocab_size": 64, "pad_token_id": 0, **SIZES[model_type], **extra}
    if SIZES[model_type] is _DECODER:  # Gemma and Qwen3 default to a head_dim of their own
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str = "bert", task_name: str = DEFAULT, **extra) -> PreTrainedModel:
    """A randomly initialised (seed 0) tiny model of `model_type` for `task_name`, in eval mode."""
    torch.manual_seed(0)
    return task(task_name).model_class.from_config(tiny_config(model_type, **extra)).eval()


def batch(lengths=(7, 4, 5), seed: int = 1, low: int = 5, high: int = 60) -> dict:
    """Right-padded random ids (pad id 0) with their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(low, high, (length,), generator=generator)
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def logits64(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The model's logits computed in float64. Two computations of one function (a merged
    model and base + delta live, deltacli and PEFT) then differ by the float32 rounding of
    their weights alone, not by the order a CPU's threads add in, so one bound fits every
    machine."""
    with torch.no_grad():
        return model.double()(**inputs).logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to rounding: at most `rel` of the values' own scale apart (1e-5: a hundred
    float32 roundings; a wrong formula misses by orders of magnitude more)."""
    actual, expected = actual.detach(), expected.detach()
    scale = max(1.0, float(expected.abs().max()))
    difference = float((actual.double() - expected.double()).abs().max())
    assert difference <= rel * scale, f"{difference:.3g} apart (bound {rel:g} x {scale:.3g})"


def randomize_trainable(model: torch.nn.Module, seed: int, std: float = 1.0) -> None:
    """Draw every trainable tensor at random, so that no comparison passes by accident."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(std=std)


def perturbed(recipe: Recipe, seed: int = 4, std: float = 0.5):
    """The recipe's model with its deltas attached and every trainable tensor random."""
    from deltacli.build import prepare_model

    model, deltas = prepare_model(recipe)
    randomize_trainable(model, seed, std)
    return model.eval(), deltas


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


def instruction_rows(count: int, seed: int) -> list[dict]:
    """Alpaca records whose answer is the review's polarity word."""
    return [
        {
            "instruction": "what is the sentiment of this review",
            "input": text,
            "output": "positive" if label == "pos" else "negative",
        }
        for text, label in sentiment_rows(count, seed)
    ]


def pair_rows(count: int, seed: int) -> list[dict]:
    """seq2seq rows: the source is a review, the target its polarity word."""
    return [
        {"source": text, "target": "positive" if label == "pos" else "negative"}
        for text, label in sentiment_rows(count, seed)
    ]


def preference_rows(count: int, seed: int, conversational: bool = False) -> list[dict]:
    """Preference pairs: a review, its right polarity word chosen, the other rejected (as
    strings, or as TRL's conversational message lists)."""
    rows = []
    for text, label in sentiment_rows(count, seed):
        right, wrong = ("positive", "negative") if label == "pos" else ("negative", "positive")
        prompt = f"what is the sentiment of this review : {text} "
        if conversational:
            rows.append({
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": right}],
                "rejected": [{"role": "assistant", "content": wrong}],
            })  # fmt: skip
        else:
            rows.append({"prompt": prompt, "chosen": right, "rejected": wrong})
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def word_tokenizer(add_eos: bool = False):
    """A fast word-level tokenizer (offsets included) over `LM_WORDS`."""
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


# The columns of the tiny data sets, by task.
_COLUMNS = {
    "sequence-classification": {"text": "text"},
    "causal-lm": {"max_length": 64},
    "seq2seq": {"text": "source", "target": "target", "max_length": 64},
    "preference": {"max_length": 64},
}


# Recipe keys at the top level (the rest of `tiny_recipe`'s keywords are `train.*`).
_TOP = ("base_dtype", "quantize", "head")


def tiny_recipe(
    model: Path, data: dict[str, Path], *deltas: dict, task: str = DEFAULT, **settings
) -> Recipe:
    """A recipe for a tiny model and tiny data: fast steps and a high learning rate;
    keywords set `train.*` keys, or `base_dtype`, `quantize` and `head`."""
    top = {key: settings.pop(key) for key in _TOP if key in settings}
    return parse_recipe(
        {
            "name": "tiny",
            "model": str(model),
            "task": task,
            "data": {"train": str(data["train"]), "eval": str(data["eval"]), **_COLUMNS[task]},
            "deltas": list(deltas),
            "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "log_every": 1, **settings},
            **top,
        }
    )


ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


def free_port() -> int:
    """A port for a launch's rendezvous: one launch may still be releasing the default port
    when the next starts (and two test workers launch at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher(processes: int = 2) -> list[str]:
    """`accelerate launch` for CPU processes (gloo) on a free port."""
    return [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip


def run_offline(
    command: list[str], cwd: Path, timeout: int = 600, **env: str
) -> subprocess.CompletedProcess:
    """A deltacli command in its own process, offline and on one thread (two processes on two
    cores, each with every core's threads, run several times slower); `env`: more variables."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def what_failed(done: subprocess.CompletedProcess) -> str:
    """A failed command's stderr for an assertion message: from its first traceback or error
    line, and its end. Under a launcher the launcher's own traceback comes last and would hide
    the process's (CI once showed only `ChildFailedError`)."""
    lines = done.stderr.splitlines()
    first = next(
        (i for i, line in enumerate(lines) if line.startswith(("Traceback", "error", "E "))),
        max(len(lines) - 30, 0),
    )
    return "\n".join(lines[first : first + 40]) + "\n…\n" + done.stderr[-1500:]


# Runs the CLI, first making the process stop itself right after the training log records
# step K: `kill` sends SIGKILL (nothing can run after it), `int` SIGINT (Ctrl-C).
STOPPING = """
import os, signal, sys
from deltacli.training import logs
from deltacli.cli import main

how, at = sys.argv.pop(1), int(sys.argv.pop(1))
write = logs.MetricsLog.write

def write_then_stop(self, **record):
    write(self, **record)
    if record.get("step") == at and "loss" in record:
        os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGINT)

logs.MetricsLog.write = write_then_stop
sys.exit(main())
"""
