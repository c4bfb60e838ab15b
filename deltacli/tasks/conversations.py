"""Conversations in the shapes people bring them, as one shape: OpenAI-style `messages`
([{role, content}], roles system/user/assistant/tool).

ShareGPT records (`conversations`: [{from, value}] with human/gpt/system, the most common
format on the Hub and in LLaMA-Factory and axolotl) are mapped to it, a top-level `system`
column becomes the first turn, and every record is checked here, where the file and the
record are still known: an unknown role or an empty conversation is one line naming both,
not a template error deep inside tokenisation. When several sources with different record
formats are mixed, Alpaca records become a user turn and an assistant turn.
"""

from __future__ import annotations

import datasets

from deltacli.errors import DeltacliError

MESSAGES = "messages"
SHAREGPT = "conversations"
SYSTEM = "system"
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speaker names (and the OpenAI names some ShareGPT files use) -> roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
}
FEATURES = datasets.Features(
    {MESSAGES: [{"role": datasets.Value("string"), "content": datasets.Value("string")}]}
)


def is_conversational(table: datasets.Dataset) -> bool:
    return bool({MESSAGES, SHAREGPT} & set(table.column_names))


def as_messages(table: datasets.Dataset, source: str) -> datasets.Dataset:
    """A table of chat records (`messages` or ShareGPT `conversations`, optional `system`)
    with one `messages` column of {role, content} turns; other tables unchanged."""
    if not is_conversational(table):
        return table
    column = MESSAGES if MESSAGES in table.column_names else SHAREGPT
    has_system = SYSTEM in table.column_names

    def convert(record: dict, index: int) -> dict:
        where = f"{source} record {index + 1}"
        turns = _turns(record[column], column, where)
        system = record.get(SYSTEM) if has_system else None
        if system and (not turns or turns[0]["role"] != "system"):
            turns.insert(0, {"role": "system", "content": str(system)})
        return {MESSAGES: turns}

    return table.map(
        convert,
        with_indices=True,
        remove_columns=[c for c in table.column_names if c in (MESSAGES, SHAREGPT, SYSTEM)],
        features=_with_others(table, (MESSAGES, SHAREGPT, SYSTEM)),
        keep_in_memory=True,
    )


def _turns(turns: object, column: str, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DeltacliError(f"{where}: the conversation is empty (no turns in {column!r})")
    role_key, text_key = ("role", "content") if column == MESSAGES else ("from", "value")
    out = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DeltacliError(
                f"{where}, turn {number}: expected {{{role_key!r}, {text_key!r}}}, got {turn!r}"
            )
        out.append({"role": _role(turn[role_key], column, where, number),
                    "content": str(turn[text_key] or "")})  # fmt: skip
    if not any(turn["role"] == "assistant" for turn in out):
        raise DeltacliError(f"{where}: the conversation has no assistant turn to learn from")
    return out


def _role(name: object, column: str, where: str, number: int) -> str:
    known = dict(zip(ROLES, ROLES, strict=True)) if column == MESSAGES else SHAREGPT_ROLES
    role = known.get(str(name).lower())
    if role is None:
        raise DeltacliError(
            f"{where}, turn {number}: unknown role {name!r} (known: {', '.join(known)})"
        )
    return role


def _with_others(table: datasets.Dataset, dropped: tuple[str, ...]) -> datasets.Features:
    """`messages`, and the table's columns other than `dropped` as they were."""
    kept = {k: v for k, v in table.features.items() if k not in dropped}
    return datasets.Features({**kept, **FEATURES})


def alpaca_as_messages(table: datasets.Dataset) -> datasets.Dataset:
    """Alpaca records (instruction, optional input, output) as a user turn and an assistant
    turn: the form they take when mixed with chat sources, rendered by the chat template."""

    def convert(record: dict) -> dict:
        prompt = record["instruction"]
        if record.get("input"):
            prompt += "\n\n" + record["input"]
        turns = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": record["output"]},
        ]
        if record.get(SYSTEM):
            turns.insert(0, {"role": "system", "content": record[SYSTEM]})
        return {MESSAGES: turns}

    return table.map(
        convert, remove_columns=table.column_names, features=FEATURES, keep_in_memory=True
    )
