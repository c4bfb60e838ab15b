"""deltacli's shipped recipes against a plain PyTorch loop (+ PEFT where PEFT has the method).

Both sides train the embedded all-MiniLM-L6-v2 on the same SST-2 rows with the same
hyper-parameters (the recipe's: AdamW, weight decay on matrices, linear warmup/decay, batch 32,
dynamic padding), then score the 872-row dev set. Prints one side-by-side table; speed is
reported as the ratio deltacli / reference, measured in the same run.

    python benchmarks/train_methods.py           # the bundled 2,000-row sample, 3 epochs
    python benchmarks/train_methods.py --methods lora full \
        --train ../shared/data/sst2/train.tsv --rows 4000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LNTuningConfig, LoraConfig, TaskType, get_peft_model
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_linear_schedule_with_warmup,
)

from deltacli.models.loading import resolve
from deltacli.recipe import Recipe, load_recipe, recipe_file
from deltacli.tasks.tables import load_table
from deltacli.training.runs import train

console = Console()


def reference_model(recipe: Recipe) -> torch.nn.Module:
    """The same method, built the way a user of PEFT or plain PyTorch would."""
    model = AutoModelForSequenceClassification.from_pretrained(resolve("default"), num_labels=2)
    kind = recipe.deltas[0].kind
    if kind == "lora":
        delta = recipe.deltas[0]
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=delta.r, lora_alpha=delta.alpha)
        return get_peft_model(model, config)
    if kind == "layernorm":
        return get_peft_model(
            model, LNTuningConfig(task_type=TaskType.SEQ_CLS, target_modules=["LayerNorm"])
        )
    for name, param in model.named_parameters():
        param.requires_grad = (
            kind == "full" or name.endswith("bias") or name.startswith("classifier")
        )
    return model


def reference_run(recipe: Recipe, train_rows, dev_rows) -> dict:
    """A plain loop: the baseline every deltacli figure is compared with."""
    torch.manual_seed(recipe.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve("default"))
    model = reference_model(recipe)

    def encode(rows):
        encoded = tokenizer(rows["sentence"], truncation=True, max_length=recipe.data.max_length)
        return [
            {**{k: v[i] for k, v in encoded.items()}, "labels": rows["label"][i]}
            for i in range(len(rows["label"]))
        ]

    collate = DataCollatorWithPadding(tokenizer)
    generator = torch.Generator().manual_seed(recipe.train.seed)
    train_batches = DataLoader(
        encode(train_rows),
        batch_size=recipe.train.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=generator,
    )
    dev_batches = DataLoader(
        encode(dev_rows), batch_size=recipe.train.eval_batch_size, collate_fn=collate
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {
                "params": [p for p in params if p.ndim >= 2],
                "weight_decay": recipe.train.weight_decay,
            },
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=recipe.train.lr,
    )
    total = int(recipe.train.epochs * len(train_batches))
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(recipe.train.warmup_ratio * total), total
    )
    started, samples, best = time.perf_counter(), 0, 0.0
    train_seconds = 0.0
    for _ in range(int(recipe.train.epochs)):
        model.train()
        tick = time.perf_counter()
        for batch in train_batches:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            samples += len(batch["labels"])
        train_seconds += time.perf_counter() - tick
        model.eval()
        correct = 0
        with torch.no_grad():
            for batch in dev_batches:
                correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
        best = max(best, correct / len(dev_rows["label"]))
    return {
        "accuracy": best,
        "samples_per_second": samples / train_seconds,
        "wall": time.perf_counter() - started,
        "trainable": sum(p.numel() for p in params),
    }


def deltacli_run(recipe: Recipe) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        metrics = train(recipe, Path(scratch) / "delta").metrics
    return {
        "accuracy": metrics["eval"]["accuracy"],
        "samples_per_second": metrics["train"]["samples_per_second"],
        "wall": time.perf_counter() - started,
        "trainable": metrics["params"]["trainable"],
        "percent": metrics["params"]["trainable_percent"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "bitfit", "layernorm", "full"])
    parser.add_argument("--train", default="sst2:train", help="training rows (file or sample)")
    parser.add_argument("--rows", type=int, default=None, help="use the first N training rows")
    parser.add_argument("--epochs", type=float, default=3)
    args = parser.parse_args()

    overrides = [f"data.train={args.train}", f"train.epochs={args.epochs}"]
    if args.rows:
        overrides.append(f"data.max_train_rows={args.rows}")
    table = Table(
        title=f"deltacli vs PEFT / plain loop · MiniLM · SST-2 dev · {args.epochs:g} epochs"
    )
    for column in (
        "method",
        "trainable",
        "dev acc (deltacli)",
        "dev acc (reference)",
        "samples/s ratio",
        "deltacli wall",
    ):
        table.add_column(column, justify="right")
    for method in args.methods:
        recipe = load_recipe(recipe_file(method, None), overrides)
        rows = load_table(args.train)
        if args.rows:
            rows = rows.select(range(min(args.rows, len(rows))))
        ours = deltacli_run(recipe)
        theirs = reference_run(recipe, rows[:], load_table("sst2:validation")[:])
        console.print(method, ours, theirs)
        assert ours["trainable"] == theirs["trainable"], "the two sides train different parameters"
        table.add_row(
            method,
            f"{ours['trainable']:,} ({ours['percent']:.3f}%)",
            f"{100 * ours['accuracy']:.1f}%",
            f"{100 * theirs['accuracy']:.1f}%",
            f"{ours['samples_per_second'] / theirs['samples_per_second']:.2f}× "
            f"({ours['samples_per_second']:.0f} vs {theirs['samples_per_second']:.0f})",
            f"{ours['wall']:.0f} s",
        )
    console.print(table)


if __name__ == "__main__":
    main()
