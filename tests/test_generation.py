"""Generation: cached equals uncached with prompt and prefix deltas, merge keeps it, eval scores it."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltacli.commands.merge import merge
from deltacli.deltas import attach
from deltacli.deltas.prefix import PrefixConfig
from deltacli.deltas.prompt import PromptConfig
from deltacli.storage.delta_folder import save_delta
from deltacli.tasks.evaluation import generate
from helpers import perturbed, tiny_recipe

PROMPTS = [
    "### Instruction :\nwhat is the sentiment of this review\n\n### Response :\n",
    "the movie was",
]


@pytest.mark.parametrize(
    "delta",
    [PromptConfig(length=3), PrefixConfig(length=3), PrefixConfig(length=2, projection=8)],
    ids=["prompt", "prefix", "prefix-mlp"],
)
def test_cached_generation_equals_generation_without_cache(tiny_llama, delta):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    deltas = attach(model, [delta], None)
    torch.manual_seed(6)
    with torch.no_grad():
        for param in deltas.parameters().values():
            param.normal_()
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
        uncached = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False
        )
    assert torch.equal(cached, uncached)


def test_greedy_generation_is_the_same_before_and_after_merge(tiny_llama, instructions, tmp_path):
    recipe = tiny_recipe(tiny_llama, instructions, {"kind": "lora", "r": 4}, task="causal-lm")
    model, deltas = perturbed(recipe)
    (tmp_path / "delta").mkdir()
    save_delta(tmp_path / "delta", deltas, recipe, str(tiny_llama), None)
    merge(str(tiny_llama), [tmp_path / "delta"], tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert generate(model, tokenizer, PROMPTS, 8) == generate(merged, tokenizer, PROMPTS, 8)


def test_eval_generates_and_scores(cli, tiny_llama, instructions, tmp_path):
    code, _, err = cli(
        "train", "--model", tiny_llama, "--method", "lora", "task=causal-lm",
        "--data", instructions["train"], "--eval-data", instructions["eval"],
        "train.max_steps=3", "train.preview=2", "-o", tmp_path / "delta",
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "delta" / "metrics.json").read_text())
    assert len(metrics["preview"]) == 2 and {"before", "after", "reference"} <= set(
        metrics["preview"][0]
    )
    out_file = tmp_path / "gens.jsonl"
    code, out, err = cli(
        "eval", "--delta", tmp_path / "delta", "--data", instructions["eval"], "--generate", "5",
        "--max-new-tokens", "3", "--generations", out_file, "--json",
    )  # fmt: skip
    assert code == 0, err
    scores = json.loads(out)
    assert scores["generated"] == 5 and 0 <= scores["rouge_l"] <= 1 and scores["perplexity"] > 1
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(lines) == 5 and lines[0]["reference"] in ("positive", "negative")
