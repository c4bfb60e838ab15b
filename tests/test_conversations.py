"""Chat data as people bring it: ShareGPT and OpenAI messages with system turns, multi-turn
loss masks checked token by token, sources mixed by weight, and `data preview` counting
what training then uses."""

import json

import datasets
import pytest

from deltacli.config.schema import build
from deltacli.config.sections import DataConfig
from deltacli.labels import IGNORE
from deltacli.tasks.generation import encode_causal
from deltacli.tasks.tables import load_tables
from helpers import instruction_rows, word_tokenizer, write_jsonl

TURNS = [
    ("system", "say yes"),
    ("user", "hello"),
    ("assistant", "hi there"),
    ("user", "the movie"),
    ("assistant", "was good"),
]
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(turns=TURNS) -> dict:
    return {"conversations": [{"from": SHAREGPT_NAMES[r], "value": t} for r, t in turns]}


def messages(turns=TURNS) -> dict:
    return {"messages": [{"role": r, "content": t} for r, t in turns]}


def data_config(train, **settings) -> DataConfig:
    return build(DataConfig, {"train": train, "eval": None, "eval_fraction": 0.5, **settings})


# Turns as `<|role|> text`, an assistant's closed by ` </s>`: every word its own token.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} </s>{% endif %} \n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def learned_flags(text: str, offsets, last_only: bool) -> list[bool]:
    """What the loss should see, worked out from the words alone: every token after an
    `<|assistant|>` marker up to the next role marker (the answer, its `</s>`, the line
    break the template puts after the turn)."""
    flags, inside, turn = [], False, 0
    total = text.count("<|assistant|>")
    for start, end in offsets:
        word = text[start:end]
        if word.startswith("<|"):
            turn += word == "<|assistant|>"
            inside = word == "<|assistant|>"
            flags.append(False)
            continue
        flags.append(inside and end > start and (not last_only or turn == total))
    return flags


@pytest.mark.parametrize("record", [sharegpt(), messages()], ids=["sharegpt", "messages"])
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_a_multi_turn_mask_covers_exactly_the_assistant_turns(tmp_path, record, train_on):
    tokenizer = word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    path = write_jsonl(tmp_path / "chat.jsonl", [record] * 4)
    config = data_config(str(path), train_on=train_on, max_length=64)
    train, _ = load_tables(config, seed=0)
    row = encode_causal(train, tokenizer, config, mask_prompt=True).table[0]
    text = tokenizer.apply_chat_template(messages()["messages"], tokenize=False)
    encoding = tokenizer(text, return_offsets_mapping=True)
    assert row["input_ids"] == encoding["input_ids"]  # system turn and roles as rendered
    last_only = train_on == "last_assistant"
    expected = learned_flags(text, encoding["offset_mapping"], last_only)
    assert [label != IGNORE for label in row["labels"]] == expected
    learned = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"],
                                                      strict=True) if label != IGNORE])  # fmt: skip
    assert ("hi there </s>" in learned) != last_only and learned.count("was good </s>") == 1


def test_a_top_level_system_column_becomes_the_first_turn(tmp_path):
    record = sharegpt(TURNS[1:]) | {"system": "say yes"}
    path = write_jsonl(tmp_path / "chat.jsonl", [record] * 2)
    train, _ = load_tables(data_config(str(path)), seed=0)
    assert train[0]["messages"] == messages()["messages"]


def test_sources_mix_as_their_weights_and_caps_declare(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [sharegpt() | {"src": "a"}] * 10)
    b = write_jsonl(tmp_path / "b.jsonl",
                    [messages([("user", f"q {i}"), ("assistant", "yes")]) | {"src": "b"}
                     for i in range(8)])  # fmt: skip
    c = write_jsonl(tmp_path / "c.jsonl", [{"dialog": sharegpt()["conversations"], "src": "c"}] * 6)
    sources = [
        {"path": str(a), "weight": 2},
        {"path": str(b), "weight": 0.5},
        {"path": str(c), "rows": 3, "columns": {"dialog": "conversations"}},
    ]
    config = data_config(sources)
    mixed = datasets.concatenate_datasets(list(load_tables(config, seed=0)))
    counts = {name: mixed["src"].count(name) for name in "abc"}
    assert counts == {"a": 20, "b": 4, "c": 3}
    assert all(m[0]["role"] in ("system", "user") for m in mixed["messages"])
    again = datasets.concatenate_datasets(list(load_tables(config, seed=0)))
    assert again.to_list() == mixed.to_list()  # seeded: a resumed run sees the same mix


def test_alpaca_records_become_chat_turns_when_mixed_with_chat(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", instruction_rows(4, seed=0))
    chat = write_jsonl(tmp_path / "chat.jsonl", [messages()] * 4)
    config = data_config([str(alpaca), str(chat)], eval_fraction=0.25)
    train, held = load_tables(config, seed=0)
    rows = train.to_list() + held.to_list()
    converted = [r["messages"] for r in rows if r["messages"][0]["role"] == "user"]
    record = instruction_rows(4, seed=0)[0]
    assert {"role": "user", "content": f"{record['instruction']}\n\n{record['input']}"} in [
        m[0] for m in converted
    ]


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}],
         "record 1, turn 2: unknown role 'bot'"),
        ([messages(), {"messages": []}], "record 2: the conversation is empty"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "record 1: the conversation has no assistant turn"),
    ],
    ids=["unknown-role", "empty", "no-answer"],
)  # fmt: skip
def test_bad_conversations_fail_naming_the_file_and_record(cli, tiny_llama, tmp_path, records,
                                                           message):  # fmt: skip
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    code, _, err = cli("train", "--model", tiny_llama, "--method", "lora", "task=causal-lm",
                       "--data", path, "-o", tmp_path / "out")  # fmt: skip
    assert code == 2 and f"{path} {message}" in " ".join(err.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight", ["0", "-1"])
def test_a_weight_that_is_not_positive_is_refused(cli, tiny_llama, tmp_path, weight):
    path = write_jsonl(tmp_path / "a.jsonl", [messages()] * 4)
    code, _, err = cli("train", "--model", tiny_llama, "--method", "lora", "task=causal-lm",
                       f"data.train=[{{path: {path}, weight: {weight}}}]", "-o", tmp_path / "out")  # fmt: skip
    assert code == 2 and "data.train.0.weight must be positive" in err
    assert not (tmp_path / "out").exists()


def test_sharegpt_and_mixed_sources_train_and_preview_counts_what_training_uses(
    cli, tiny_llama, tmp_path
):
    chats = write_jsonl(tmp_path / "chats.jsonl", [sharegpt()] * 12)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", instruction_rows(20, seed=3))
    dev = write_jsonl(tmp_path / "dev.jsonl", [messages()] * 4)
    settings = ["--model", tiny_llama, "--method", "lora", "task=causal-lm", "data.max_length=48",
                f"data.train=[{{path: {chats}, weight: 2}}, {{path: {alpaca}, rows: 10}}]",
                f"data.eval={dev}"]  # fmt: skip
    code, out, err = cli("data", "preview", *settings, "-n", "2", "--json")
    assert code == 0, err
    preview = json.loads(out)
    assert [s["in_mix"] for s in preview["sources"]] == [24, 10]
    assert preview["stats"]["train_examples"] == 34 and preview["stats"]["eval_examples"] == 4
    example = preview["examples"][0]["sequences"][0]["tokens"]
    assert any(t["learned"] for t in example) and not all(t["learned"] for t in example)
    code, _, err = cli("train", *settings, "train.max_steps=6", "train.batch_size=8",
                       "train.lr=3e-2", "train.log_every=1", "-o", tmp_path / "run")  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    stats = preview["stats"]
    assert metrics["data"] == {
        "train_rows": stats["train_rows"],
        "eval_examples": stats["eval_examples"],
        "loss_tokens": stats["loss_tokens"],
        "truncated": stats["truncated"],
    }
    losses = [h["loss"] for h in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in h]  # fmt: skip
    assert losses[-1] < losses[0]


def test_preview_warns_when_the_loss_never_sees_the_end_of_turn(cli, tmp_path, tiny_llama):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (  # ends assistant turns with </s>, but outside the answer span
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "chats.jsonl", [messages()] * 4)
    code, out, err = cli("data", "preview", "--model", model, "--method", "lora",
                         "task=causal-lm", "--data", data, "--json")  # fmt: skip
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    assert any("closes an assistant turn with no special token" in w for w in warnings)
    code, out, err = cli("data", "preview", "--model", tiny_llama, "--method", "lora",
                         "task=causal-lm", "--data", data, "--json")  # fmt: skip
    warnings = json.loads(out)["warnings"]
    assert [w for w in warnings if "chat template" in w] and not [
        w for w in warnings if "do not include" in w
    ]
