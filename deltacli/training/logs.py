"""What a run reports as it goes: the JSON-lines log (and the experiment trackers that get
the same figures, through accelerate), and the live progress display."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from deltacli.errors import DeltacliError


class MetricsLog:
    """JSON lines of training figures, written by the main process only; the same figures
    go to the experiment trackers the recipe names (through accelerate)."""

    def __init__(self, path: Path | None, accelerator: Accelerator | None = None) -> None:
        self.file = path.open("a", encoding="utf-8") if path else None
        self.accelerator = accelerator

    def write(self, **record) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.accelerator is not None and self.accelerator.trackers:
            scores = record.get("eval", {})
            values = {f"eval/{k}": v for k, v in scores.items() if isinstance(v, int | float)}
            values |= {f"train/{k}": record[k] for k in ("loss", "lr") if k in record}
            self.accelerator.log(values, step=record["step"])

    def size(self) -> int:
        return self.file.tell() if self.file else 0

    def close(self) -> None:
        if self.file:
            self.file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StepFields(ProgressColumn):
    """A training bar's loss, learning rate and speed; nothing for bars without them (a
    sweep's overall bar shares the display)."""

    def render(self, task) -> Text:
        fields = task.fields
        if "loss" not in fields:
            return Text("")
        return Text(
            f"loss {fields['loss']:.4f}  lr {fields['lr']:.2e}  {fields['speed']:.0f} samples/s"
        )


def progress_bars(console: Console | None) -> Progress:
    """The live display of training (and of a sweep around it)."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        StepFields(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
    )


def trackers(names: list[str]) -> list[str] | None:
    """The trackers to hand accelerate, each checked to be installed."""
    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise DeltacliError(
                f"unknown tracker {name!r} in train.report_to; accelerate knows "
                f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}"
            )
        if name not in available:
            raise DeltacliError(
                f"train.report_to names {name}, which is not installed: pip install {name}"
            )
    return list(names) or None


def flat_config(data: dict, prefix: str = "") -> dict:
    """A nested recipe as flat `a.b` keys of plain values (what trackers take as config)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = (
                value if isinstance(value, int | float | str | bool) else str(value)
            )
    return flat
