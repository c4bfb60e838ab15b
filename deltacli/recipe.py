"""Recipes: what to train, on what, with which deltas, as validated data.

A recipe is a YAML file (`recipes/*.yaml` ship with the package; `--recipe FILE` takes any
other) plus `key=value` overrides on dotted paths (`train.lr=1e-4`, `deltas.0.r=16`). Loading
checks every key and type before any weights are read, so a typo costs a second, not a run.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from deltacli.config.schema import KeyHelp, build, describe, option, to_dict
from deltacli.config.sections import DataConfig, Sources, TrainConfig, source_list
from deltacli.deltas import KINDS, DeltaConfig, kind_class
from deltacli.errors import DeltacliError, did_you_mean
from deltacli.files.text import read_mapping
from deltacli.tasks.registry import DEFAULT, TASKS, Task, task

# A `#` at the start or after a space begins a YAML comment (`data.text=#1 String`).
_YAML_COMMENT = re.compile(r"(^|\s)#")


@dataclasses.dataclass
class Recipe:
    name: str = option("custom", "a label for the run; the recipe's file name by default")
    model: str = option(
        "default", "a local Hugging Face directory, a Hub id, or `default` (the embedded model)"
    )
    task: str = option(DEFAULT, f"what the model learns to do: {', '.join(TASKS)}")
    head: bool = option(True, "train the task head (e.g. `classifier`) beside the deltas")
    base_dtype: Literal["auto", "fp32", "bf16", "fp16", "fp64"] = option(
        "auto",
        "dtype of the frozen base; auto: the checkpoint's (bf16/fp16) on a GPU that has it, "
        "fp32 on a CPU. Deltas train in fp32 over a bf16/fp16 base",
    )
    quantize: Literal["nf4", "int8"] | None = option(
        None, "load the base's linear layers in 4 bits (NF4, QLoRA) or 8 bits (bitsandbytes)"
    )
    attention: Literal[
        "auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = option(
        "auto",
        "the attention kernel; auto: transformers' choice (sdpa where the model has it). "
        "flash_attention_2/3 (a CUDA GPU and the flash-attn package) run packed rows as "
        "variable-length sequences without a mask",
    )
    data: DataConfig = option(DataConfig(), "where the examples come from")
    deltas: list[DeltaConfig] = option([], "the deltas to attach, in order; they compose")
    train: TrainConfig = option(TrainConfig(), "optimisation")

    def __post_init__(self) -> None:
        if not self.deltas:
            raise DeltacliError("the recipe lists no deltas; add one, e.g. deltas: [{kind: lora}]")
        entry = task(self.task)
        if self.train.best_metric == "auto":
            self.train.best_metric = entry.metrics[0]
        elif self.train.best_metric not in entry.metrics:
            raise DeltacliError(
                f"train.best_metric for {self.task} must be one of {', '.join(entry.metrics)} "
                f"(or auto); got {self.train.best_metric!r}"
            )
        if self.train.sft_weight and self.train.loss == "orpo":
            raise DeltacliError(
                "train.sft_weight adds an SFT term, which orpo already has; leave it at 0"
            )
        if self.train.loss != "auto" and not entry.pairs:
            raise DeltacliError(
                f"train.loss={self.train.loss} is a preference loss; set task: preference "
                f"(the {self.task} task has its own loss: leave train.loss at auto)"
            )

    @property
    def task_entry(self) -> Task:
        """The registry's entry for this recipe's task."""
        return task(self.task)


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with deltacli, by name (`--method NAME`)."""
    folder = importlib.resources.files("deltacli.recipes")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def recipe_keys(name: str | None = None) -> list[KeyHelp]:
    """Every key a recipe takes, from the schema itself: the recipe's own and its sections',
    then `deltas.N.*` for the kinds of `name` (a delta kind, or a shipped recipe's deltas),
    or for every kind without it (each key's help then starts with its kind)."""
    listed = describe(Recipe, skip=("deltas",))
    if name is None:
        common = describe(DeltaConfig, "deltas.N.")  # what every kind takes (lr, init_from)
        shared = {key.key for key in common}
        listed += common
        for kind in sorted(KINDS):
            for key in describe(kind_class(kind).config_class, "deltas.N."):
                if key.key not in shared:
                    listed.append(dataclasses.replace(key, help=f"{kind}: {key.help}"))
        return listed
    if name in KINDS:
        kinds = [kind_class(name).config_class]
    elif name in shipped_recipes():
        kinds = [type(config) for config in load_recipe(recipe_file(name, None)).deltas]
    else:
        raise DeltacliError(
            f"{name!r} is neither a delta kind ({', '.join(sorted(KINDS))}) nor a shipped "
            f"recipe{did_you_mean(name, [*KINDS, *shipped_recipes()])}"
        )
    for index, config_class in enumerate(kinds):
        listed += describe(config_class, f"deltas.{index}.")
    return listed


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


def load_recipe(
    file: Path, overrides: list[str] = (), settings: dict[str, Any] | None = None
) -> Recipe:
    """The validated recipe in `file` with typed `settings` (dotted key -> value, from
    command-line options) and then `key=value` text overrides applied."""
    raw = read_mapping(file, "recipe keys") if file.read_bytes().strip() else {}
    raw.setdefault("name", file.stem)
    for key, value in (settings or {}).items():
        set_value(raw, key, value)
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
    recipe = build(Recipe, raw, prebuilt={"deltas": deltas})
    _check_name(recipe.name)
    return recipe


def _check_name(name: str) -> None:
    """The name labels the run and names its folder under runs/: a path (`../x`, `/tmp/x`)
    would put the run elsewhere, so it is refused."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise DeltacliError(
            f"name must be a plain label (no slash or backslash), got {name!r}; "
            "use -o to choose where the run is written"
        )


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set a dotted `key=value` in the raw recipe; the value is read as YAML (`[q, v]`, `null`)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise DeltacliError(f"override {override!r} must look like key=value, e.g. train.lr=1e-4")
    if _YAML_COMMENT.search(text):
        raise DeltacliError(
            f"in {override!r}, YAML reads everything from '#' on as a comment; to set the "
            f"text, quote it: '{key}=\"{text}\"'"
        )
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    set_value(raw, key, value)


def set_value(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` of the raw recipe to `value` as it is (no parsing): what typed
    command-line options use, so a path or a pattern arrives exactly as typed."""
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
    """The recipe as a saved file: local paths (the model, the data files) absolute, so that
    a command run from another folder reads the same base and data, or says it is gone,
    instead of quietly using whatever the relative path names there."""
    data = recipe.data
    saved = dataclasses.replace(
        recipe,
        model=_absolute(recipe.model),
        data=dataclasses.replace(
            data, train=_absolute_sources(data.train), eval=_absolute_sources(data.eval)
        ),
    )
    return yaml.safe_dump(recipe_to_dict(saved), sort_keys=False)


def _absolute_sources(sources: Sources | None) -> Sources | None:
    if sources is None or isinstance(sources, str):
        return sources and _absolute(sources)
    return [dataclasses.replace(s, path=_absolute(s.path)) for s in source_list(sources)]


def _absolute(spec: str) -> str:
    """`spec` as an absolute path where it names something on disk, else as it is (a Hub
    id, a bundled sample, an embedded model)."""
    path = Path(spec).expanduser()
    return str(path.absolute()) if path.exists() else spec
