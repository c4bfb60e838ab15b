"""Two tasks' deltas merged into one model: an SST-2 LoRA and an AG News LoRA on the embedded
MiniLM, combined with `deltacli merge --method linear | task_arithmetic | ties | dare_ties`,
each task then scored with the merged body and its own classification head.

The protocol of the model-merging papers for classifiers (Yadav et al., 2023, for TIES):
the encoder's updates are merged, every task keeps its head. The heads are not merged (two
labels vs four); each LoRA's body is merged without its head (a copy of the delta without
the head's tensors), and each task is scored by its own delta with B set to zero (so only
its head acts) over the merged model as base. Beside them, each task's own delta (the
ceiling) and its head alone over the untouched base (the floor: what the merged body must
beat to have kept anything). Writes benchmarks/results/merge-tasks-DATE.json.

    python benchmarks/merge_tasks.py --out /tmp/merge-tasks
    python benchmarks/merge_tasks.py --out /tmp/merge-tasks --density 0.3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from measure import sampled_csv, write_results

DELTACLI = str(Path(sys.executable).parent / "deltacli")
AGNEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews"
LORA = "adapter_model.safetensors"


def deltacli(*args: str) -> str:
    done = subprocess.run([DELTACLI, *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"deltacli {' '.join(map(str, args))} failed:\n{done.stderr}")
    return done.stdout


def agnews_files(folder: Path, rows: int, eval_rows: int) -> dict[str, Path]:
    """AG News rows sampled once (seed 0) into CSVs."""
    return {
        name: sampled_csv(AGNEWS / f"{name}.csv", folder / f"agnews-{name}.csv", count)
        for name, count in (("train", rows), ("test", eval_rows))
    }


def trained(folder: Path, *overrides: str) -> Path:
    if not (folder / "metrics.json").is_file():
        deltacli("train", "--method", "lora", "-o", folder, "--overwrite", *overrides)
    return folder


def without_head(delta: Path, folder: Path) -> Path:
    """The delta's LoRA alone: the head's tensors dropped, `head: false` in its recipe."""
    _copy(delta, folder)
    tensors = load_file(delta / LORA)
    save_file({k: v for k, v in tensors.items() if "lora_" in k}, folder / LORA, {"format": "pt"})
    _edit_yaml(folder / "recipe.yaml", head=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def head_only(delta: Path, folder: Path) -> Path:
    """The delta with every B zero: over any base, only its head acts."""
    _copy(delta, folder)
    tensors = load_file(delta / LORA)
    zeroed = {k: v.zero_() if "lora_B" in k else v for k, v in tensors.items()}
    save_file(zeroed, folder / LORA, {"format": "pt"})
    return folder


def _copy(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


def _edit_yaml(path: Path, **values) -> None:
    recipe = yaml.safe_load(path.read_text())
    recipe.update(values)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def accuracy(delta: Path, data: str, model: Path | None = None) -> float:
    extra = ["--model", model] if model else []
    scores = deltacli("eval", "--delta", delta, "--data", data, "--json", *extra)
    return json.loads(scores)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/merge-tasks"))
    parser.add_argument("--agnews-rows", type=int, default=2000)
    parser.add_argument("--agnews-eval-rows", type=int, default=1000)
    parser.add_argument("--density", type=float, default=0.5, help="TIES / DARE density")
    parser.add_argument("--epochs", type=float, default=3.0)
    args = parser.parse_args()

    out = args.out
    agnews = agnews_files(out, args.agnews_rows, args.agnews_eval_rows)
    epochs = f"train.epochs={args.epochs}"
    tasks = {
        "SST-2": (trained(out / "sst2", epochs, "data.max_train_rows=2000"), "sst2:validation"),
        "AG News": (
            trained(
                out / "agnews",
                epochs,
                f"data.train={agnews['train']}",
                f"data.eval={agnews['test']}",
                "data.text=text",
            ),
            str(agnews["test"]),
        ),
    }
    bodies = [without_head(delta, out / f"{name}-body") for name, (delta, _) in
              zip(("sst2", "agnews"), tasks.values(), strict=True)]  # fmt: skip
    heads = {task: head_only(delta, out / f"{task}-head") for task, (delta, _) in tasks.items()}
    methods = {
        "linear": [],
        "task_arithmetic": [],
        "ties": ["--density", str(args.density)],
        "dare_ties": ["--density", str(args.density)],
    }
    merged = {}
    for method, options in methods.items():
        folder = out / f"merged-{method}"
        if not (folder / "config.json").is_file():
            deltacli("merge", "default", *bodies, folder, "--method", method, *options,
                     "--overwrite")  # fmt: skip
        merged[method] = folder

    rows = []
    for task, (delta, data) in tasks.items():
        row = {
            "task": task,
            "own delta": accuracy(delta, data),
            "head only": accuracy(heads[task], data),
        }
        for method, folder in merged.items():
            row[method] = accuracy(heads[task], data, folder)
        rows.append(row)
        Console().print(row)

    path = write_results(
        "merge-tasks",
        "SST-2 and AG News LoRAs (MiniLM, r=8 q/v) merged, each task with its own head",
        rows,
        flags={
            "density": args.density,
            "epochs": args.epochs,
            "agnews_rows": args.agnews_rows,
            "agnews_eval_rows": args.agnews_eval_rows,
        },
    )
    table = Table(title="accuracy of each task: its own delta, its head alone, merged bodies")
    columns = ["task", "own delta", "head only", *methods]
    for column in columns:
        table.add_column(column, justify="left" if column == "task" else "right")
    for row in rows:
        table.add_row(row["task"], *(f"{100 * row[c]:.1f}%" for c in columns[1:]))
    Console().print(table)
    Console().print(f"raw results: {path}")


if __name__ == "__main__":
    main()
