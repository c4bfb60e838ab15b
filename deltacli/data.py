"""Examples in, token ids out: loading tables, mapping labels, tokenising, batching.

Data comes from a local csv/tsv/json/jsonl/parquet file, a sample bundled with deltacli
(`sst2:train`, `sst2:validation`, `sst2_instruct:train` ...), or a Hub dataset
`NAME[:SPLIT]`. The `datasets` library does the reading; this module adds the checks that turn
a wrong column or path into one line, and encodes classification data (generative tasks
encode through `lm_data`; the task registry says which is which).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.resources
import json
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from deltacli.errors import DeltacliError
from deltacli.settings import DataConfig

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()

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
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
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
    train = load_table(config.train, config.hub_config)
    if config.eval:
        evaluation = load_table(config.eval, config.hub_config)
    else:
        split = train.train_test_split(test_size=config.eval_fraction, seed=seed)
        train, evaluation = split["train"], split["test"]
    if config.max_train_rows is not None:
        train = train.select(range(min(config.max_train_rows, len(train))))
    return train, evaluation


def prepare_classes(
    train: datasets.Dataset,
    evaluation: datasets.Dataset,
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    mask_prompt: bool,
) -> TaskData:
    """Classification: label ids from the training labels (sorted) unless the recipe fixes
    them, the same mapping for the eval set."""
    train = _with_columns(train, config, config.train)
    evaluation = _with_columns(evaluation, config, config.eval or config.train)
    try:
        labels = config.labels or label_values(train, config.label)
    except DeltacliError as error:
        if config.eval or "fewer than two" not in str(error):
            raise
        raise DeltacliError(
            f"{config.train} has too few rows to hold out data.eval_fraction="
            f"{config.eval_fraction} for evaluation ({len(evaluation)} held out, "
            f"{len(train)} left with fewer than two distinct labels); give --eval-data, or "
            "more rows"
        ) from None
    encoded = [
        encode(table, tokenizer, config, labels, source)
        for table, source in ((train, config.train), (evaluation, config.eval or config.train))
    ]
    return TaskData(
        train=encoded[0].table,
        eval=encoded[1].table,
        labels=labels,
        truncated=encoded[0].truncated + encoded[1].truncated,
    )


def classes_for_scoring(
    table: datasets.Dataset, config: DataConfig, tokenizer: PreTrainedTokenizerBase, source: str
) -> tuple[datasets.Dataset, list]:
    """One tokenised table to score a trained model on, and the labels in id order: the
    model's (`config.labels`) or, for a model that saved none (a PEFT adapter), the sorted
    values found in the table."""
    table = _with_columns(table, config, source)
    labels = config.labels or label_values(table, config.label)
    return encode(table, tokenizer, config, labels, source).table, labels


def _with_columns(table: datasets.Dataset, config: DataConfig, source: str) -> datasets.Dataset:
    """The table with its label column as plain values, after checking the columns exist."""
    wanted = [("text", config.text), ("label", config.label)]
    if config.text_pair:
        wanted.append(("text_pair", config.text_pair))
    for key, column in wanted:
        if column not in table.column_names:
            raise DeltacliError(
                f"{source} has no column {column!r} (columns: {', '.join(table.column_names)}); "
                f"set data.{key}=COLUMN"
            )
    feature = table.features[config.label]
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names
        table = table.map(
            lambda batch: {config.label: [names[i] for i in batch[config.label]]},
            batched=True,
            features=datasets.Features({**table.features, config.label: datasets.Value("string")}),
            keep_in_memory=True,
        )
    return table


def label_values(table: datasets.Dataset, column: str) -> list:
    """The distinct labels in id order: sorted values, so that 0/1 columns keep their ids."""
    values = set(table[column])
    if None in values:
        raise DeltacliError(f"column {column!r} has rows without a label")
    if any(isinstance(v, float) and not v.is_integer() for v in values):
        raise DeltacliError(
            f"column {column!r} holds fractional numbers; regression is not supported"
        )
    values = {int(v) if isinstance(v, float) else v for v in values}
    if len({type(v) for v in values}) > 1:
        values = {str(v) for v in values}
    if len(values) < 2:
        raise DeltacliError(f"column {column!r} has fewer than two distinct labels")
    return sorted(values)


def encode(
    table: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    labels: list,
    source: str,
) -> Encoded:
    """Token ids, attention masks and label ids; the text columns are dropped."""
    ids = {label: i for i, label in enumerate(labels)}
    ids.update({str(label): i for i, label in enumerate(labels)})

    def label_id(value) -> int:
        key = int(value) if isinstance(value, float) and value.is_integer() else value
        if key not in ids:
            raise DeltacliError(
                f"{source} has label {value!r}, which the model does not know "
                f"(labels: {', '.join(map(str, labels))})"
            )
        return ids[key]

    truncated = 0

    def tokenize(batch: dict) -> dict:
        nonlocal truncated
        texts = [_as_text(t) for t in batch[config.text]]
        pairs = [_as_text(t) for t in batch[config.text_pair]] if config.text_pair else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=config.max_length)
        truncated += _cut(tokenizer, encoded, texts, pairs, config.max_length)
        encoded["labels"] = [label_id(v) for v in batch[config.label]]
        return encoded

    encoded = table.map(
        tokenize, batched=True, remove_columns=table.column_names, keep_in_memory=True
    )
    return Encoded(encoded, truncated)


def _as_text(value: object) -> str:
    """A cell of a text column as text: a column of digits is read as numbers, an empty
    cell as None."""
    return "" if value is None else str(value)


def _cut(tokenizer, encoded, texts: list[str], pairs: list[str] | None, limit: int) -> int:
    """How many examples of a batch truncation shortened. A fast tokenizer keeps what it cut
    (`overflowing`); a slow one is asked again, untruncated, for the rows that hit the limit."""
    if encoded.encodings is not None:
        return sum(bool(e.overflowing) for e in encoded.encodings)
    full = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) >= limit]
    if not full:
        return 0
    again = tokenizer(
        [texts[i] for i in full], [pairs[i] for i in full] if pairs else None, verbose=False
    )
    return sum(len(ids) > limit for ids in again["input_ids"])


def pad_classes(tokenizer: PreTrainedTokenizerBase, table: datasets.Dataset) -> Callable:
    """Classification batches: token ids padded to the longest example of the batch."""
    return DataCollatorWithPadding(tokenizer)


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
