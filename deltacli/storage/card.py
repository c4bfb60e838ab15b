"""The model card (`README.md`) every saved delta carries, as PEFT's `save_pretrained` writes
one: what it is, what it was trained on, how well it did epoch by epoch, its labels in id
order, and the lines that load it (with PEFT, where PEFT has the method, naming the labels so
a PEFT user does not get `LABEL_0`)."""

from __future__ import annotations

from pathlib import Path

from deltacli import __version__
from deltacli.config.schema import to_dict
from deltacli.config.sections import sources_name
from deltacli.recipe import Recipe
from deltacli.tasks.metrics import METRICS

CARD_FILE = "README.md"
# Metrics a card's history table shows, in order, with the exact names every table uses.
_COLUMNS = {"loss": "loss", **{name: m.display for name, m in METRICS.items()}}


def model_card(recipe: Recipe, metrics: dict | None, peft: dict | None, home: Path | None) -> str:
    """The card's Markdown. `home` is where the delta will live (the snippets load it from
    there); `peft` its PEFT config, if PEFT has the method."""
    kinds = ", ".join(config.kind for config in recipe.deltas)
    where = str(home) if home is not None else "path/to/this/folder"
    lines = ["---"]
    if peft is not None:
        lines.append("library_name: peft")
    lines += [
        f"base_model: {recipe.model}",
        "tags: [deltacli, " + ", ".join(config.kind for config in recipe.deltas) + "]",
        "---",
        "",
        f"# {recipe.name}: a {kinds} delta for `{recipe.model}`",
        "",
        f"Trained with [deltacli](https://pypi.org/project/deltacli/) {__version__}. "
        "The full recipe is in `recipe.yaml`, every figure in `metrics.json`.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in _facts(recipe, metrics or {})),
        "",
    ]
    if metrics and metrics.get("history"):
        lines += _history(metrics["history"])
    lines += ["## Load it", ""]
    if peft is not None:
        lines += _peft_snippet(recipe, peft["base_model_name_or_path"], where)
    lines += _deltacli_snippet(where)
    return "\n".join(lines) + "\n"


def _facts(recipe: Recipe, metrics: dict) -> list[tuple[str, str]]:
    """The card's summary rows: what was trained, on what, with which labels."""
    facts = [("task", recipe.task)]
    facts += [("delta", _settings(config)) for config in recipe.deltas]
    if "params" in metrics:
        facts.append(("trains", _share(metrics["params"])))
    facts.append(
        (
            "data",
            f"train: `{sources_name(recipe.data.train)}`; "
            f"eval: `{sources_name(recipe.data.eval) if recipe.data.eval else 'held out'}`",
        )
    )
    if recipe.data.labels:
        facts.append(("labels (id order)", _labels(recipe.data.labels)))
    if "best_epoch" in metrics:
        facts.append(("best epoch", str(metrics["best_epoch"])))
    return facts


def _settings(config) -> str:
    fields = {k: v for k, v in to_dict(config).items() if k != "kind" and v is not None}
    return f"{config.kind} (" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + ")"


def _share(params: dict) -> str:
    return (
        f"{params['trainable']:,} of {params['total']:,} parameters "
        f"({params['trainable_percent']:.3f}%)"
    )


def _labels(labels: list) -> str:
    return ", ".join(f"{i}: `{label}`" for i, label in enumerate(labels))


def _history(history: list[dict]) -> list[str]:
    shown = [key for key in _COLUMNS if key in history[0]]
    names = [_COLUMNS[key].format(**history[0]) for key in shown]
    lines = ["## Metrics per epoch (eval set)", "", "| epoch | step | " + " | ".join(names) + " |"]
    lines.append("|---" * (2 + len(shown)) + "|")
    for row in history:
        values = " | ".join(f"{row[key]:.4f}" for key in shown)
        lines.append(f"| {row['epoch']} | {row['step']} | {values} |")
    return [*lines, ""]


def _peft_snippet(recipe: Recipe, base: str, where: str) -> list[str]:
    """PEFT's loading lines, from the base as PEFT names it (a path or a Hub id, never
    deltacli's `default`)."""
    model_class = recipe.task_entry.model_class.__name__
    lines = ["With PEFT:", "", "```python", "from peft import PeftModel"]
    lines.append(f"from transformers import {model_class}")
    lines.append("")
    if recipe.data.labels is not None and not recipe.task_entry.generative:
        labels = [str(label) for label in recipe.data.labels]
        lines += [
            f"labels = {labels!r}  # in id order",
            f"base = {model_class}.from_pretrained(",
            f"    {base!r},",
            "    num_labels=len(labels),",
            "    id2label=dict(enumerate(labels)),",
            "    label2id={label: i for i, label in enumerate(labels)},",
            ")",
        ]
    else:
        lines.append(f"base = {model_class}.from_pretrained({base!r})")
    lines += [f"model = PeftModel.from_pretrained(base, {where!r})", "```", ""]
    return lines


def _deltacli_snippet(where: str) -> list[str]:
    return [
        "With deltacli (every kind, PEFT's or not):",
        "",
        "```python",
        "from pathlib import Path",
        "",
        "from deltacli.build import prepare_model",
        "from deltacli.storage.delta_folder import read_delta",
        "",
        f"saved = read_delta(Path({where!r}))",
        "model, deltas = prepare_model(saved.recipe)",
        "saved.load_into(deltas)",
        "```",
        "",
        f"or from the shell: `deltacli eval --delta {where} --data DATA`, "
        f"`deltacli merge BASE {where} OUT`.",
    ]
