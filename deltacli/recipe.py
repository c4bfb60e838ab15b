"""Recipes: what to train, on what, with which deltas, as validated data.

A recipe is a YAML file (`recipes/*.yaml` ship with the package; `--recipe FILE` takes any
other) plus `key=value` overrides on dotted paths (`train.lr=1e-4`, `deltas.0.r=16`). Loading
checks every key and type before any weights are read, so a typo costs a second, not a run.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Any, Literal

import yaml

from deltacli.deltas import DeltaConfig, kind_class
from deltacli.errors import DeltacliError, did_you_mean
from deltacli.schema import build, option, to_dict

Task = Literal["sequence-classification", "causal-lm", "seq2seq"]
GENERATIVE = ("causal-lm", "seq2seq")
Metric = Literal["auto", "accuracy", "macro_f1", "mcc", "loss"]


def _positive(path: str, value: float) -> None:
    if value <= 0:
        raise DeltacliError(f"{path} must be positive, got {value}")


@dataclasses.dataclass
class DataConfig:
    train: str = option(
        "sst2:train",
        "training data: a csv/tsv/json/jsonl/parquet file, a bundled sample (sst2:train) "
        "or a Hub dataset NAME[:SPLIT]",
    )
    eval: str | None = option(
        "sst2:validation", "evaluation data, same forms; null: hold out eval_fraction of train"
    )
    eval_fraction: float = option(0.1, "share of train held out for evaluation when eval is null")
    hub_config: str | None = option(None, "configuration name of a Hub dataset (e.g. sst2)")
    text: str = option("sentence", "column holding the text (seq2seq: the source)")
    text_pair: str | None = option(None, "column holding the second text of sentence pairs")
    label: str = option("label", "column holding the label")
    target: str = option("target", "seq2seq: column holding the target text")
    format: Literal["auto", "alpaca", "chat", "text"] = option(
        "auto", "causal-lm records: alpaca, chat (messages) or text; auto: from the columns"
    )
    packing: bool = option(False, "causal-lm: pack examples into rows of max_length tokens")
    labels: list[int | str] | None = option(
        None, "label values in id order; null: the sorted values found in the training data"
    )
    max_length: int = option(128, "tokens per example; longer examples are truncated")
    max_train_rows: int | None = option(None, "train on the first N rows only; null: all")

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise DeltacliError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        _positive("data.max_length", self.max_length)


@dataclasses.dataclass
class TrainConfig:
    epochs: float = option(3.0, "passes over the training data")
    max_steps: int | None = option(None, "stop after this many optimizer steps; null: epochs")
    batch_size: int = option(32, "examples per step and process, before accumulation")
    eval_batch_size: int = option(64, "examples per evaluation batch")
    grad_accum: int = option(1, "batches whose gradients add up to one optimizer step")
    lr: float = option(5.0e-4, "peak learning rate of AdamW")
    weight_decay: float = option(0.01, "AdamW weight decay, applied to matrices only")
    warmup_ratio: float = option(0.06, "share of steps spent warming the learning rate up")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this; null: no clipping")
    seed: int = option(42, "seed for initialisation, shuffling and dropout")
    log_every: int = option(10, "optimizer steps between lines of metrics.jsonl")
    keep_best: bool = option(True, "save the epoch with the best eval metric, not the last")
    best_metric: Metric = option(
        "auto", "metric that picks the best epoch; auto: accuracy, or loss for generation"
    )
    mask_prompt: bool = option(True, "causal-lm: the loss sees only the responses")
    gradient_checkpointing: bool = option(False, "recompute activations to save memory")
    preview: int = option(0, "generative tasks: show this many eval generations before/after")
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "autocast precision passed to accelerate (GPU; the CPU runs fp32)"
    )
    cpu: bool = option(False, "train on the CPU even where an accelerator is present")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "lr", "log_every"):
            _positive(f"train.{name}", getattr(self, name))
        if self.max_steps is not None:
            _positive("train.max_steps", self.max_steps)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise DeltacliError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.preview < 0:
            raise DeltacliError(f"train.preview must be 0 or more, got {self.preview}")


@dataclasses.dataclass
class Recipe:
    name: str = option("custom", "a label for the run; the recipe's file name by default")
    model: str = option(
        "default", "a local Hugging Face directory, a Hub id, or `default` (the embedded model)"
    )
    task: Task = option("sequence-classification", "what the model learns to do")
    head: bool = option(True, "train the task head (e.g. `classifier`) beside the deltas")
    data: DataConfig = option(DataConfig(), "where the examples come from")
    deltas: list[DeltaConfig] = option([], "the deltas to attach, in order; they compose")
    train: TrainConfig = option(TrainConfig(), "optimisation")

    def __post_init__(self) -> None:
        if not self.deltas:
            raise DeltacliError("the recipe lists no deltas; add one, e.g. deltas: [{kind: lora}]")
        generative = self.task in GENERATIVE
        if self.train.best_metric == "auto":
            self.train.best_metric = "loss" if generative else "accuracy"
        if generative and self.train.best_metric != "loss":
            raise DeltacliError(f"train.best_metric for {self.task} must be loss (or auto)")


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with deltacli, by name (`--method NAME`)."""
    folder = importlib.resources.files("deltacli.recipes")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def recipe_file(method: str | None, path: Path | None) -> Path:
    """The YAML file behind `--method NAME` or `--recipe FILE`."""
    if method and path:
        raise DeltacliError("give either --method or --recipe, not both")
    if path:
        if not path.is_file():
            raise DeltacliError(f"recipe file {path} does not exist")
        return path
    shipped = shipped_recipes()
    if not method:
        raise DeltacliError(f"give --method ({', '.join(sorted(shipped))}) or --recipe FILE")
    if method not in shipped:
        raise DeltacliError(
            f"unknown method {method!r}{did_you_mean(method, list(shipped))}; "
            f"shipped methods: {', '.join(sorted(shipped))}"
        )
    return shipped[method]


def load_recipe(file: Path, overrides: list[str] = ()) -> Recipe:
    """The validated recipe in `file` with `key=value` overrides applied."""
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise DeltacliError(f"{file} is not valid YAML: {error}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise DeltacliError(f"{file} must hold a mapping of recipe keys")
    raw.setdefault("name", file.stem)
    for override in overrides:
        apply_override(raw, override)
    return parse_recipe(raw)


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    """A `Recipe` from plain data (a parsed YAML file or a saved `recipe.yaml`)."""
    raw = dict(raw)
    items = raw.pop("deltas", [])
    if not isinstance(items, list):
        raise DeltacliError("deltas must be a list, e.g. deltas: [{kind: lora, r: 8}]")
    deltas = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "kind" not in item:
            raise DeltacliError(f"deltas.{i} must be a mapping with a `kind`, e.g. {{kind: lora}}")
        fields = {k: v for k, v in item.items() if k != "kind"}
        deltas.append(build(kind_class(item["kind"]).config_class, fields, f"deltas.{i}"))
    return build(Recipe, raw, prebuilt={"deltas": deltas})


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set a dotted `key=value` in the raw recipe; the value is read as YAML (`[q, v]`, `null`)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise DeltacliError(f"override {override!r} must look like key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    *parents, last = key.split(".")
    node: Any = raw
    walked = []
    for part in parents:
        walked.append(part)
        node = _child(node, part, ".".join(walked), create=True)
    if isinstance(node, list):
        index = _index(node, last, key, allow_append=False)
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise DeltacliError(f"cannot set {key!r}: {'.'.join(parents)} is not a mapping")


def _child(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        index = _index(node, part, path, allow_append=create)
        if index == len(node):
            node.append({})
        return node[index]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = [] if part == "deltas" else {}
        return node[part]
    raise DeltacliError(f"cannot set {path!r}: its parent is not a mapping")


def _index(node: list, part: str, path: str, allow_append: bool) -> int:
    try:
        index = int(part)
    except ValueError:
        raise DeltacliError(f"{path!r}: expected a list index, got {part!r}") from None
    limit = len(node) + (1 if allow_append else 0)
    if not 0 <= index < limit:
        raise DeltacliError(f"{path!r} is out of range: the list has {len(node)} item(s)")
    return index


def with_mask(recipe: Recipe, mask: str) -> Recipe:
    """The recipe with `mask` set on every delta that takes one (sparse kinds)."""
    takes = [d for d in recipe.deltas if "mask" in {f.name for f in dataclasses.fields(d)}]
    if not takes:
        raise DeltacliError("--mask needs a delta that takes index masks, e.g. kind: sift")
    deltas = [dataclasses.replace(d, mask=mask) if d in takes else d for d in recipe.deltas]
    return dataclasses.replace(recipe, deltas=deltas)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data, ready for `recipe.yaml`."""
    return to_dict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
