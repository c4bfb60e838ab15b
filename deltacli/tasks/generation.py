"""Examples for generative tasks: instruction, chat and plain-text records for causal LMs,
source/target pairs for encoder-decoders; which tokens the loss sees; packing.

Records are rendered to text with the segments the model should learn marked by character
span, tokenised once with offsets, and every token whose text starts inside a learned span
keeps its label; the rest get -100. So the mask follows the tokens the model actually sees,
whatever the template and however the tokenizer merges across a boundary.

Formats (`data.format`, detected from the columns by default):
- `alpaca`: `instruction`, optional `input`, `output`, in the Alpaca prompt below;
- `chat`: `messages` as [{role, content}] (ShareGPT `conversations` arrive mapped to it, see
  `conversations`), rendered by the tokenizer's chat template (or the plain template below
  where it has none); every assistant turn is learned, or the last only
  (`data.train_on: last_assistant`);
- `text`: `text`, all of it learned (continued pre-training).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, default_data_collator

from deltacli.config.sections import DataConfig
from deltacli.errors import DeltacliError
from deltacli.labels import IGNORE
from deltacli.tasks.tables import Encoded, TaskData

# (table, tokenizer, data config, mask_prompt) -> token ids and labels
Encoder = Callable[[datasets.Dataset, PreTrainedTokenizerBase, DataConfig, bool], Encoded]
# (table, data config, tokenizer) -> (prompt, reference) pairs
Prompter = Callable[[datasets.Dataset, DataConfig, PreTrainedTokenizerBase], list]

ALPACA = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
# For tokenizers without a chat template: one `<|role|>` line before each message.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def detect_format(columns: list[str], requested: str) -> str:
    """The record format: as requested, or guessed from the columns."""
    if requested != "auto":
        needed = {"alpaca": {"instruction", "output"}, "chat": {"messages"}, "text": {"text"}}
        missing = needed[requested] - set(columns)
        if missing:
            raise DeltacliError(
                f"data.format={requested} needs the column(s) {', '.join(sorted(missing))} "
                f"(columns: {', '.join(columns)})"
            )
        return requested
    for fmt, needed in (
        ("chat", {"messages"}),
        ("alpaca", {"instruction", "output"}),
        ("text", {"text"}),
    ):
        if needed <= set(columns):
            return fmt
    raise DeltacliError(
        "cannot tell the record format from the columns "
        f"({', '.join(columns)}): expected messages, instruction + output, or text"
    )


def render(
    record: dict, fmt: str, tokenizer: PreTrainedTokenizerBase, last_turn_only: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The record as text, and the character spans the model learns (of a conversation:
    every assistant turn, or the last only)."""
    if fmt == "text":
        text = record["text"] + (tokenizer.eos_token or "")
        return text, [(0, len(text))]
    if fmt == "alpaca":
        prompt = alpaca_prompt(record)
        answer = record["output"] + (tokenizer.eos_token or "")
        return prompt + answer, [(len(prompt), len(prompt) + len(answer))]
    messages = record["messages"]
    text = chat_text(tokenizer, messages)
    spans = []
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    for i in turns[-1:] if last_turn_only else turns:
        before = chat_text(tokenizer, messages[:i], generation_prompt=True)
        through = chat_text(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DeltacliError(
                "the tokenizer's chat template does not render a conversation as a prefix of "
                "its continuation; deltacli cannot tell the assistant's tokens apart"
            )
        spans.append((len(before), len(through)))
    return text, spans


def alpaca_prompt(record: dict) -> str:
    if record.get("input"):
        return ALPACA_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA.format(instruction=record["instruction"])


def chat_text(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False
) -> str:
    if not messages and not generation_prompt:
        return ""
    template = tokenizer.chat_template or PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def encode_causal(
    table: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    mask_prompt: bool,
) -> Encoded:
    """input_ids, attention_mask and labels (-100 outside the learned spans if `mask_prompt`),
    cut at `max_length`; packed into rows of `max_length` if `config.packing`."""
    if not tokenizer.is_fast:
        raise DeltacliError("causal-lm data needs a fast tokenizer (one with offsets)")
    fmt = detect_format(table.column_names, config.format)
    truncated = 0

    def tokenize(batch: dict) -> dict:
        nonlocal truncated
        records = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        last_only = config.train_on == "last_assistant"
        rendered = [render(record, fmt, tokenizer, last_only) for record in records]
        encoded = tokenizer([text for text, _ in rendered], return_offsets_mapping=True)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for (_, spans), ids, offsets in zip(
            rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            labels = [
                token if not mask_prompt or _learned(start, end, spans) else IGNORE
                for token, (start, end) in zip(ids, offsets, strict=True)
            ]
            if len(ids) > config.max_length:
                truncated += 1
            out["input_ids"].append(ids[: config.max_length])
            out["attention_mask"].append([1] * min(len(ids), config.max_length))
            out["labels"].append(labels[: config.max_length])
        return out

    encoded = table.map(
        tokenize, batched=True, remove_columns=table.column_names, keep_in_memory=True
    )
    if config.packing:
        encoded = pack(encoded, config.max_length)
    return Encoded(encoded, truncated)


def _learned(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return end > start and any(low <= start < high for low, high in spans)


def pack(table: datasets.Dataset, length: int) -> datasets.Dataset:
    """Concatenate examples into rows of exactly `length` tokens. Positions restart at every
    example, and the rows carry no `attention_mask`: transformers builds the block-diagonal
    causal mask from `position_ids` only when no mask is passed (an all-ones mask would let
    every example see the ones before it). Each example's first label is dropped so that no
    loss crosses from one example into the next. The last, partial row is dropped."""
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    ids, labels, positions = [], [], []
    for example_ids, example_labels in zip(table["input_ids"], table["labels"], strict=True):
        ids += example_ids
        labels += [IGNORE, *example_labels[1:]]
        positions += list(range(len(example_ids)))
        while len(ids) >= length:
            rows["input_ids"].append(ids[:length])
            rows["labels"].append(labels[:length])
            rows["position_ids"].append(positions[:length])
            ids, labels, positions = ids[length:], labels[length:], positions[length:]
    if not rows["input_ids"]:
        raise DeltacliError(f"the data is shorter than one packed row of {length} tokens")
    return datasets.Dataset.from_dict(rows)


def encode_seq2seq(
    table: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    mask_prompt: bool = True,
) -> Encoded:
    """Source ids from `data.text`, label ids from `data.target`, both cut at `max_length`."""
    for column in (config.text, config.target):
        if column not in table.column_names:
            columns = ", ".join(table.column_names)
            raise DeltacliError(
                f"seq2seq data needs the column {column!r} (columns: {columns}); "
                "set data.text and data.target"
            )

    def tokenize(batch: dict) -> dict:
        return tokenizer(
            batch[config.text],
            text_target=batch[config.target],
            truncation=True,
            max_length=config.max_length,
        )

    return Encoded(
        table.map(tokenize, batched=True, remove_columns=table.column_names, keep_in_memory=True), 0
    )


def seq2seq_prompts(
    table: datasets.Dataset, config: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, str]]:
    """(source, target) pairs: what an encoder-decoder is given and should say."""
    return list(zip(table[config.text], table[config.target], strict=True))


def causal_prompts(
    table: datasets.Dataset, config: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, str]]:
    """(prompt, reference) for generation: what the model is given, and what it should say."""
    fmt = detect_format(table.column_names, config.format)
    if fmt == "alpaca":
        return [(alpaca_prompt(row), row["output"]) for row in table]
    if fmt == "chat":
        pairs = []
        for row in table:
            messages = row["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = chat_text(tokenizer, messages[:last], generation_prompt=True)
            pairs.append((prompt, messages[last]["content"]))
        return pairs
    raise DeltacliError("generation needs prompts with references: alpaca, chat or seq2seq data")


def prepare_tokens(
    train: datasets.Dataset,
    evaluation: datasets.Dataset,
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    mask_prompt: bool,
    *,
    encode: Encoder,
    prompts: Prompter,
) -> TaskData:
    """Generative tasks: token ids and labels for both sets (the eval set never packed), and
    the eval prompts with their references where the records have them."""
    train_encoded = encode(train, tokenizer, config, mask_prompt)
    unpacked = dataclasses.replace(config, packing=False)
    eval_encoded = encode(evaluation, tokenizer, unpacked, mask_prompt)
    try:
        pairs = prompts(evaluation, unpacked, tokenizer)
    except DeltacliError:  # plain text has no references to generate toward
        pairs = []
    truncated = train_encoded.truncated + eval_encoded.truncated
    return TaskData(train_encoded.table, eval_encoded.table, None, truncated, pairs)


def tokens_for_scoring(
    table: datasets.Dataset,
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    *,
    encode: Encoder,
) -> tuple[datasets.Dataset, None]:
    """One table to score a generative model on (never packed); there are no labels."""
    return encode(table, tokenizer, dataclasses.replace(config, packing=False), True).table, None


def pad_tokens(tokenizer: PreTrainedTokenizerBase, table: datasets.Dataset) -> Callable:
    """Token-label batches: padded with -100 labels; packed rows are all one length."""
    if "position_ids" in table.column_names:
        return default_data_collator
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
