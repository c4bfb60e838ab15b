"""GPU training throughput and memory per method: deltacli against PEFT + a plain loop.

A randomly initialised Llama of 828M parameters (hidden 2048, 16 layers, 16 heads / 4 KV
heads, the embedded model's 30,522-token vocabulary), stored in bf16, learns packed plain
text (rows of exactly 512 tokens, batch 8, so every step is 4,096 tokens on both sides).
Each run is its own process; the first `--warmup` steps (CUDA and cuBLAS start-up, kernel
selection) are not timed; the two sides of a row alternate, and every row is measured
`--repeats` times. Rows:

- every method PEFT also has (LoRA, IA3, prefix, prompt, LayerNorm tuning, full), float32
  base weights under bf16 autocast on both sides;
- methods PEFT lacks (parallel adapter, SIFT), deltacli alone;
- LoRA over a base stored in bf16 (`base_dtype: auto`) and in NF4 (`quantize: nf4`), against
  PEFT over the same base.

    python benchmarks/gpu.py                  # the table; about 6 minutes on one H100/H200
    python benchmarks/gpu.py --tiny           # a 2-layer model on the CPU (CI's smoke test)
    python benchmarks/gpu.py --profile lora   # where a step's time goes, deltacli vs PEFT
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH, LENGTH = 8, 512  # --tiny: 2 × 64
DELTAS = {
    "lora": {"kind": "lora", "r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj",
                                                                "o_proj"]},
    "ia3": {"kind": "ia3"},
    "prefix": {"kind": "prefix", "length": 16},
    "prompt": {"kind": "prompt", "length": 16},
    "layernorm": {"kind": "layernorm"},
    "full": {"kind": "full"},
    "parallel adapter": {"kind": "adapter", "placement": "parallel", "r": 64, "scale": 4.0},
    "sift 1%": {"kind": "sift", "density": 0.01},
}  # fmt: skip
SHARED = ["lora", "ia3", "prefix", "prompt", "layernorm", "full"]
# (label, method, base variant): fp32 weights + bf16 autocast, or the base stored as users
# load it (bf16), or 4-bit.
# In the order they run: LoRA and its stored-as-users-load-it rows first, the adapter next
# (the question: is it within 10% of LoRA?), then the rest.
ROWS = [
    ("lora", "lora", "fp32"),
    ("lora, bf16 base", "lora", "bf16"),
    ("parallel adapter", "parallel adapter", "fp32"),
    *((m, m, "fp32") for m in ("ia3", "prefix", "prompt", "layernorm", "full", "sift 1%")),
]
NF4_ROW = ("lora, NF4 base (QLoRA)", "lora", "nf4")


def build_model(folder: Path, tokenizer_dir: str, tiny: bool) -> None:
    """The random Llama, saved in bf16 with the tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(folder)
    hidden, layers = (64, 2) if tiny else (2048, 16)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 512), pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=2048, dtype="bfloat16",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e6:,.0f}M parameters", flush=True)


def write_text(path: Path, rows: int) -> None:
    """Plain-text records of about LENGTH tokens from the bundled SST-2 sample."""
    sample = importlib.resources.files("deltacli.samples") / "sst2" / "train.tsv"
    with open(str(sample), encoding="utf-8") as file:
        sentences = [row[0] for row in csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)]
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(rows):
            out.write(json.dumps({"text": " ".join(rng.sample(sentences[1:], 40))}) + "\n")


def recipe(model: str, data: Path, method: str, variant: str, steps: int, gpu: bool):
    from deltacli.recipe import parse_recipe

    return parse_recipe(
        {
            "name": method,
            "model": model,
            "task": "causal-lm",
            "base_dtype": {"bf16": "bf16", "nf4": "auto"}.get(variant, "fp32"),
            "quantize": "nf4" if variant == "nf4" else None,
            "data": {
                "train": str(data),
                "eval": str(data.with_name("eval.jsonl")),
                "format": "text",
                "packing": True,
                "max_length": LENGTH,
            },
            "deltas": [DELTAS[method]],
            "train": {
                "max_steps": steps,
                "batch_size": BATCH,
                "eval_batch_size": BATCH,
                "lr": 1e-5 if method == "full" else 1e-4,
                "mixed_precision": "bf16" if gpu else "no",
                "warmup_ratio": 0.0,
                "log_every": 1,
            },
        }
    )


class Clock:
    """Step times, read after the GPU has finished the step (`loss.item()` waits for it)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def tick(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def tokens_per_second(self, warmup: int) -> float:
        timed = self.times[warmup:]
        return (len(timed) - 1) * BATCH * LENGTH / (timed[-1] - timed[0])


def run_deltacli(model: str, data: Path, method: str, variant: str, steps: int, warmup: int):
    import torch

    from deltacli.training.logs import MetricsLog
    from deltacli.training.trainer import Trainer

    gpu = torch.cuda.is_available()
    trainer = Trainer(recipe(model, data, method, variant, warmup + steps + 1, gpu), console=None)
    clock = Clock()

    class Timed(MetricsLog):
        def write(self, **record) -> None:
            if "loss" in record:
                clock.tick()

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    clock.tick()
    trainer.fit(Timed(None))
    return clock.tokens_per_second(warmup), _peak()


def reference_model(model: str, method: str, variant: str, gpu: bool):
    """PEFT's model of the same method (or the plain model, for full fine-tuning)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from deltacli.models.loading import quantization

    options = {"dtype": torch.bfloat16 if variant != "fp32" else torch.float32}
    if variant == "nf4":
        options |= quantization("nf4", torch.device("cuda" if gpu else "cpu"))
    net = AutoModelForCausalLM.from_pretrained(model, **options)
    if not (gpu and variant == "nf4"):
        net = net.to("cuda" if gpu else "cpu")
    net.config.use_cache = False
    task = peft.TaskType.CAUSAL_LM
    configs = {
        "lora": lambda: peft.LoraConfig(
            task_type=task, r=16, lora_alpha=32, target_modules=DELTAS["lora"]["targets"]
        ),
        "ia3": lambda: peft.IA3Config(task_type=task),
        "prefix": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=16),
        "prompt": lambda: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=16),
        "layernorm": lambda: peft.LNTuningConfig(task_type=task),
    }  # fmt: skip
    return peft.get_peft_model(net, configs[method]()) if method in configs else net


def run_reference(model: str, data: Path, method: str, variant: str, steps: int, warmup: int):
    """PEFT + a plain loop over deltacli's own batches (the same rows, padded the same)."""
    import torch
    from transformers import AutoTokenizer

    from deltacli.tasks.tables import batches

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    rec = recipe(model, data, method, variant, warmup + steps + 1, gpu)
    tokenizer = AutoTokenizer.from_pretrained(model)
    encoded = rec.task_entry.load_data(rec.data, tokenizer, rec.train.seed)
    torch.manual_seed(0)
    net = reference_model(model, method, variant, gpu)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rec.train.lr)
    loader = batches(encoded.train, rec.task_entry.collate(tokenizer, encoded.train), BATCH, True)
    clock = Clock()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    net.train()
    clock.tick()
    for _, batch in zip(range(warmup + steps + 1), _cycle(loader), strict=False):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            loss = net(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        clock.tick()
    return clock.tokens_per_second(warmup), _peak()


def _cycle(loader):
    """Epoch after epoch, as the trainer goes on (the data is sized so one epoch is enough)."""
    while True:
        yield from loader


def _peak() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def profile(side: str, model: str, data: Path, method: str, steps: int) -> None:
    """Where the time of `steps` steps after warm-up goes (torch.profiler, by self time on
    the device, or on the CPU where there is none)."""
    import torch
    from torch.profiler import ProfilerActivity

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(activities=activities)
    warmup, original, ticks = 3, Clock.tick, []

    def tick(self) -> None:
        original(self)
        ticks.append(None)
        if len(ticks) == warmup + 1:
            prof.start()
        elif len(ticks) == warmup + 1 + steps:
            prof.stop()

    Clock.tick = tick
    runner = run_deltacli if side == "deltacli" else run_reference
    speed, _ = runner(model, data, method, "fp32", steps + 1, warmup)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"### {side} {method}: {speed:,.0f} tokens/s over {steps} steps")
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=70))


def child(args: argparse.Namespace) -> None:
    data = Path(args.data)
    if args.profile_side:
        profile(args.profile_side, args.model, data, args.method, args.steps)
        return
    runner = run_deltacli if args.side == "deltacli" else run_reference
    speed, peak = runner(args.model, data, args.method, args.variant, args.steps, args.warmup)
    print(json.dumps({"tokens_per_second": speed, "peak_gib": peak}))


def measure(argv: list[str], timeout: int) -> dict:
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-400:]}
    return {**json.loads(lines[-1]), "wall": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer files [default: the embedded model's]"
    )
    parser.add_argument("--work", default="/tmp/deltacli-gpu-bench", help="model and data folder")
    parser.add_argument("--out", default=None, help="write the results as JSON here too")
    parser.add_argument(
        "--rows", default=None, help="row labels to run, separated by ';' (default: all)"
    )
    parser.add_argument("--profile", default=None, help="profile this method (both sides) instead")
    # one measured run (the script calls itself)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--profile-side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        global BATCH, LENGTH
        BATCH, LENGTH = 2, 64
    if args.side or args.profile_side:
        child(args)
        return
    steps = args.steps or (3 if args.tiny else 12)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / ("llama-tiny" if args.tiny else "llama-828m")
    if not (model / "config.json").is_file():
        from deltacli.models.loading import resolve

        build_model(model, args.tokenizer or resolve("default"), args.tiny)
    data = work / "train.jsonl"
    write_text(data, rows=200)  # 200 × ~540 tokens: 26 batches of 8 × 512, more than a run needs
    write_text(data.with_name("eval.jsonl"), rows=2)
    common = ["--model", str(model), "--data", str(data), *(["--tiny"] if args.tiny else [])]
    if args.profile:
        for side in ("deltacli", "reference") if args.profile in SHARED else ("deltacli",):
            done = subprocess.run(
                [sys.executable, __file__, "--profile-side", side, "--method", args.profile,
                 "--steps", str(steps), *common],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            print(done.stdout[-12000:] or done.stderr[-3000:], flush=True)
        return
    print_table(measure_rows(args, steps, common), args)


def measure_rows(args: argparse.Namespace, steps: int, common: list[str]) -> list[dict]:
    """Every row's runs, a row at a time (so a run cut short still leaves whole rows), the
    two sides in A-B-B-A order over the repeats; the results so far go to `--out`."""
    import importlib.util

    rows = list(ROWS)
    if importlib.util.find_spec("bitsandbytes") is not None:
        rows.insert(2, NF4_ROW)
    if args.rows:
        rows = [row for row in rows if row[0] in args.rows.split(";")]
    done = []
    timeout = 120 if args.tiny else 150
    for label, method, variant in rows:
        sides = ["deltacli", "reference"] if method in SHARED else ["deltacli"]
        results: dict[str, list] = {"deltacli": [], "reference": []}
        for repeat in range(args.repeats):
            for side in sides if repeat % 2 == 0 else list(reversed(sides)):
                argv = ["--side", side, "--method", method, "--variant", variant,
                        "--steps", str(steps), "--warmup", str(args.warmup), *common]  # fmt: skip
                result = measure(argv, timeout)
                print(
                    json.dumps({"row": label, "side": side, "repeat": repeat, **result}), flush=True
                )
                results[side].append(result)
        done.append({"row": label, **results})
        if args.out:
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(done, indent=1))
    return done


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (--tiny)"
    table = Table(title=f"{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    for column in (
        "method",
        "deltacli tokens/s",
        "reference tokens/s",
        "ratio",
        "deltacli peak GiB",
        "reference peak GiB",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")  # fmt: skip
    summary = []
    for row in rows:
        ours, theirs = (_mean(row[side], "tokens_per_second") for side in ("deltacli", "reference"))
        peaks = [_mean(row[side], "peak_gib") for side in ("deltacli", "reference")]
        errors = [
            r["error"] for side in ("deltacli", "reference") for r in row[side] if "error" in r
        ]
        ratio = f"{ours / theirs:.2f}×" if ours and theirs else "—"
        table.add_row(
            row["row"], _show(ours, "{:,.0f}"), _show(theirs, "{:,.0f}"), ratio,
            _show(peaks[0], "{:.1f}"), _show(peaks[1], "{:.1f}"),
        )  # fmt: skip
        summary.append(
            {
                "row": row["row"],
                "deltacli": ours,
                "reference": theirs,
                "peaks": peaks,
                "errors": errors,
            }
        )
    Console(width=140).print(table)
    for item in summary:
        for error in item["errors"]:
            print(f"{item['row']}: {error}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "rows": summary}, indent=1))


def _mean(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _show(value: float | None, fmt: str) -> str:
    return fmt.format(value) if value is not None else "—"


if __name__ == "__main__":
    main()
