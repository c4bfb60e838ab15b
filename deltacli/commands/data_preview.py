"""`deltacli data preview`: the examples as the model will see them, and the counts training
will use — before an hour is spent training on a template bug.

It encodes the data exactly as `train` does (the task's own `load_data`, same recipe, same
tokenizer; no model weights are read), so what it shows and counts is what the loss sees:
which tokens are learned, where the template put its end-of-turn tokens, how many examples
were cut at `max_length`, how well packing or padding fills the batches. The warnings are the
mistakes most reported against fine-tuning tools: an assistant turn whose end-of-turn token
the loss never sees (the model does not learn to stop), a model that stops generating at
another token than the template ends turns with, a tokenizer without a chat template.
"""

from __future__ import annotations

import dataclasses
from itertools import groupby

from transformers import PreTrainedTokenizerBase

from deltacli.config.sections import source_list
from deltacli.labels import IGNORE
from deltacli.models.loading import load_config, load_tokenizer
from deltacli.recipe import Recipe
from deltacli.tasks.conversations import is_conversational
from deltacli.tasks.generation import PLAIN_CHAT_TEMPLATE, chat_text
from deltacli.tasks.tables import TaskData, load_source, load_tables

# What an example holds, by encoded column: (name shown, token column, label column or None
# when no token of it is learned). The first layout whose columns are present applies.
LAYOUTS = (
    (("chosen", "chosen_input_ids", "chosen_labels"),
     ("rejected", "rejected_input_ids", "rejected_labels")),
    (("", "input_ids", "labels"),),
)  # fmt: skip
SEQUENCES = LAYOUTS[0] + LAYOUTS[1]  # every (name, token column, label column) there is
PROBE = "\x1fdeltacli\x1f"  # an answer no template contains, to find what follows it


@dataclasses.dataclass
class Token:
    id: int
    text: str
    learned: bool  # the loss sees it
    special: bool  # a special token (end of turn, role markers, padding)


@dataclasses.dataclass
class Sequence:
    name: str  # "" for the only one; chosen/rejected; source/target
    tokens: list[Token]


@dataclasses.dataclass
class Example:
    sequences: list[Sequence]
    label: str | None = None  # classification: the class


@dataclasses.dataclass
class DataPreview:
    split: str
    examples: list[Example]
    stats: dict[str, float | int | str | None]
    sources: list[dict]
    warnings: list[str]


def preview_data(recipe: Recipe, count: int = 3, split: str = "train") -> DataPreview:
    """Encode `recipe`'s data as training would and describe the first `count` examples of
    `split`, with the statistics and warnings above."""
    tokenizer = load_tokenizer(recipe.model)
    task, train = recipe.task_entry, recipe.train
    # Task.load_data's two steps, so that packed and unpacked encodings share one read.
    train_rows, eval_rows = load_tables(recipe.data, train.seed)
    data = task.prepare(train_rows, eval_rows, recipe.data, tokenizer, train.mask_prompt)
    unpacked = data
    if recipe.data.packing:
        plain = dataclasses.replace(recipe.data, packing=False)
        unpacked = task.prepare(train_rows, eval_rows, plain, tokenizer, train.mask_prompt)
    table = unpacked.train if split == "train" else unpacked.eval
    shown = table.select(range(min(count, len(table))))
    examples = [_example(row, tokenizer, data.labels) for row in shown]
    stats = _stats(recipe, data, unpacked)
    chat = task.generative and _holds_conversations(train_rows)
    warnings = _warnings(recipe, tokenizer, unpacked, stats, chat)
    return DataPreview(split, examples, stats, _source_rows(recipe), warnings)


def _example(row: dict, tokenizer: PreTrainedTokenizerBase, labels: list | None) -> Example:
    special = set(tokenizer.all_special_ids)
    for layout in LAYOUTS:
        if all(column in row for _, column, _ in layout):
            break
    sequences = []
    for name, ids_column, labels_column in layout:
        ids, targets = row[ids_column], row.get(labels_column)
        learned = _learned_positions(ids, targets)
        if learned is None:  # seq2seq: the labels are the decoder's own tokens
            source = _tokens(tokenizer, ids, [False] * len(ids), special)
            target = _tokens(tokenizer, targets, [True] * len(targets), special)
            sequences += [Sequence("source", source), Sequence("target", target)]
            continue
        sequences.append(Sequence(name, _tokens(tokenizer, ids, learned, special)))
    label = None
    if isinstance(row.get("labels"), int):
        label = str(labels[row["labels"]]) if labels else str(row["labels"])
    return Example(sequences, label)


def _learned_positions(ids: list[int], targets: list[int] | int | None) -> list[bool] | None:
    """Which tokens the loss sees: those whose label is kept; None where the labels are not
    aligned with the tokens (seq2seq targets)."""
    if not isinstance(targets, list):
        return [False] * len(ids)
    if len(targets) != len(ids):
        return None
    return [label != IGNORE for label in targets]


def _tokens(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], learned: list[bool], special: set[int]
) -> list[Token]:
    return [
        Token(i, tokenizer.decode([i]), keep, i in special)
        for i, keep in zip(ids, learned, strict=True)
    ]


def _stats(recipe: Recipe, data: TaskData, unpacked: TaskData) -> dict:
    """The counts training uses (rows, loss terms, cut examples) and how full the batches
    are: packing's share of tokens kept, or padding's share of the batches."""
    task = recipe.task_entry
    train = data.train
    loss_tokens = sum(task.units(x) for x in train[task.units_column])
    tokens = sum(_lengths(unpacked.train))
    row_lengths = _lengths(train)
    stats: dict = {
        "train_examples": len(unpacked.train),
        "eval_examples": len(unpacked.eval),
        "train_rows": len(train),
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "loss_share": loss_tokens / max(sum(row_lengths), 1),
        "truncated": data.truncated,
        "max_length": recipe.data.max_length,
    }
    if recipe.data.packing:
        stats["packing_efficiency"] = sum(row_lengths) / max(tokens, 1)
    else:
        stats["padding_share"] = _padding_share(row_lengths, recipe.train.batch_size)
    return stats


def _lengths(table) -> list[int]:
    """Tokens per row (a preference pair counts both answers)."""
    present = set(table.column_names)
    columns = [c for _, c, _ in SEQUENCES if c in present]
    per_column = [[len(ids) for ids in table[c]] for c in columns]
    return [sum(lengths) for lengths in zip(*per_column, strict=True)]


def _padding_share(lengths: list[int], batch_size: int) -> float:
    """Padding's share of the tokens in batches of `batch_size` rows taken in file order
    (each padded to its longest row); training shuffles, so this is indicative."""
    padded = real = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / max(padded, 1)


def _source_rows(recipe: Recipe) -> list[dict]:
    """Each training source: rows read, its weight, rows it brings to the mix."""
    rows = []
    for source in source_list(recipe.data.train):
        read = len(load_source(source, recipe.data.hub_config))
        rows.append({"source": source.path, "rows": read, "weight": source.weight,
                     "in_mix": round(source.weight * read)})  # fmt: skip
    return rows


def _holds_conversations(table) -> bool:
    """Chat records (mixed sources included), or preference pairs written as message lists
    (TRL's conversational)."""
    return is_conversational(table) or isinstance(table[0].get("chosen"), list)


def _warnings(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, data: TaskData, stats: dict, chat: bool
) -> list[str]:
    out = []
    generative = recipe.task_entry.generative
    if chat and not tokenizer.chat_template:
        out.append(
            "the tokenizer has no chat template: deltacli renders turns with its plain "
            "<|role|> template, and the trained model must be prompted the same way"
        )
    end = _end_of_turn(tokenizer, chat) if generative else None
    if generative and end is None:
        out.append(
            "the chat template closes an assistant turn with no special token: the model "
            "cannot learn where its answers end"
            if chat and tokenizer.chat_template
            else "the tokenizer has no end-of-sequence token: the model cannot learn to stop"
        )
    if end is not None:
        unended, turns = _unended_turns(data.train, end, recipe.data.max_length)
        name = tokenizer.convert_ids_to_tokens(end)
        if unended:
            out.append(
                f"{unended:,} of {turns:,} learned answers do not include {name} in the loss: "
                "the model will not learn to stop there (check the template and mask_prompt)"
            )
        stops = _stop_ids(recipe)
        if stops and end not in stops:
            out.append(
                f"answers end with {name} (id {end}), but the model's config stops "
                f"generating at id(s) {', '.join(map(str, sorted(stops)))}: generations "
                "will run on past the answer"
            )
    if stats["truncated"]:
        out.append(
            f"{stats['truncated']:,} examples (train + eval) are longer than "
            f"data.max_length={recipe.data.max_length} and were cut"
        )
    empty = _without_loss(data.train)
    if empty:
        out.append(
            f"{empty:,} training examples have no token in the loss (cut before the answer?)"
        )
    return out


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, chat: bool) -> int | None:
    """The token the template closes an assistant turn with: the first special token after
    an answer in a rendered conversation (chat), or the tokenizer's end-of-sequence token."""
    if chat:
        text = chat_text(tokenizer, [{"role": "user", "content": "x"},
                                     {"role": "assistant", "content": PROBE}])  # fmt: skip
        after = text[text.index(PROBE) + len(PROBE) :]
        special = set(tokenizer.all_special_ids)
        for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
            if token in special:
                return token
        if tokenizer.chat_template in (None, PLAIN_CHAT_TEMPLATE):
            return tokenizer.eos_token_id
        return None
    return tokenizer.eos_token_id


def _unended_turns(table, end: int, max_length: int) -> tuple[int, int]:
    """(learned answers without `end` among their learned tokens, learned answers), over
    every run of learned tokens (a template may learn a line break after the end-of-turn
    token too); a run cut at `max_length` is the truncation warning's."""
    unended = turns = 0
    for _, ids_column, labels_column in SEQUENCES:
        if labels_column not in table.column_names:
            continue
        for ids, labels in zip(table[ids_column], table[labels_column], strict=True):
            if len(labels) != len(ids):
                continue
            position = 0
            for learned, run in groupby(labels, key=lambda label: label != IGNORE):
                run = list(run)
                position += len(run)
                if not learned or position >= max_length:
                    continue
                turns += 1
                unended += end not in run
    return unended, turns


def _stop_ids(recipe: Recipe) -> set[int]:
    """The token ids generation stops at, from the model's config."""
    config = load_config(recipe.model)
    stops = getattr(config, "eos_token_id", None)
    if stops is None:
        return set()
    return set(stops) if isinstance(stops, list) else {stops}


def _without_loss(table) -> int:
    column = "labels" if "labels" in table.column_names else "chosen_labels"
    if column not in table.column_names or not isinstance(table[0][column], list):
        return 0
    return sum(all(label == IGNORE for label in labels) for labels in table[column])
