"""Classification data: label values and their ids, tokenised texts (and pairs), what
truncation cut, and the padding collator."""

from __future__ import annotations

from collections.abc import Callable

import datasets
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from deltacli.config.sections import DataConfig, sources_name
from deltacli.errors import DeltacliError
from deltacli.tasks.tables import Encoded, TaskData


def prepare_classes(
    train: datasets.Dataset,
    evaluation: datasets.Dataset,
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    mask_prompt: bool,
) -> TaskData:
    """Classification: label ids from the training labels (sorted) unless the recipe fixes
    them, the same mapping for the eval set."""
    train_name, eval_name = sources_name(config.train), sources_name(config.eval or config.train)
    train = _with_columns(train, config, train_name)
    evaluation = _with_columns(evaluation, config, eval_name)
    try:
        labels = config.labels or label_values(train, config.label)
    except DeltacliError as error:
        if config.eval or "fewer than two" not in str(error):
            raise
        raise DeltacliError(
            f"{train_name} has too few rows to hold out data.eval_fraction="
            f"{config.eval_fraction} for evaluation ({len(evaluation)} held out, "
            f"{len(train)} left with fewer than two distinct labels); give --eval-data, or "
            "more rows"
        ) from None
    encoded = [
        encode(table, tokenizer, config, labels, source)
        for table, source in ((train, train_name), (evaluation, eval_name))
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
