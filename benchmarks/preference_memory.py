"""Memory of preference tuning: LoRA DPO against LoRA SFT at the same batch and length, and
TRL's DPOTrainer holding an explicit reference model as the comparison row.

A DPO batch of 8 pairs passes 16 sequences through the model (chosen and rejected), so SFT
is measured at batch 8 and at batch 16 (the same sequences a pass).

SmolLM2-135M-Instruct (the `smollm2` embedded model), LoRA r=8 on q/v, the bundled SST-2
preference sample (its SFT twin: the same prompts with the chosen answer as chat messages),
batch 8, max length 128, `--steps` steps, the model read from one float32 copy. Every run
is its own process: its peak RSS (VmHWM) is its own. deltacli's reference is the same model
with the LoRA switched off; TRL's here is a second copy of the model, as `ref_model=` asks.

    python benchmarks/preference_memory.py
    python benchmarks/preference_memory.py --steps 8 --repeats 3
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

from rich.console import Console
from rich.table import Table

from measure import measured, write_results

RUNS = {
    "deltacli LoRA SFT, batch 8 (8 sequences a pass)": "sft",
    "deltacli LoRA SFT, batch 16 (16 sequences a pass)": "sft16",
    "deltacli LoRA DPO (reference: base, deltas off)": "dpo",
    "deltacli LoRA DPO (reference: precomputed)": "dpo-precomputed",
    "TRL DPOTrainer + PEFT LoRA, explicit ref_model": "trl",
}
BATCH, LENGTH = 8, 128


def write_model(folder: Path) -> None:
    """SmolLM2 as a plain float32 checkpoint: transformers' Trainer (under TRL) refuses a
    model loaded from GGUF, so every run reads this copy."""
    from deltacli.models.loading import load_model, load_tokenizer

    model = load_model("smollm2", "causal-lm", None)
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.save_pretrained(folder / "smollm2")
    load_tokenizer("smollm2").save_pretrained(folder / "smollm2")


def write_data(folder: Path, pairs: int) -> dict[str, Path]:
    """The first `pairs` training pairs and 16 eval pairs, and the same as SFT chats."""
    from deltacli.tasks.tables import bundled_samples

    files = {}
    for split, count in (("train", pairs), ("validation", 16)):
        lines = bundled_samples()[f"sst2_pref:{split}"].read_text().splitlines()[:count]
        records = [json.loads(line) for line in lines]
        files[f"pairs-{split}"] = folder / f"pairs-{split}.jsonl"
        files[f"pairs-{split}"].write_text("\n".join(lines) + "\n")
        chats = [{"messages": r["prompt"] + r["chosen"]} for r in records]
        files[f"chat-{split}"] = folder / f"chat-{split}.jsonl"
        files[f"chat-{split}"].write_text("".join(json.dumps(c) + "\n" for c in chats))
    return files


def run_deltacli(kind: str, folder: Path, steps: int) -> dict:
    from deltacli.recipe import parse_recipe
    from deltacli.training.logs import MetricsLog
    from deltacli.training.trainer import Trainer

    pairs = not kind.startswith("sft")
    prefix = "pairs" if pairs else "chat"
    batch = 2 * BATCH if kind == "sft16" else BATCH
    train = {"max_steps": steps, "batch_size": batch, "eval_batch_size": batch, "lr": 1e-3}
    if pairs:
        train["reference"] = "precomputed" if kind == "dpo-precomputed" else "base"
    recipe = parse_recipe(
        {
            "model": str(folder / "smollm2"),
            "task": "preference" if pairs else "causal-lm",
            "data": {
                "train": str(folder / f"{prefix}-train.jsonl"),
                "eval": str(folder / f"{prefix}-validation.jsonl"),
                "max_length": LENGTH,
            },
            "deltas": [{"kind": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}],
            "train": train,
        }
    )
    trainer = Trainer(recipe, console=None)
    started = time.perf_counter()
    summary = trainer.fit(MetricsLog(None))
    return {"seconds": time.perf_counter() - started, "train_seconds": summary["train"]["seconds"]}


def run_trl(folder: Path, steps: int) -> dict:
    import trl
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "smollm2")
    policy = AutoModelForCausalLM.from_pretrained(folder / "smollm2", dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(folder / "smollm2", dtype="float32")
    dataset = load_dataset("json", data_files=str(folder / "pairs-train.jsonl"), split="train")
    args = trl.DPOConfig(
        output_dir=str(folder / "trl"), max_steps=steps, per_device_train_batch_size=BATCH,
        max_length=LENGTH, beta=0.1, learning_rate=1e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    trainer = trl.DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=dataset,
        processing_class=tokenizer, peft_config=lora,
    )  # fmt: skip
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "train_seconds": output.metrics["train_runtime"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=64, help="training pairs")
    parser.add_argument("--run", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # one measured run, in its own process
        kind, folder = args.run
        result = run_trl(Path(folder), args.steps) if kind == "trl" else run_deltacli(
            kind, Path(folder), args.steps
        )  # fmt: skip
        print(json.dumps(result))
        return
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_model(folder)
        write_data(folder, args.pairs)
        for label, kind in RUNS.items():
            for repeat in range(args.repeats):
                command = [sys.executable, __file__, "--steps", str(args.steps), "--run"]
                _, rss, out = measured([*command, kind, str(folder)])
                result = json.loads(out.strip().splitlines()[-1])
                rows.append({"run": label, "repeat": repeat, "peak_rss_mb": round(rss, 1),
                             "train_seconds": round(result["train_seconds"], 2)})  # fmt: skip
                console.print(rows[-1])
    sft = [r["peak_rss_mb"] for r in rows if r["run"] == next(iter(RUNS))]
    table = Table(
        title=f"Preference tuning memory · SmolLM2-135M · LoRA r=8 q/v · batch {BATCH} · "
        f"length {LENGTH} · {args.steps} steps · {args.repeats} runs each"
    )
    for column in ("run", "peak RSS (min–max)", "× deltacli SFT", "s/step"):
        table.add_column(column, justify="right")
    for label in RUNS:
        peaks = [r["peak_rss_mb"] for r in rows if r["run"] == label]
        seconds = [r["train_seconds"] / args.steps for r in rows if r["run"] == label]
        table.add_row(
            label,
            f"{min(peaks):,.0f}–{max(peaks):,.0f} MB",
            f"{max(peaks) / min(sft):.2f}×",
            f"{min(seconds):.1f}–{max(seconds):.1f}",
        )
    console.print(table)
    path = write_results(
        "preference-memory",
        "peak RSS of LoRA DPO vs LoRA SFT (deltacli) and TRL DPOTrainer with an explicit "
        "reference model, SmolLM2-135M-Instruct, each run its own process",
        rows,
        flags={
            "steps": args.steps,
            "repeats": args.repeats,
            "pairs": args.pairs,
            "batch": BATCH,
            "max_length": LENGTH,
        },
    )
    console.print(f"raw results: {path}")


if __name__ == "__main__":
    main()
