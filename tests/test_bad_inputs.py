"""Every bad input a user can hand deltacli: one line on stderr saying what to fix, exit code 2
(1 for a failed self-check), no traceback, and no output written.

Each case builds its input in a fresh folder, runs the command in-process, and checks all
four promises. Cases whose fault strikes after training has begun may print progress first;
their error must still be one line, and the last.
"""

import contextlib
import dataclasses
import errno
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from deltacli.files.outputs import MARKER
from deltacli.storage.delta_folder import WEIGHTS_FILE

OUT = "out"  # every case's output path, relative to its folder


@dataclasses.dataclass
class Case:
    name: str
    args: Callable[[Path, dict], list]  # (folder, fixtures) -> command line
    message: str  # what the one line must say
    code: int = 2
    setup: Callable[[Path, dict], None] = lambda folder, fx: None
    after_start: bool = False  # the fault strikes once training runs: progress may come first


def base(fx) -> list:
    """Train on the tiny BERT and tiny data, 2 steps."""
    return [
        "--model", fx["bert"], "--data", fx["train"], "--eval-data", fx["eval"],
        "data.text=text", "train.max_steps=2",
    ]  # fmt: skip


def train(*extra):
    return lambda folder, fx: ["train", "--method", "lora", *base(fx), *extra, "-o", folder / OUT]


def write(name: str, content: bytes | str):
    def setup(folder: Path, fx: dict) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)

    return setup


def truncated_copy(folder: Path, fx: dict) -> None:
    shutil.copytree(fx["bert"], folder / "base")
    weights = folder / "base" / "model.safetensors"
    with weights.open("r+b") as file:
        file.truncate(weights.stat().st_size - 10_000)


def delta_copy(name: str, change: Callable[[Path], None] = lambda delta: None):
    def setup(folder: Path, fx: dict) -> None:
        shutil.copytree(fx["lora"], folder / name)
        change(folder / name)

    return setup


def poison(delta: Path) -> None:
    tensors = load_file(delta / WEIGHTS_FILE)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, delta / WEIGHTS_FILE, metadata={"format": "pt"})


def evaluate(delta: str = "delta"):
    return lambda folder, fx: ["eval", "--delta", folder / delta, "--data", fx["eval"]]


def merge(*extra, delta: str = "delta", base_dir: str | None = None):
    def args(folder, fx):
        model = folder / base_dir if base_dir else fx["bert"]
        return ["merge", model, folder / delta, folder / OUT, *extra]

    return args


def recipe_run(folder: Path, fx: dict) -> list:
    """Train the recipe file `r.yaml` a case writes."""
    return ["train", "--recipe", folder / "r.yaml", *base(fx), "-o", folder / OUT]


def index_naming(shard: str):
    """A copy of the base whose shard index names `shard`, and a delta to merge into it."""

    def setup(folder: Path, fx: dict) -> None:
        shutil.copytree(fx["bert"], folder / "base")
        index = {"weight_map": {"bert.embeddings.word_embeddings.weight": shard}}
        (folder / "base" / "model.safetensors.index.json").write_text(json.dumps(index))
        delta_copy("delta")(folder, fx)

    return setup


def decode_space(folder: Path, fx: dict) -> list:
    return [
        "subspace",
        "decode",
        folder / "space",
        "--to",
        "lora",
        "--point",
        "lora",
        "-o",
        folder / OUT,
    ]


CASES = [
    # recipes and overrides
    Case(
        "unknown method",
        lambda f, fx: ["train", "--method", "lorra", "-o", f / OUT],
        "unknown method 'lorra' (did you mean 'lora'?)",
    ),
    Case(
        "unknown key", train("train.lrr=1e-3"), "unknown key 'train.lrr' (did you mean 'train.lr'?)"
    ),
    Case("wrong type", train("deltas.0.r=four"), "deltas.0.r must be an integer, got 'four'"),
    Case("NaN learning rate", train("train.lr=.nan"), "train.lr must be a finite number"),
    Case("zero learning rate", train("train.lr=0"), "train.lr must be positive"),
    Case("dropout out of range", train("deltas.0.dropout=1.5"), "lora dropout must be in [0, 1)"),
    Case(
        "YAML comment in an override",
        train("data.text=#1 String"),
        "quote it: 'data.text=\"#1 String\"'",
    ),
    Case(
        "unknown delta kind",
        train("deltas.0.kind=lorax"),
        "unknown delta kind 'lorax' (did you mean 'lora'?)",
    ),
    Case("unknown task", train("task=classify"), "task must be one of"),
    Case(
        "unknown best metric",
        train("train.best_metric=f2"),
        "train.best_metric for sequence-classification must be one of",
    ),
    Case(
        "target that matches nothing",
        train("deltas.0.targets=[querry]"),
        "no linear module matches 'querry'; close names: query",
    ),
    Case(
        "recipe not UTF-8",
        recipe_run,
        "is not UTF-8 text (byte 0xff",
        setup=write("r.yaml", b"model: default\nname: \xff\n"),
    ),
    Case(
        "malformed YAML recipe",
        recipe_run,
        "is not valid YAML at line 3, column 1",
        setup=write("r.yaml", "model: default\ndeltas: [{kind: lora}\n"),
    ),
    Case(
        "recipe that is a list",
        lambda f, fx: ["train", "--recipe", f / "r.yaml", "-o", f / OUT],
        "must hold recipe keys (a mapping), not list",
        setup=write("r.yaml", "- lora\n"),
    ),
    Case(
        "recipe file missing",
        lambda f, fx: ["train", "--recipe", f / "r.yaml", "-o", f / OUT],
        "recipe file",
    ),
    Case(
        "method and recipe both",
        lambda f, fx: ["train", "--method", "lora", "--recipe", f / "r.yaml", "-o", f / OUT],
        "give either --method or --recipe",
        setup=write("r.yaml", "deltas: [{kind: lora}]\n"),
    ),
    Case(
        "recipe without deltas",
        recipe_run,
        "the recipe lists no deltas",
        setup=write("r.yaml", "model: default\n"),
    ),
    # the command line itself
    Case(
        "unknown option",
        lambda f, fx: ["train", "--bogus", "-o", f / OUT],
        "No such option: --bogus (see: deltacli train --help)",
    ),
    Case(
        "bad choice",
        lambda f, fx: ["inspect", fx["bert"], "--by", "foo"],
        "'foo' is not one of 'module', 'layer'",
    ),
    Case(
        "missing option", lambda f, fx: ["eval", "--data", fx["eval"]], "Missing option '--delta'"
    ),
    Case(
        "merge with too few paths",
        lambda f, fx: ["merge", fx["bert"], f / OUT],
        "merge needs BASE, at least one DELTA, and OUT",
    ),
    Case(
        "merge weights not numbers",
        merge("--weights", "a"),
        "--weights must be numbers separated by commas",
        setup=delta_copy("delta"),
    ),
    Case(
        "density out of range",
        lambda f, fx: ["sparsify", fx["bert"], fx["lora"], f / OUT, "--density", "0"],
        "--density must be in (0, 1], got 0.0",
    ),
    # data
    Case("data file missing", train("data.train=nope.csv"), "data file nope.csv does not exist"),
    Case(
        "data is a directory",
        lambda f, fx: ["train", "--method", "lora", *base(fx), "--data", f, "-o", f / OUT],
        "is a directory; give a .csv",
    ),
    Case(
        "empty CSV",
        lambda f, fx: [
            "train",
            "--method",
            "lora",
            *base(fx),
            "--data",
            f / "e.csv",
            "-o",
            f / OUT,
        ],
        "e.csv is empty",
        setup=write("e.csv", ""),
    ),
    Case(
        "header-only CSV",
        lambda f, fx: [
            "train",
            "--method",
            "lora",
            *base(fx),
            "--data",
            f / "h.csv",
            "-o",
            f / OUT,
        ],
        "holds no rows (an empty file, or a header alone)",
        setup=write("h.csv", "text,label\n"),
    ),
    Case(
        "CSV not UTF-8",
        lambda f, fx: [
            "train",
            "--method",
            "lora",
            *base(fx),
            "--data",
            f / "l.csv",
            "-o",
            f / OUT,
        ],
        "l.csv line 3 is not UTF-8 text (byte 0xe9 at column 4)",
        setup=write("l.csv", b"text,label\ngood,pos\ncaf\xe9,neg\n"),
    ),
    Case(
        "JSONL with a broken line",
        lambda f, fx: [
            "train",
            "--method",
            "lora",
            *base(fx),
            "--data",
            f / "b.jsonl",
            "-o",
            f / OUT,
        ],
        "b.jsonl line 2 is not valid JSON (column",
        setup=write("b.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", label: 0}\n'),
    ),
    Case(
        "missing column",
        train("data.text=review"),
        "has no column 'review' (columns: text, label); set data.text=COLUMN",
    ),
    Case(
        "one label only",
        lambda f, fx: [
            "train",
            "--method",
            "lora",
            *base(fx),
            "--data",
            f / "one.csv",
            "--eval-data",
            f / "one.csv",
            "-o",
            f / OUT,
        ],
        "fewer than two distinct labels",
        setup=write("one.csv", "text,label\ngood,pos\nfine,pos\n"),
    ),
    Case(
        "unreadable file type",
        lambda f, fx: [
            "train",
            "--method",
            "lora",
            *base(fx),
            "--data",
            f / "notes.txt",
            "-o",
            f / OUT,
        ],
        "use a .csv, .tsv, .json, .jsonl or .parquet file",
        setup=write("notes.txt", "hello\n"),
    ),
    # models
    Case(
        "model missing",
        lambda f, fx: ["train", "--method", "lora", "--model", f / "nope", "-o", f / OUT],
        "does not exist",
    ),
    Case(
        "model without config",
        lambda f, fx: ["train", "--method", "lora", "--model", f / "m", "-o", f / OUT],
        "is not a Hugging Face model directory (no config.json)",
        setup=write("m/weights.txt", "x"),
    ),
    Case(
        "garbage config.json",
        lambda f, fx: ["train", "--method", "lora", "--model", f / "m", "-o", f / OUT],
        "is not a valid JSON file",
        setup=write("m/config.json", "{oops"),
    ),
    Case(
        "truncated base, train",
        lambda f, fx: [
            "train",
            "--method",
            "lora",
            *base(fx),
            "--model",
            f / "base",
            "-o",
            f / OUT,
        ],
        "model.safetensors ends early: tensor",
        setup=truncated_copy,
    ),
    Case(
        "truncated base, merge",
        merge(base_dir="base", delta="delta"),
        "model.safetensors ends early: tensor",
        setup=lambda f, fx: (truncated_copy(f, fx), delta_copy("delta")(f, fx)),
    ),
    Case(
        "truncated base, merge --verify",
        merge("--verify", "--dtype", "bf16", base_dir="base", delta="delta"),
        "ends early",
        setup=lambda f, fx: (truncated_copy(f, fx), delta_copy("delta")(f, fx)),
    ),
    Case(
        "bare config cannot train",
        lambda f, fx: ["train", "--method", "lora", "--model", f / "config.json", "-o", f / OUT],
        "is a bare config",
        setup=write("config.json", '{"model_type": "bert"}'),
    ),
    # outputs
    Case(
        "output is a file",
        train(),
        "is a file, not a directory; choose another path",
        setup=write(OUT, "notes"),
    ),
    Case(
        "output exists",
        train(),
        "exists; pass --overwrite to replace it",
        setup=write(f"{OUT}/mine.txt", "mine"),
    ),
    Case(
        "output is the user's folder",
        train("--overwrite"),
        "was not written by deltacli",
        setup=write(f"{OUT}/mine.txt", "mine"),
    ),
    # deltas on disk
    Case(
        "delta with NaN values",
        evaluate(),
        "holds 1 NaN or infinite value(s)",
        setup=delta_copy("delta", poison),
    ),
    Case(
        "delta whose recipe is damaged",
        evaluate(),
        "recipe.yaml is not valid YAML at line",
        setup=delta_copy("delta", lambda d: (d / "recipe.yaml").write_text("deltas: [\n")),
    ),
    Case(
        "PEFT config that is not JSON",
        evaluate("peft"),
        "adapter_config.json is not valid JSON at line 1",
        setup=lambda f, fx: (
            shutil.copytree(fx["peft"], f / "peft"),
            (f / "peft" / "adapter_config.json").write_text("{,"),
        ),
    ),
    Case("delta missing", evaluate("nothing"), "delta directory"),
    Case(
        "non-linear delta cannot merge",
        merge(delta="prefix"),
        "holds a prefix delta, which is not linear in the base weights",
        setup=lambda f, fx: shutil.copytree(fx["prefix"], f / "prefix"),
    ),
    # second round (issue 18): nothing outside the output, nothing of the user's replaced
    Case(
        "shard index pointing outside the base",
        merge(base_dir="base", delta="delta"),
        "names shard '../outside.safetensors', which is not a plain file name",
        setup=index_naming("../outside.safetensors"),
    ),
    Case(
        "shard index with an absolute path",
        merge(base_dir="base", delta="delta"),
        "which is not a plain file name",
        setup=index_naming("/tmp/deltacli-outside.safetensors"),
    ),
    Case(
        "two LoRAs on the same modules",
        train("deltas.1.kind=lora", "deltas.1.r=2"),
        "deltas.1 (lora) attaches to",
    ),
    Case(
        "output is the base model",
        lambda f, fx: [
            "train",
            "--method",
            "lora",
            *base(fx),
            "--model",
            f / "m",
            "-o",
            f / "m",
            "--overwrite",
        ],
        "would overlap the base model",
        setup=lambda f, fx: (
            shutil.copytree(fx["bert"], f / "m"),
            (f / "m" / MARKER).write_text("{}"),
        ),
    ),
    Case(
        "output holds the base model",
        lambda f, fx: [
            "train",
            "--method",
            "lora",
            *base(fx),
            "--model",
            f / "d" / "m",
            "-o",
            f / "d",
            "--overwrite",
        ],
        "would overlap the base model",
        setup=lambda f, fx: (
            shutil.copytree(fx["bert"], f / "d" / "m"),
            (f / "d" / MARKER).write_text("{}"),
        ),
    ),
    Case(
        "merge output is the delta",
        lambda f, fx: ["merge", fx["bert"], f / "delta", f / "delta", "--overwrite"],
        "would overlap the delta",
        setup=delta_copy("delta"),
    ),
    Case(
        "merge weight NaN",
        merge("--weights", "nan", delta="delta"),
        "--weights must be finite",
        setup=delta_copy("delta"),
    ),
    Case(
        "merge weight inf",
        merge("--weights", "inf", delta="delta"),
        "--weights must be finite",
        setup=delta_copy("delta"),
    ),
    Case(
        "subspace of deltas trained on other data",
        lambda f, fx: ["subspace", "fit", f / "lora", f / "prefix", "-o", f / OUT, "--steps", "1"],
        "trained with data.train=",
        setup=lambda f, fx: (
            delta_copy("lora")(f, fx),
            shutil.copytree(fx["prefix"], f / "prefix"),
            (f / "prefix" / "recipe.yaml").write_text(
                (f / "prefix" / "recipe.yaml").read_text().replace(str(fx["train"]), "sst2:train")
            ),
        ),
    ),
    Case(
        "resume with another base_dtype",
        lambda f, fx: ["train", "--resume", f / OUT, "base_dtype=bf16"],
        "'base_dtype' would change its model, its precision",
    ),
    Case(
        "resume with another seed",
        lambda f, fx: ["train", "--resume", f / OUT, "train.seed=3"],
        "'train.seed' would change",
    ),
    Case(
        "duplicate key in a recipe",
        recipe_run,
        "the key 'train' appears twice",
        setup=write("r.yaml", "deltas: [{kind: lora}]\ntrain: {lr: 0.1}\ntrain: {epochs: 1}\n"),
    ),
    Case(
        "duplicate nested key in a recipe",
        recipe_run,
        "the key 'lr' appears twice",
        setup=write("r.yaml", "deltas: [{kind: lora}]\ntrain:\n  lr: 0.1\n  lr: 0.2\n"),
    ),
    Case(
        "report --csv onto the user's file",
        lambda f, fx: ["report", fx["lora"], "--csv", f / "mine.csv"],
        "exists; choose a new file name",
        setup=write("mine.csv", "precious"),
    ),
    Case(
        "model with its own code",
        lambda f, fx: ["train", "--method", "lora", *base(fx), "--model", f / "m", "-o", f / OUT],
        "needs its own Python code (auto_map), which deltacli never runs",
        setup=lambda f, fx: (
            write(
                "m/config.json",
                '{"model_type": "pwned", "auto_map": {"AutoConfig": "code.C", '
                '"AutoModelForSequenceClassification": "code.M"}}',
            )(f, fx),
            write(
                "m/code.py",
                "import pathlib\npathlib.Path(__file__).parent.parent.joinpath('ran').write_text('!')\n",
            )(f, fx),
            write("m/vocab.txt", "[PAD]\n")(f, fx),
        ),
    ),
    Case(
        "recipe name that is a path",
        lambda f, fx: ["train", "--method", "lora", *base(fx), "name=../../escaped"],
        "name must be a plain label",
    ),
    Case(
        "recipe name that is absolute",
        lambda f, fx: ["train", "--method", "lora", *base(fx), f"name={f / 'abs'}"],
        "name must be a plain label",
    ),
    Case(
        "output is a dangling symlink",
        train(),
        "is a symbolic link that leads nowhere",
        setup=lambda f, fx: (f / OUT).symlink_to(f / "nowhere"),
    ),
    Case(
        "output is a symlink loop",
        train(),
        "is a symbolic link that leads nowhere",
        setup=lambda f, fx: (f / OUT).symlink_to(f / OUT),
    ),
    Case(
        "merge into a dangling symlink",
        merge(delta="delta"),
        "is a symbolic link that leads nowhere",
        setup=lambda f, fx: (delta_copy("delta")(f, fx), (f / OUT).symlink_to(f / "nowhere")),
    ),
    Case(
        "truncated GGUF, inspect",
        lambda f, fx: ["inspect", f / "m.gguf", "--method", "lora"],
        "cannot read GGUF file",
        setup=write("m.gguf", b"GGUF\x03\x00\x00\x00\x01\x00"),
    ),
    Case(
        "truncated GGUF, train",
        lambda f, fx: [
            "train",
            "--method",
            "lora",
            *base(fx),
            "--model",
            f / "m.gguf",
            "-o",
            f / OUT,
        ],
        "cannot read GGUF file",
        setup=write("m.gguf", b"GGUF\x03\x00\x00\x00\x01\x00"),
    ),
    Case(
        "hidden size not a multiple of the heads",
        lambda f, fx: ["inspect", f / "config.json", "--method", "lora"],
        "is not a multiple of the number of attention heads",
        setup=write(
            "config.json",
            '{"model_type": "bert", "hidden_size": 100, "num_attention_heads": 3, '
            '"num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 50}',
        ),
    ),
    Case(
        "config with 100,000 layers",
        lambda f, fx: ["inspect", f / "config.json", "--method", "lora"],
        "num_hidden_layers=100,000; deltacli builds models of up to",
        setup=write(
            "config.json",
            '{"model_type": "bert", "hidden_size": 96, "num_attention_heads": 3, '
            '"num_hidden_layers": 100000, "intermediate_size": 64, "vocab_size": 50}',
        ),
    ),
    Case(
        "damaged subspace.json",
        lambda f, fx: [
            "subspace",
            "decode",
            f / "space",
            "--to",
            "lora",
            "--point",
            "lora",
            "-o",
            f / OUT,
        ],
        "subspace.json is not valid JSON",
        setup=write("space/subspace.json", "{oops"),
    ),
    Case(
        "subspace.json of another shape",
        lambda f, fx: [
            "subspace",
            "decode",
            f / "space",
            "--to",
            "lora",
            "--point",
            "lora",
            "-o",
            f / OUT,
        ],
        "is not a subspace as `deltacli subspace fit` writes it",
        setup=write("space/subspace.json", '{"dim": 2}'),
    ),
    Case(
        "damaged subspace.safetensors",
        lambda f, fx: [
            "subspace",
            "decode",
            f / "space",
            "--to",
            "lora",
            "--point",
            "lora",
            "-o",
            f / OUT,
        ],
        "subspace.safetensors is not a valid safetensors file",
        setup=lambda f, fx: (
            write("space/subspace.json", '{"dim": 2, "methods": []}')(f, fx),
            write("space/subspace.safetensors", b"\x10\x00\x00\x00garbage")(f, fx),
        ),
    ),
    Case(
        "damaged initial.safetensors",
        lambda f, fx: ["subspace", "fit", f / "lora", f / "prefix", "-o", f / OUT, "--steps", "1"],
        "initial.safetensors is not a valid safetensors file",
        setup=lambda f, fx: (
            delta_copy("lora", lambda d: (d / "initial.safetensors").write_bytes(b"\x05\x00"))(
                f, fx
            ),
            shutil.copytree(fx["prefix"], f / "prefix"),
        ),
    ),
    Case(
        "report on a run without eval figures",
        lambda f, fx: ["report", f / "delta"],
        "has no eval figures",
        setup=delta_copy("delta", lambda d: (d / "metrics.json").write_text('{"params": {}}')),
    ),
    Case(
        "report on a mis-shaped sweep.json",
        lambda f, fx: ["report", f / "sweep"],
        "is not a sweep plan as deltacli writes it",
        setup=write("sweep/sweep.json", '{"runs": [1, 2]}'),
    ),
    Case(
        "report --csv a folder",
        lambda f, fx: ["report", fx["lora"], "--csv", f],
        "is a folder; name a file",
    ),
    Case(
        "report --plots a file",
        lambda f, fx: ["report", fx["lora"], "--plots", f / "figure.png"],
        "is a file; name a folder for the figures",
        setup=write("figure.png", "not a folder"),
    ),
    Case(
        "resume a model folder",
        lambda f, fx: ["train", "--resume", f / "m"],
        "is not a run deltacli wrote, and no interrupted run writing it was found",
        setup=lambda f, fx: shutil.copytree(fx["bert"], f / "m"),
    ),
    Case(
        "the same seed twice",
        lambda f, fx: ["sweep", "--methods", "lora", "--seeds", "1,1", "-o", f / OUT],
        "--seeds lists 1 more than once",
    ),
    Case(
        "two rows and a held-out split",
        lambda f, fx: [
            "train",
            "--method",
            "lora",
            "--model",
            fx["bert"],
            "--data",
            f / "two.csv",
            "data.eval=null",
            "data.text=text",
            "-o",
            f / OUT,
        ],
        "too few rows to hold out data.eval_fraction=0.1",
        setup=write("two.csv", "text,label\ngood,pos\nbad,neg\n"),
    ),
    Case(
        "damaged adapter_config.json in a deltacli delta",
        evaluate(),
        "PEFT cannot load this delta",
        setup=delta_copy("delta", lambda d: (d / "adapter_config.json").write_text("{,")),
    ),
    Case(
        "weights that do not fit their config",
        lambda f, fx: ["train", "--method", "lora", *base(fx), "--model", f / "m", "-o", f / OUT],
        "has another shape than its config gives",
        setup=lambda f, fx: (
            shutil.copytree(fx["bert"], f / "m"),
            (f / "m" / "config.json").write_text(
                (f / "m" / "config.json")
                .read_text()
                .replace('"intermediate_size": 64', '"intermediate_size": 48')
            ),
        ),
    ),
    # faults once training runs
    Case(
        "diverging loss",
        train("train.lr=1e30", "train.max_steps=6", "train.max_grad_norm=null", "deltas.0.r=64"),
        "the training loss became nan at step",
        after_start=True,
    ),
]


@pytest.fixture(scope="module")
def fx(tiny_bert, sentiment, tmp_path_factory) -> dict:
    """What the cases start from: the tiny model and data, a trained LoRA and prefix delta,
    and a PEFT adapter."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from deltacli.training.runs import train as run_training
    from helpers import tiny_recipe

    folder = tmp_path_factory.mktemp("deltas")
    for kind in ("lora", "prefix"):
        recipe = tiny_recipe(tiny_bert, sentiment, {"kind": kind}, max_steps=1)
        run_training(recipe, folder / kind)
    peft = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert),
        LoraConfig(task_type=TaskType.SEQ_CLS, r=2),
    )
    peft.save_pretrained(folder / "peft")
    return {
        "bert": tiny_bert,
        "train": sentiment["train"],
        "eval": sentiment["eval"],
        "lora": folder / "lora",
        "prefix": folder / "prefix",
        "peft": folder / "peft",
    }


def check(code: int, err: str, case_code: int, message: str, after_start: bool) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if not after_start:
        assert len(lines) == 1, err
    assert code == case_code, err
    label = "interrupted" if case_code in (130, 143) else "error"
    assert lines[-1].startswith(f"{label}: "), err
    assert message in lines[-1], err
    assert sum(line.startswith(("error:", "interrupted:")) for line in lines) == 1


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(case, fx, cli, tmp_path):
    case.setup(tmp_path, fx)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli(*case.args(tmp_path, fx))
    check(code, err, case.code, case.message, case.after_start)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing appeared


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


def test_inspect_still_shows_a_delta_whose_metrics_are_damaged(fx, cli, tmp_path):
    shutil.copytree(fx["lora"], tmp_path / "delta")
    (tmp_path / "delta" / "metrics.json").write_text("{not json")
    code, out, err = cli("inspect", tmp_path / "delta")
    assert code == 0, err
    assert "unreadable" in out and "metrics.json is not valid JSON" in out
    assert "lora, head" in out  # what could be read is shown


def test_classification_texts_cut_at_max_length_are_counted(fx, cli, tmp_path):
    code, _, err = cli(*train("data.max_length=4")(tmp_path, fx))
    assert code == 0, err
    assert "examples were cut at data.max_length=4 tokens" in err


def test_disk_full_while_training_keeps_the_checkpoint(fx, cli, tmp_path, monkeypatch):
    """The disk fills as the trained delta is written: the run's last checkpoint survives,
    one line says where, and --resume finishes the run once there is room."""
    from deltacli.training import runs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "save_delta", full)
    args = train("train.max_steps=6", "train.save_every=2")(tmp_path, fx)
    code, _, err = cli(*args)
    check(
        code,
        err,
        2,
        "its last checkpoint is kept: free space and run deltacli train --resume",
        True,
    )
    assert not (tmp_path / OUT).exists()
    monkeypatch.undo()
    code, _, err = cli("train", "--resume", tmp_path / OUT)
    assert code == 0, err
    assert (tmp_path / OUT / MARKER).is_file()


@contextlib.contextmanager
def mounted(kind: str, target: Path, *options: str):
    """A tmpfs or read-only bind mount at `target` (skip where the machine refuses)."""
    target.mkdir(parents=True, exist_ok=True)
    command = {
        "tmpfs": ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(target)],
        "readonly": ["mount", "-o", "bind,ro", str(target), str(target)],
    }[kind]
    if shutil.which("mount") is None or subprocess.run(command, capture_output=True).returncode:
        pytest.skip(f"this machine does not allow a {kind} mount")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


def test_a_read_only_output_location_is_refused_before_any_work(fx, cli, tmp_path):
    with mounted("readonly", tmp_path / "ro") as folder:
        code, _, err = cli(*train()(folder, fx))
        check(code, err, 2, f"cannot write {folder / OUT}: {folder} is read-only", False)


def test_a_full_disk_during_merge_is_one_line_and_leaves_nothing(fx, cli, tmp_path):
    with mounted("tmpfs", tmp_path / "small", "size=48k") as folder:
        code, _, err = cli("merge", fx["bert"], fx["lora"], folder / OUT)
        check(code, err, 2, "no space left on the device while writing", True)
        assert list(folder.iterdir()) == []


def test_stale_scratch_folders_are_removed_and_said_to_be(fx, cli, tmp_path):
    """Hidden folders of killed runs (their process is gone) go; a live run's and one holding
    a checkpoint stay."""
    dead = tmp_path / f".{OUT}.tmp-999999999-deadbeef"
    (dead / "shard").mkdir(parents=True)
    (dead / "shard" / "big.safetensors").write_bytes(b"x" * 2**20)
    resumable = tmp_path / f".{OUT}.tmp-999999998-cafecafe"
    (resumable / "checkpoints" / "step-000002").mkdir(parents=True)
    code, _, err = cli("merge", fx["bert"], fx["lora"], tmp_path / OUT)
    assert code == 0, err
    assert not dead.exists() and resumable.exists()
    assert "removed 1 stale temporary folder(s)" in err and "(1.0 MB)" in err
    assert f"continue it with: deltacli train --resume {tmp_path / OUT}" in " ".join(err.split())
