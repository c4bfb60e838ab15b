"""GPU training throughput and memory per method: deltacli against PEFT + a plain loop.

A randomly initialised Llama stored in bf16 — 828M parameters (hidden 2048, 16 layers, 16
heads / 4 KV heads) or, with `--size 1b`, TinyLlama-1.1B's shape (22 layers, 32 / 4 heads) —
with the embedded model's 30,522-token vocabulary, learns packed plain text (rows of exactly
`--length` tokens, `--batch` rows a step, the same on both sides). Each run is its own
process; the first `--warmup` steps (CUDA and cuBLAS start-up, kernel selection, compiling)
are not timed; the two sides of a row alternate A-B-B-A over `--repeats` runs each. Rows:

- every method PEFT also has (LoRA, IA3, prefix, prompt, LayerNorm tuning, full), float32
  base weights under bf16 autocast on both sides;
- methods PEFT lacks (parallel adapter, SIFT), deltacli alone;
- LoRA over a base stored in bf16 (`base_dtype: auto`) and in NF4 (`quantize: nf4`), against
  PEFT over the same base.

Every run lands in a raw file (benchmarks/results/gpu-DEVICE-TIME.json, or `--out`) with the
commit, the flags, the GPU's name and clocks, the library versions and the time; the table
printed at the end — median [min–max] per side, the ratio of medians, MFU — is printed from
that file, and `--markdown FILE …` prints it again from any raw files.

    python benchmarks/gpu.py                               # 828M, batch 8 × 512, 5 + 5 runs
    python benchmarks/gpu.py --size 1b --length 2048 --batch 16 --compile
    python benchmarks/gpu.py --loss-kernel liger           # liger-kernel's loss (deltacli[liger])
    python benchmarks/gpu.py --tiny                        # a 2-layer model on the CPU (CI)
    python benchmarks/gpu.py --profile lora                # where a step's time goes
    python benchmarks/gpu.py --markdown benchmarks/results/gpu-h200-*.json
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import COMMIT, RESULTS, alternating, median_range

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH, LENGTH = 8, 512  # --tiny: 2 × 64; --batch, --length
COMPILE = False  # --compile: the deltacli side compiles its layers
LOSS_KERNEL = "chunked"  # --loss-kernel: the deltacli side's train.loss_kernel
# (hidden, intermediate, layers, heads, KV heads) of the random Llamas; the 1B one is
# TinyLlama-1.1B's shape.
SIZES = {"828m": (2048, 5440, 16, 16, 4), "1b": (2048, 5632, 22, 32, 4)}
TINY = (64, 128, 2, 1, 1)
# Dense bf16 tensor-core peaks (TFLOP/s) by the last word of the device's name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
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
SIDES = ["deltacli", "reference"]  # the reference: PEFT (plain PyTorch for full) + a loop
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


def build_model(folder: Path, tokenizer_dir: str, size: str) -> None:
    """The random Llama, saved in bf16 with the tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(folder)
    hidden, intermediate, layers, heads, kv = TINY if size == "tiny" else SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=4096, dtype="bfloat16",
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
                "compile": COMPILE,
                "loss_kernel": LOSS_KERNEL,
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
    parser.add_argument("--size", choices=sorted(SIZES), default="828m", help="the random Llama")
    parser.add_argument("--length", type=int, default=None, help="tokens per packed row")
    parser.add_argument("--batch", type=int, default=None, help="rows per step")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side, A-B-B-A")
    parser.add_argument("--compile", action="store_true", help="deltacli side: train.compile=true")
    parser.add_argument(
        "--loss-kernel", choices=["chunked", "liger"], default="chunked",
        help="deltacli side: train.loss_kernel (liger: pip install 'deltacli[liger]')",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer files [default: the embedded model's]"
    )
    parser.add_argument("--work", default="/tmp/deltacli-gpu-bench", help="model and data folder")
    parser.add_argument(
        "--out", default=None, help="the raw results file [default: benchmarks/results/]"
    )
    parser.add_argument(
        "--rows", default=None, help="row labels to run, separated by ';' (default: all)"
    )
    parser.add_argument("--profile", default=None, help="profile this method (both sides) instead")
    parser.add_argument(
        "--markdown", nargs="+", type=Path, help="print README's table from these raw files"
    )
    # one measured run (the script calls itself)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--profile-side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.markdown:
        print(markdown([json.loads(path.read_text()) for path in args.markdown]))
        return
    global BATCH, LENGTH, COMPILE, LOSS_KERNEL
    BATCH, LENGTH = (2, 64) if args.tiny else (BATCH, LENGTH)
    BATCH, LENGTH, COMPILE = args.batch or BATCH, args.length or LENGTH, args.compile
    LOSS_KERNEL = args.loss_kernel
    if args.side or args.profile_side:
        child(args)
        return
    steps = args.steps or (3 if args.tiny else 12)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    size = "tiny" if args.tiny else args.size
    model = work / f"llama-{size}"
    if not (model / "config.json").is_file():
        from deltacli.models.loading import resolve

        build_model(model, args.tokenizer or resolve("default"), size)
    data = work / f"train-{LENGTH}.jsonl"
    # Enough ~LENGTH-token records for every step of a run: 26 batches of 8 × 512 at 200.
    write_text(data, rows=max(200, (args.warmup + steps + 2) * BATCH * 2))
    write_text(data.with_name("eval.jsonl"), rows=2)
    common = ["--model", str(model), "--data", str(data), "--batch", str(BATCH),
              "--length", str(LENGTH), *(["--tiny"] if args.tiny else []),
              *(["--compile"] if args.compile else []),
              "--loss-kernel", args.loss_kernel]  # fmt: skip
    if args.profile:
        for side in SIDES if args.profile in SHARED else SIDES[:1]:
            done = subprocess.run(
                [sys.executable, __file__, "--profile-side", side, "--method", args.profile,
                 "--steps", str(steps), *common],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            print(done.stdout[-12000:] or done.stderr[-3000:], flush=True)
        return
    record = setting(args, model, steps)
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"gpu-{record['device_slug']}-{record['time']}.json"
    )
    record["rows"] = measure_rows(args, steps, common, record, out)
    write(out, record)
    print(markdown([record]))
    print(f"raw runs: {out}", file=sys.stderr)


def setting(args: argparse.Namespace, model: Path, steps: int) -> dict:
    """What a raw file records beside its runs: the code, the flags, the machine."""
    import importlib.metadata

    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else "CPU (--tiny)"
    config = json.loads((model / "config.json").read_text())
    return {
        "commit": COMMIT,
        "command": " ".join(["python", *sys.argv]),
        "flags": {
            "size": "tiny" if args.tiny else args.size,
            "batch": BATCH,
            "length": LENGTH,
            "steps": steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "compile": args.compile,
            "loss_kernel": args.loss_kernel,
        },
        "time": time.strftime("%Y-%m-%dT%H%MZ", time.gmtime()),
        "device": device,
        "device_slug": device.split()[-1].lower() if gpu else "cpu",
        "clocks": _clocks() if gpu else None,
        "peak_tflops": PEAK_TFLOPS.get(device.split()[-1].upper()) if gpu else None,
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("torch", "transformers", "peft", "accelerate")
        },
        "model": {
            "parameters": _parameters(config),
            "layers": config["num_hidden_layers"],
            "hidden": config["hidden_size"],
            "vocabulary": config["vocab_size"],
        },
    }


def _clocks() -> str | None:
    """The GPU's SM clock now and at most, as nvidia-smi reports them."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,power.limit",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _parameters(config: dict) -> dict:
    """Matmul weights of the Llama by role (embeddings are a lookup, not a matmul)."""
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    attention = hidden * hidden * 2 + 2 * hidden * kv * head_dim
    mlp = 3 * hidden * config["intermediate_size"]
    return {"layers": layers * (attention + mlp), "head": hidden * vocab}


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)


def measure_rows(
    args: argparse.Namespace, steps: int, common: list[str], record: dict, out: Path
) -> list[dict]:
    """Every row's runs, a row at a time (so a run cut short still leaves whole rows), the
    two sides in A-B-B-A order over the repeats; the rows so far are written to `out`."""
    import importlib.util

    rows = list(ROWS)
    if importlib.util.find_spec("bitsandbytes") is not None:
        rows.insert(2, NF4_ROW)
    if args.rows:
        rows = [row for row in rows if row[0] in args.rows.split(";")]
    done: list[dict] = []
    timeout = 600 if args.tiny else 300  # tiny: a loaded CPU, compiling
    for label, method, variant in rows:
        sides = SIDES if method in SHARED else SIDES[:1]
        results: dict[str, list] = {side: [] for side in SIDES}
        for repeat in range(args.repeats):
            for side in alternating(sides, repeat):
                argv = ["--side", side, "--method", method, "--variant", variant,
                        "--steps", str(steps), "--warmup", str(args.warmup), *common]  # fmt: skip
                result = measure(argv, timeout)
                print(
                    json.dumps({"row": label, "side": side, "repeat": repeat, **result}), flush=True
                )
                results[side].append(result)
        done.append({"row": label, "method": method, "variant": variant, **results})
        write(out, {**record, "rows": done})
    return done


def mfu(record: dict, method: str, tokens_per_second: float) -> float | None:
    """The share of the GPU's bf16 peak a run's FLOPs reach: 4 FLOPs per weight and token
    for frozen matmuls (forward, and the backward to their input), 6 for trained ones (and
    their weight gradient; a delta's own few weights are left out), and causal attention's
    QKᵀ and AV over the whole packed row (2 × 2 × context/2 × hidden
    per layer and token, three times over for the backward)."""
    if not record.get("peak_tflops"):
        return None
    weights, model, length = (
        record["model"]["parameters"],
        record["model"],
        record["flags"]["length"],
    )
    per_token = (6 if method == "full" else 4) * (weights["layers"] + weights["head"])
    per_token += 3 * 2 * 2 * (length / 2) * model["hidden"] * model["layers"]
    return tokens_per_second * per_token / (record["peak_tflops"] * 1e12)


def markdown(records: list[dict]) -> str:
    """README's GPU table from raw files: median [min–max] of each side's runs."""
    lines = [
        "| method | setting | deltacli tokens/s | reference tokens/s | ratio | MFU | "
        "deltacli peak GiB | reference peak GiB | runs | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        setting = _setting(record["flags"])
        for row in record["rows"]:
            ours, theirs = (_values(row[side], "tokens_per_second") for side in SIDES)
            share = mfu(record, row["method"], statistics.median(ours)) if ours else None
            ratio = statistics.median(ours) / statistics.median(theirs) if ours and theirs else None
            peaks = [_values(row[side], "peak_gib") for side in SIDES]
            runs = " + ".join(str(len([r for r in row[s] if "error" not in r]))
                              for s in SIDES if row[s])  # fmt: skip
            lines.append(
                f"| {row['row']} | {setting} | {median_range(ours, '{:,.0f}')} | "
                f"{median_range(theirs, '{:,.0f}')} | "
                f"{f'{ratio:.2f}×' if ratio else '—'} | "
                f"{f'{100 * share:.0f}%' if share else '—'} | "
                f"{median_range(peaks[0], '{:.1f}')} | {median_range(peaks[1], '{:.1f}')} | "
                f"{runs} | {record['commit']} |"
            )
    return "\n".join(lines)


def _setting(flags: dict) -> str:
    """The flags that change the deltacli side's step, as a table cell."""
    parts = [f"{flags['size']}, {flags['batch']} × {flags['length']:,}"]
    parts += ["compiled"] if flags.get("compile") else []
    parts += (
        [f"{flags['loss_kernel']} loss"] if flags.get("loss_kernel", "chunked") != "chunked" else []
    )
    return ", ".join(parts)


def _values(results: list[dict], key: str) -> list[float]:
    """One figure of each run that measured it (failed runs hold an error instead)."""
    return [r[key] for r in results if r.get(key) is not None]


if __name__ == "__main__":
    main()
