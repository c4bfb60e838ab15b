"""Generative data: masked prompts, chat templates, packing, truncation."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltacli.config.sections import DataConfig
from deltacli.errors import DeltacliError
from deltacli.labels import IGNORE
from deltacli.tasks.generation import encode_causal, pack, pad_tokens
from deltacli.tasks.tables import load_table
from helpers import assert_close, instruction_rows, word_tokenizer


def encoded(rows, tokenizer, **config):
    import datasets

    return encode_causal(
        datasets.Dataset.from_list(rows),
        tokenizer,
        DataConfig(max_length=64, **config),
        mask_prompt=True,
    )


def learned_text(tokenizer, row) -> str:
    ids = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE]
    assert [label for label in row["labels"] if label != IGNORE] == ids  # labels are the ids
    return tokenizer.decode(ids)


def test_alpaca_prompt_tokens_get_ignore_labels():
    tokenizer = word_tokenizer()
    rows = instruction_rows(2, seed=0)
    table = encoded(rows, tokenizer).table
    for row, record in zip(table, rows, strict=True):
        assert learned_text(tokenizer, row) == f"{record['output']} </s>"
        assert row["labels"][0] == IGNORE and row["input_ids"][0] == tokenizer.bos_token_id


def test_without_prompt_masking_every_token_is_learned():
    import datasets

    tokenizer = word_tokenizer()
    table = encode_causal(
        datasets.Dataset.from_list(instruction_rows(2, 0)),
        tokenizer,
        DataConfig(max_length=64),
        mask_prompt=False,
    ).table
    assert table[0]["labels"] == table[0]["input_ids"]


CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} </s>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def test_chat_rendering_matches_the_template_and_learns_only_assistant_turns():
    from deltacli.tasks.generation import render

    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT
    messages = [
        {"role": "system", "content": "say yes"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "the movie"},
        {"role": "assistant", "content": "was good"},
    ]
    text, _ = render({"messages": messages}, "chat", tokenizer)
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)
    row = encoded([{"messages": messages}], tokenizer).table[0]
    assert learned_text(tokenizer, row) == "hi there </s> was good </s>"


def test_a_tokenizer_without_chat_template_gets_the_plain_one():
    tokenizer = word_tokenizer()
    row = encoded(
        [
            {
                "messages": [
                    {"role": "user", "content": "hello"},
                    {"role": "assistant", "content": "yes"},
                ]
            }
        ],
        tokenizer,
    ).table[0]
    assert learned_text(tokenizer, row).split() == ["yes", "</s>"]


def test_format_is_detected_or_refused():
    tokenizer = word_tokenizer()
    with pytest.raises(DeltacliError, match="cannot tell the record format"):
        encoded([{"question": "x", "answer": "y"}], tokenizer)
    with pytest.raises(DeltacliError, match=r"data\.format=chat needs the column"):
        encoded(instruction_rows(1, 0), tokenizer, format="chat")


def test_truncation_is_counted():
    tokenizer = word_tokenizer()
    rows = instruction_rows(3, 0)
    rows[1]["input"] = " ".join(["very"] * 100)
    result = encoded(rows, tokenizer)
    assert result.truncated == 1 and len(result.table[1]["input_ids"]) == 64


def test_packed_examples_neither_see_nor_teach_each_other(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval().double()
    single = encoded(instruction_rows(6, 0), tokenizer).table
    packed = pack(single, 48)
    row = packed[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) >= 2 and all(row["labels"][i] == IGNORE for i in starts)
    fed = pad_tokens(tokenizer, packed)([row])  # whatever the collator gives training
    with torch.no_grad():
        together = model(
            **{k: v for k, v in fed.items() if k != "labels"},
            use_cache=False,  # as in training: transformers isolates packed rows only then
        ).logits[0]
        for start, end in zip(starts, [*starts[1:], 48], strict=True):
            alone = model(input_ids=torch.tensor([row["input_ids"][start:end]])).logits[0]
            assert_close(together[start:end], alone)


def test_seq2seq_loads_pairs_from_jsonl(pairs):
    assert load_table(str(pairs["train"])).column_names == ["source", "target"]
