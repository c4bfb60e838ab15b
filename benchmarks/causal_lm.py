"""Causal-LM training speed and memory per method: deltacli against PEFT + a plain loop.

A 4-layer, hidden-256 Llama (random weights, the embedded MiniLM's WordPiece vocabulary) is
instruction-tuned on the bundled SST-2 chat sample (plain chat template, max length 128,
batch 8, 30 steps). Both sides see the same batches; each run is its own process, so its peak
RSS is its own. Methods PEFT lacks run on the deltacli side only.

    python benchmarks/causal_lm.py
    python benchmarks/causal_lm.py --steps 60 --methods lora prefix
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from rich.table import Table

from measure import measured

METHODS = {
    "lora": {"kind": "lora", "r": 8, "targets": ["q_proj", "v_proj"]},
    "ia3": {"kind": "ia3"},
    "prefix": {"kind": "prefix", "length": 16},
    "prompt": {"kind": "prompt", "length": 16},
    "parallel adapter": {"kind": "adapter", "placement": "parallel", "r": 64, "scale": 4.0},
    "sift 0.01": {"kind": "sift", "density": 0.01},
    "full": {"kind": "full"},
}


def build_model(folder: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deltacli.models.loading import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("default"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=512,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)


def recipe(model: Path, method: str, steps: int):
    from deltacli.recipe import parse_recipe

    return parse_recipe(
        {
            "model": str(model),
            "task": "causal-lm",
            "data": {
                "train": "sst2_chat:train",
                "eval": "sst2_chat:validation",
                "format": "chat",
                "max_length": 128,
            },
            "deltas": [METHODS[method]],
            "train": {
                "max_steps": steps,
                "batch_size": 8,
                "eval_batch_size": 8,  # a 30k vocabulary makes big logits
                "lr": 1e-3 if method == "full" else 5e-3,
            },
        }
    )


def run_deltacli(model: Path, method: str, steps: int) -> dict:
    from deltacli.training.logs import MetricsLog
    from deltacli.training.trainer import Trainer

    trainer = Trainer(recipe(model, method, steps), console=None)
    metrics = trainer.fit(MetricsLog(None))
    rate = metrics["train"]["samples_per_second"] * _mean_tokens(trainer.data.train)
    return {"tokens_per_second": rate, "loss": metrics["eval"]["loss"]}


def run_reference(model: Path, method: str, steps: int) -> dict:
    """PEFT (or plain PyTorch for full fine-tuning) and a plain loop over the same batches."""
    from peft import (
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        TaskType,
        get_peft_model,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltacli.tasks.tables import batches

    rec = recipe(model, method, steps)
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = rec.task_entry.load_data(rec.data, tokenizer, rec.train.seed)
    torch.manual_seed(rec.train.seed)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    net.config.use_cache = False
    configs = {
        "lora": lambda: LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=8, target_modules=["q_proj", "v_proj"]
        ),
        "ia3": lambda: IA3Config(task_type=TaskType.CAUSAL_LM),
        "prefix": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16),
        "prompt": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16),
    }
    if method in configs:
        net = get_peft_model(net, configs[method]())
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rec.train.lr)
    collate = rec.task_entry.collate(tokenizer, data.train)
    loader = batches(data.train, collate, rec.train.batch_size, True, rec.train.seed)
    samples, seconds, step = 0, 0.0, 0
    net.train()
    while step < steps:
        for batch in loader:
            started = time.perf_counter()
            net(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            seconds += time.perf_counter() - started
            samples += len(batch["input_ids"])
            step += 1
            if step == steps:
                break
    return {"tokens_per_second": samples / seconds * _mean_tokens(data.train)}


def _mean_tokens(table) -> float:
    """Real tokens per training example: tokens/s is samples/s times this, on both sides."""
    return sum(map(sum, table["attention_mask"])) / len(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--run", nargs=3, metavar=("SIDE", "METHOD", "MODEL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.run:  # one measured run, in its own process
        side, method, model = args.run
        runner = run_deltacli if side == "deltacli" else run_reference
        print(json.dumps(runner(Path(model), method, args.steps)))
        return
    console = Console()
    table = Table(
        title=f"causal-LM training · 4-layer hidden-256 Llama · batch 8 · {args.steps} steps"
    )
    for column in (
        "method",
        "deltacli tokens/s",
        "reference tokens/s",
        "speed ratio",
        "deltacli RSS",
        "reference RSS",
        "eval loss",
    ):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "llama"
        build_model(model)
        for method in args.methods:
            command = [sys.executable, __file__, "--steps", str(args.steps), "--run"]
            _, ours_rss, ours = measured([*command, "deltacli", method, str(model)])
            ours = json.loads(ours.strip().splitlines()[-1])
            has_reference = method in ("lora", "ia3", "prefix", "prompt", "full")
            if has_reference:
                _, theirs_rss, theirs = measured([*command, "reference", method, str(model)])
                theirs = json.loads(theirs.strip().splitlines()[-1])
            ratio = (
                ours["tokens_per_second"] / theirs["tokens_per_second"] if has_reference else None
            )
            row = (
                method,
                f"{ours['tokens_per_second']:,.0f}",
                f"{theirs['tokens_per_second']:,.0f}" if has_reference else "—",
                f"{ratio:.2f}×" if ratio else "—",
                f"{ours_rss:,.0f} MB",
                f"{theirs_rss:,.0f} MB" if has_reference else "—",
                f"{ours['loss']:.3f}",
            )
            console.print(*row)
            table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
