"""`deltacli chat`: a one-shot reply equals `eval --generate` on the same prompt for deltas of
several kinds (nothing merged); the interactive loop keeps history, takes /system and /reset,
and leaves on end of input."""

import io
import json
import sys

import pytest

from deltacli.commands.chat import Conversation, Sampling, open_chat_model
from deltacli.recipe import parse_recipe
from deltacli.storage.delta_folder import save_delta
from helpers import perturbed, write_jsonl

QUESTION = "what is the sentiment of this review : the movie was good"


def saved_delta(model, folder, delta: dict, data) -> None:
    recipe = parse_recipe({
        "name": "t", "model": str(model), "task": "causal-lm",
        "data": {"train": str(data), "eval": str(data), "max_length": 64}, "deltas": [delta],
    })  # fmt: skip
    _, deltas = perturbed(recipe, std=0.5)
    folder.mkdir()
    save_delta(folder, deltas, recipe, str(model), None)


@pytest.fixture
def chats(tmp_path):
    record = {"messages": [{"role": "user", "content": QUESTION},
                           {"role": "assistant", "content": "positive"}]}  # fmt: skip
    return write_jsonl(tmp_path / "chats.jsonl", [record] * 2)


@pytest.mark.parametrize(
    "delta",
    [{"kind": "lora", "r": 4}, {"kind": "prefix", "length": 3}, {"kind": "ia3"}],
    ids=["lora", "prefix", "ia3"],
)
def test_a_one_shot_reply_equals_eval_generate(cli, tiny_llama, chats, tmp_path, delta):
    saved_delta(tiny_llama, tmp_path / "delta", delta, chats)
    generations = tmp_path / "gens.jsonl"
    code, _, err = cli("eval", "--delta", tmp_path / "delta", "--data", chats, "--generate", "1",
                       "--max-new-tokens", "6", "--generations", generations)  # fmt: skip
    assert code == 0, err
    expected = json.loads(generations.read_text().splitlines()[0])["generation"]
    code, out, err = cli("chat", tmp_path / "delta", "--prompt", QUESTION, "--temperature", "0",
                         "--max-new-tokens", "6")  # fmt: skip
    assert code == 0, err
    assert out.removesuffix("\n") == expected and expected.strip()


def test_the_conversation_keeps_history_until_reset(tiny_llama, chats, tmp_path):
    saved_delta(tiny_llama, tmp_path / "delta", {"kind": "lora", "r": 4}, chats)
    model, tokenizer = open_chat_model(str(tmp_path / "delta"))
    chat = Conversation(model, tokenizer, Sampling(temperature=0, max_new_tokens=3), "say yes")
    streamed = []
    first = chat.reply("hello", on_text=streamed.append)
    assert "".join(streamed) == first
    follow_up = chat.prompt("the movie")
    assert "say yes" in follow_up and "hello" in follow_up and first.strip() in follow_up
    chat.reset()
    assert "hello" not in chat.prompt("the movie") and "say yes" in chat.prompt("the movie")


def test_the_interactive_loop_takes_commands_until_end_of_input(
    cli, tiny_llama, chats, tmp_path, monkeypatch
):
    saved_delta(tiny_llama, tmp_path / "delta", {"kind": "lora", "r": 4}, chats)
    lines = ["hello", "/system say yes", "the movie", "/reset", "/help", ""]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines)))
    code, out, err = cli("chat", tmp_path / "delta", "--temperature", "0",
                         "--max-new-tokens", "3")  # fmt: skip
    assert code == 0, err
    assert "system prompt set: say yes (conversation reset)" in out
    assert "conversation reset" in out and out.count("/reset  forget") == 2  # banner, /help
    assert out.count("assistant ›") == 2


def test_sampling_with_a_seed_repeats(tiny_llama, chats, tmp_path):
    saved_delta(tiny_llama, tmp_path / "delta", {"kind": "lora", "r": 4}, chats)
    model, tokenizer = open_chat_model(str(tmp_path / "delta"))
    replies = [
        Conversation(model, tokenizer, Sampling(1.0, 1.0, 8, seed=3)).reply(QUESTION)
        for _ in range(2)
    ]
    assert replies[0] == replies[1]


def test_chat_refuses_a_classification_delta(cli, tiny_bert, sentiment, tmp_path):
    recipe = parse_recipe({
        "name": "t", "model": str(tiny_bert), "data": {"train": str(sentiment["train"]),
        "eval": str(sentiment["eval"]), "text": "text"}, "deltas": [{"kind": "lora"}],
    })  # fmt: skip
    _, deltas = perturbed(recipe)
    (tmp_path / "delta").mkdir()
    save_delta(tmp_path / "delta", deltas, recipe, str(tiny_bert), None)
    code, _, err = cli("chat", tmp_path / "delta", "--prompt", "hi")
    assert code == 2 and "chat needs a causal language model" in " ".join(err.split())
