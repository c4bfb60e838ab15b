"""Tables in, batches out: reading a file, a bundled sample or a Hub dataset into rows,
holding train and eval sets apart, fingerprinting what a run trains on, batching.

Data comes from a local csv/tsv/json/jsonl/parquet file, a sample bundled with deltacli
(`sst2:train`, `sst2:validation`, `sst2_chat:train` ...), or a Hub dataset `NAME[:SPLIT]`.
The `datasets` library does the reading; this module adds the checks that turn a wrong path
or a broken line into one line. Encoding is each task's (`classification`, `generation`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.resources
import json
import random
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader

from deltacli.config.sections import DataConfig, Source, Sources, source_list
from deltacli.errors import DeltacliError, first_line
from deltacli.tasks.conversations import alpaca_as_messages, as_messages, is_conversational

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()

# Columns computed from a model rather than read from the data (a preference run's reference
# log-probabilities): a resumed run computes them again, so they are not fingerprinted.
REFERENCE_COLUMNS = ("reference_chosen", "reference_rejected")

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def bundled_samples() -> dict[str, Path]:
    """`NAME:SPLIT` -> file, for the data samples shipped inside the package."""
    root = importlib.resources.files("deltacli.samples")
    return {
        f"{folder.name}:{Path(file.name).stem}": Path(str(file))
        for folder in root.iterdir()
        if folder.is_dir() and not folder.name.startswith("_")
        for file in folder.iterdir()
        if file.name.endswith((".tsv", ".jsonl"))
    }


def load_table(spec: str, hub_config: str | None = None) -> datasets.Dataset:
    """The rows of a file, bundled sample or Hub split, as a `datasets.Dataset`."""
    bundled = bundled_samples()
    path = bundled.get(spec) or Path(spec).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        raise DeltacliError(
            f"data {spec} is a directory; give a .csv/.tsv/.json/.jsonl/.parquet file"
        )
    if path.suffix in _BUILDERS:
        raise DeltacliError(f"data file {spec} does not exist")
    name, _, split = spec.partition(":")
    try:
        return datasets.load_dataset(name, hub_config, split=split or "train")
    except Exception as error:
        reason = first_line(error)
        raise DeltacliError(
            f"cannot load data {spec!r}: not a local file, not a bundled sample "
            f"({', '.join(sorted(bundled))}), and not a reachable Hub dataset ({reason})"
        ) from None


def _read_file(path: Path) -> datasets.Dataset:
    builder = _BUILDERS.get(path.suffix)
    if builder is None:
        raise DeltacliError(f"cannot read {path}: use a .csv, .tsv, .json, .jsonl or .parquet file")
    if builder != "parquet":
        _check_text(path)
    # GLUE-style TSV files hold unbalanced quotes that are text, not quoting.
    options = {"sep": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}
    try:
        table = datasets.load_dataset(
            builder, data_files=str(path), split="train", keep_in_memory=True, **options
        )
    except Exception as error:
        causes = [str(e).strip() for e in _chain(error) if str(e).strip()]
        raise DeltacliError(f"cannot read {path}: {causes[-1].splitlines()[0]}") from None
    if len(table) == 0:
        raise DeltacliError(f"{path} holds no rows (an empty file, or a header alone)")
    return table


def _check_text(path: Path) -> None:
    """Text data must be UTF-8, and JSON lines each a JSON object: say which line is not
    (the reader underneath reports a generic failure)."""
    if path.stat().st_size == 0:
        raise DeltacliError(f"{path} is empty")
    rows = 0
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            rows += bool(raw.strip())
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DeltacliError(
                    f"{path} line {number} is not UTF-8 text (byte {raw[error.start]:#04x} at "
                    f"column {error.start + 1}); save the file as UTF-8"
                ) from None
            if path.suffix == ".jsonl" and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as error:
                    raise DeltacliError(
                        f"{path} line {number} is not valid JSON (column {error.colno}: "
                        f"{error.msg})"
                    ) from None
    if rows <= (1 if path.suffix in (".csv", ".tsv") else 0):
        raise DeltacliError(f"{path} holds no rows (an empty file, or a header alone)")


def _chain(error: BaseException) -> list[BaseException]:
    """The exception and those it was raised from, outermost first."""
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def load_sources(sources: Sources, hub_config: str | None, seed: int) -> datasets.Dataset:
    """One table from a data setting: a single source as it is, several mixed as their
    weights say (rows repeated, or a seeded share drawn) and shuffled with `seed`."""
    items = source_list(sources)
    tables = [load_source(source, hub_config) for source in items]
    if len(items) == 1 and items[0].weight == 1:
        return tables[0]
    weighted = [_weighted(t, s, seed) for t, s in zip(tables, items, strict=True)]
    return _mixed(weighted, [s.path for s in items]).shuffle(seed=seed, keep_in_memory=True)


def load_source(source: Source, hub_config: str | None) -> datasets.Dataset:
    """One source's rows: capped at `rows`, its columns renamed to the recipe's, chat
    records in one shape (`conversations.as_messages`)."""
    table = load_table(source.path, hub_config)
    if source.rows is not None:
        table = table.select(range(min(source.rows, len(table))))
    missing = [c for c in source.columns if c not in table.column_names]
    if missing:
        raise DeltacliError(
            f"{source.path} has no column {missing[0]!r} to rename "
            f"(columns: {', '.join(table.column_names)})"
        )
    return as_messages(table.rename_columns(source.columns), source.path)


def _weighted(table: datasets.Dataset, source: Source, seed: int) -> datasets.Dataset:
    """`weight` × the rows: whole repeats, then a seeded draw for the fraction."""
    count = round(source.weight * len(table))
    if count == 0:
        raise DeltacliError(
            f"{source.path}: weight {source.weight:g} of {len(table)} row(s) leaves none"
        )
    repeats, extra = divmod(count, len(table))
    drawn = sorted(random.Random(seed).sample(range(len(table)), extra))
    return table.select(list(range(len(table))) * repeats + drawn)


def _mixed(tables: list[datasets.Dataset], names: list[str]) -> datasets.Dataset:
    """The sources' rows in one table, over the columns they share; Alpaca records become
    chat turns where they meet chat records."""
    if any(is_conversational(t) for t in tables):
        tables = [
            alpaca_as_messages(t) if {"instruction", "output"} <= set(t.column_names) else t
            for t in tables
        ]
    shared = [c for c in tables[0].column_names if all(c in t.column_names for t in tables)]
    if not shared:
        listed = "; ".join(
            f"{n}: {', '.join(t.column_names)}" for t, n in zip(tables, names, strict=True)
        )
        raise DeltacliError(f"the data sources share no column to mix ({listed})")
    first = tables[0].select_columns(shared)
    rest = []
    for table, name in zip(tables[1:], names[1:], strict=True):
        try:
            rest.append(table.select_columns(shared).cast(first.features))
        except (ValueError, TypeError) as error:
            raise DeltacliError(
                f"cannot mix {name} with {names[0]}: their columns hold different types "
                f"({first_line(error)})"
            ) from None
    return datasets.concatenate_datasets([first, *rest])


@dataclasses.dataclass
class Encoded:
    """A tokenised table, and how many of its examples were cut at `data.max_length`."""

    table: datasets.Dataset
    truncated: int


def data_fingerprint(table: datasets.Dataset) -> str:
    """A digest of a tokenised table's rows in order (Arrow IPC bytes): a resumed run checks
    that it trains on what the checkpoint saw (a row added or a label flipped changes it)."""
    import pyarrow as pa

    digest = hashlib.sha256()
    table = table.remove_columns([c for c in REFERENCE_COLUMNS if c in table.column_names])
    for batch in table.with_format("arrow").iter(batch_size=4096):
        batch = batch.replace_schema_metadata(None)  # datasets' own cache fingerprint
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_table(batch)
        digest.update(sink.getvalue().to_pybytes())
    return digest.hexdigest()


@dataclasses.dataclass
class TaskData:
    """Tokenised train and eval sets, and the label values in id order (classification)."""

    train: datasets.Dataset
    eval: datasets.Dataset
    labels: list | None
    truncated: int = 0  # examples cut at max_length
    prompts: list[tuple[str, str]] = dataclasses.field(
        default_factory=list
    )  # eval (prompt, reference)


def load_tables(config: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The train and eval tables of a recipe's data section; without eval data, a seeded
    share of the training rows is held out."""
    train = load_sources(config.train, config.hub_config, seed)
    if config.eval:
        evaluation = load_sources(config.eval, config.hub_config, seed)
    else:
        split = train.train_test_split(test_size=config.eval_fraction, seed=seed)
        train, evaluation = split["train"], split["test"]
    if config.max_train_rows is not None:
        train = train.select(range(min(config.max_train_rows, len(train))))
    return train, evaluation


def batches(
    table: datasets.Dataset,
    collate: Callable,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
) -> DataLoader:
    """Batches of an encoded table, padded by `collate` (the task's collator)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        table, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
    )
