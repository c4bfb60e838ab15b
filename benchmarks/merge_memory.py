"""`deltacli merge` against PEFT's merge_and_unload and a plain file copy, and `inspect` timing.

Builds a multi-shard Llama (random bf16 weights, ~2.2 GB in 500 MB shards) and a LoRA
adapter for it in PEFT's format, then measures in one run, each in its own process:
`cp -r` of the base, `deltacli merge`, and PEFT's load + `merge_and_unload` +
`save_pretrained`: wall time and peak RSS. Then times `deltacli inspect` on 7B and 70B configs.

    python benchmarks/merge_memory.py                   # ~2.2 GB base under /tmp
    python benchmarks/merge_memory.py --layers 8 --workdir /tmp/small
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForSequenceClassification

from measure import measured, write_results

console = Console()
DELTACLI = str(Path(sys.executable).parent / "deltacli")

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
base, adapter, out = sys.argv[1:]
model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size="500MB")
"""

# The fixed cost of any deltacli merge of a Llama: the interpreter and the imports.
STARTUP = "import deltacli.commands.merge, transformers.models.llama.modeling_llama"
# The same merge with that cost paid before the clock starts.
MERGE_WORK = (
    STARTUP
    + """
import sys, time
from pathlib import Path
started = time.perf_counter()
deltacli.commands.merge.merge(sys.argv[1], [Path(sys.argv[2])], Path(sys.argv[3]))
print("seconds", time.perf_counter() - started)
"""
)

CONFIGS = {
    "7B": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "70B": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
}


def build_base(folder: Path, layers: int, hidden: int) -> None:
    """A Llama sequence classifier with random bf16 weights, saved in 500 MB shards."""
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        pad_token_id=0,
        num_labels=2,
    )
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForSequenceClassification(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size="500MB")


def build_adapter(
    folder: Path, base: Path, layers: int, hidden: int, r: int = 16, seed: int = 0
) -> None:
    """A LoRA adapter on q, k, v, o in PEFT's layout, random so that every update counts."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, r, generator=generator) * 0.01
    tensors["base_model.model.score.weight"] = torch.randn(2, hidden, generator=generator) * 0.02
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "modules_to_save": ["score"],
    }
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config))


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/deltacli-merge-bench"))
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--keep", action="store_true", help="keep the built base and adapter")
    args = parser.parse_args()

    base, adapter = args.workdir / "base", args.workdir / "adapter"
    others = [args.workdir / "adapter2", args.workdir / "adapter3"]
    if not base.exists():
        console.print(f"building a {args.layers}-layer, hidden-{args.hidden} Llama in bf16 ...")
        build_base(base, args.layers, args.hidden)
        for seed, folder in enumerate([adapter, *others]):
            build_adapter(folder, base, args.layers, args.hidden, seed=seed)
    shards = sorted(base.glob("*.safetensors"))
    largest = max(f.stat().st_size for f in shards) / 2**20
    delta = size_mb(adapter)
    console.print(
        f"base {size_mb(base):.0f} MB in {len(shards)} shards "
        f"(largest {largest:.0f} MB), delta {delta:.0f} MB"
    )
    subprocess.run(
        ["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True
    )  # warm the page cache

    runs = {
        "cp -r (reference)": ["cp", "-r", str(base), str(args.workdir / "copy")],
        "start-up only (python + imports)": [sys.executable, "-c", STARTUP],
        "deltacli merge": [
            DELTACLI,
            "merge",
            str(base),
            str(adapter),
            str(args.workdir / "deltacli"),
        ],
        "deltacli merge, work after start-up": [
            sys.executable,
            "-c",
            MERGE_WORK,
            str(base),
            str(adapter),
            str(args.workdir / "deltacli"),
        ],
        "deltacli merge --method ties --density 0.5, 3 LoRAs": [
            DELTACLI,
            "merge",
            str(base),
            str(adapter),
            *map(str, others),
            str(args.workdir / "deltacli"),
            "--method",
            "ties",
            "--density",
            "0.5",
        ],
        "PEFT merge_and_unload + save": [
            sys.executable,
            "-c",
            PEFT_MERGE,
            str(base),
            str(adapter),
            str(args.workdir / "peft"),
        ],
    }
    results = {}
    for name, command in runs.items():
        for out in ("copy", "deltacli", "peft"):
            shutil.rmtree(args.workdir / out, ignore_errors=True)
        results[name] = measured(command)[:2]
        console.print(name, results[name])
    copy_wall = results["cp -r (reference)"][0]
    table = Table(
        title=f"merge of a {size_mb(base) / 1024:.1f} GB bf16 Llama + {delta:.0f} MB LoRA, one run"
    )
    for column in ("run", "wall", "wall / cp", "peak RSS", "RSS / (largest shard + delta)"):
        table.add_column(column, justify="right")
    rows = []
    for name, (wall, rss) in results.items():
        deltas = 3 if "3 LoRAs" in name else 1
        ratio = rss / (largest + deltas * delta)
        rows.append(
            {"run": name, "wall_seconds": round(wall, 2), "peak_rss_mb": round(rss, 1),
             "rss_over_largest_shard_plus_deltas": round(ratio, 3)}
        )  # fmt: skip
        table.add_row(
            name,
            f"{wall:.1f} s",
            f"{wall / copy_wall:.2f}×",
            f"{rss:,.0f} MB",
            f"{rss / (largest + deltas * delta):.2f}",
        )
    console.print(table)
    path = write_results(
        "merge-memory",
        f"merge of a {args.layers}-layer hidden-{args.hidden} bf16 Llama "
        f"({size_mb(base):.0f} MB, largest shard {largest:.0f} MB) with {delta:.0f} MB LoRAs",
        rows,
        flags={"layers": args.layers, "hidden": args.hidden},
    )
    console.print(f"raw results: {path}")

    inspect = Table(
        title="deltacli inspect --method lora on a bare config (whole command, start-up included)"
    )
    for column in ("config", "wall", "parameters"):
        inspect.add_column(column, justify="right")
    for label, sizes in CONFIGS.items():
        config = args.workdir / f"llama-{label}.json"
        config.write_text(
            json.dumps({"model_type": "llama", "vocab_size": 32000, "pad_token_id": 0, **sizes})
        )
        started = time.perf_counter()
        done = subprocess.run(
            [DELTACLI, "inspect", str(config), "--method", "lora", "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(done.stdout)
        inspect.add_row(label, f"{time.perf_counter() - started:.2f} s", f"{report['total']:,}")
    console.print(inspect)
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
