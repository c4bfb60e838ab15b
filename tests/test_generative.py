"""Causal-LM and seq2seq: masked prompts, chat templates, packing, every method, generation."""

import json

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import instruction_rows, lm_recipe, randomize_trainable, word_tokenizer
from deltacli.build import prepare_model
from deltacli.data import load_table
from deltacli.deltas import attach
from deltacli.deltas.prefix import PrefixConfig
from deltacli.deltas.prompt import PromptConfig
from deltacli.errors import DeltacliError
from deltacli.evaluate import evaluate, generate
from deltacli.labels import IGNORE
from deltacli.lm_data import encode_causal, pack
from deltacli.merge import merge
from deltacli.recipe import DataConfig
from deltacli.store import read_delta, save_delta
from deltacli.trainer import MetricsLog, Trainer


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
    from deltacli.lm_data import render

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
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    single = encoded(instruction_rows(6, 0), tokenizer).table
    packed = pack(single, 48)
    row = packed[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) >= 2 and all(row["labels"][i] == IGNORE for i in starts)
    with torch.no_grad():
        together = model(
            input_ids=torch.tensor([row["input_ids"]]),
            position_ids=torch.tensor([row["position_ids"]]),
            use_cache=False,  # as in training: transformers isolates packed rows only then
        ).logits[0]
        for start, end in zip(starts, [*starts[1:], 48], strict=True):
            alone = model(input_ids=torch.tensor([row["input_ids"][start:end]])).logits[0]
            assert torch.allclose(together[start:end], alone, atol=1e-5)


LLAMA_METHODS = {
    "lora": {"kind": "lora", "r": 4},
    "houlsby-adapter": {"kind": "adapter", "at": "attention", "r": 8},
    "parallel-adapter": {"kind": "adapter", "placement": "parallel", "r": 8, "scale": 4.0},
    "prefix": {"kind": "prefix", "length": 4},
    "prompt": {"kind": "prompt", "length": 4},
    "ia3": {"kind": "ia3"},
    "layernorm": {"kind": "layernorm"},
    "sift": {"kind": "sift", "density": 0.05},
    "full": {"kind": "full"},
}
T5_METHODS = {**LLAMA_METHODS, "bitfit": None}  # T5 has no biases either


def loss_goes_down(recipe):
    trainer = Trainer(recipe, console=None)
    before = evaluate(trainer.model, trainer.eval_batches, trainer.accelerator, recipe.task)
    after = trainer.fit(MetricsLog(None))["eval"]
    assert after["loss"] < before["loss"]
    assert after["perplexity"] < before["perplexity"]
    return trainer


@pytest.mark.parametrize("method", LLAMA_METHODS)
def test_every_method_learns_instructions_on_a_tiny_llama(tiny_llama, instructions, method):
    lr = 1e-3 if method == "full" else 1e-2
    loss_goes_down(lm_recipe(tiny_llama, instructions, "causal-lm", LLAMA_METHODS[method], lr=lr))


@pytest.mark.parametrize("method", [m for m, d in T5_METHODS.items() if d])
def test_every_method_learns_pairs_on_a_tiny_t5(tiny_t5, pairs, method):
    lr = 1e-3 if method == "full" else 1e-2
    loss_goes_down(lm_recipe(tiny_t5, pairs, "seq2seq", T5_METHODS[method], lr=lr))


@pytest.fixture(scope="module")
def other_architectures(tmp_path_factory):
    """A tiny GPT-2 (causal) and a tiny BART (seq2seq) beside the Llama and T5."""
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    folders = {}
    for name, build in (
        (
            "gpt2",
            lambda size: GPT2LMHeadModel(
                GPT2Config(
                    vocab_size=size,
                    n_embd=32,
                    n_layer=2,
                    n_head=2,
                    n_positions=128,
                    bos_token_id=2,
                    eos_token_id=3,
                )
            ),
        ),
        (
            "bart",
            lambda size: BartForConditionalGeneration(
                BartConfig(
                    vocab_size=size,
                    d_model=32,
                    encoder_layers=2,
                    decoder_layers=2,
                    encoder_attention_heads=2,
                    decoder_attention_heads=2,
                    encoder_ffn_dim=64,
                    decoder_ffn_dim=64,
                    max_position_embeddings=128,
                    pad_token_id=0,
                    bos_token_id=2,
                    eos_token_id=3,
                    decoder_start_token_id=3,
                )
            ),
        ),
    ):
        folder = tmp_path_factory.mktemp(name)
        tokenizer = word_tokenizer(add_eos=name == "bart")
        tokenizer.save_pretrained(folder)
        torch.manual_seed(0)
        build(len(tokenizer)).save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.mark.parametrize(
    "method", ["lora", "houlsby-adapter", "parallel-adapter", "prefix", "prompt", "ia3"]
)
def test_methods_learn_on_gpt2_and_bart_too(other_architectures, instructions, pairs, method):
    loss_goes_down(
        lm_recipe(other_architectures["gpt2"], instructions, "causal-lm", LLAMA_METHODS[method])
    )
    loss_goes_down(lm_recipe(other_architectures["bart"], pairs, "seq2seq", LLAMA_METHODS[method]))


def test_a_combination_that_cannot_work_says_so(tiny_llama, instructions):
    with pytest.raises(DeltacliError, match="the bitfit delta chose no parameters"):
        Trainer(lm_recipe(tiny_llama, instructions, "causal-lm", {"kind": "bitfit"}), console=None)


def test_packing_and_gradient_checkpointing_train(tiny_llama, instructions):
    recipe = lm_recipe(
        tiny_llama, instructions, "causal-lm", LLAMA_METHODS["lora"], gradient_checkpointing=True
    )
    recipe.data.packing = True
    trainer = loss_goes_down(recipe)
    assert "position_ids" in trainer.data.train.column_names


def perturbed(recipe):
    model, deltas = prepare_model(recipe)
    torch.manual_seed(4)
    with torch.no_grad():
        for param in deltas.parameters().values():
            param.add_(torch.randn_like(param) * 0.3)
    return model.eval(), deltas


@pytest.mark.parametrize(
    "delta",
    [
        {"kind": "lora", "r": 4},
        {"kind": "ia3"},
        {"kind": "prompt", "length": 3},
        {"kind": "prefix", "length": 3},
        {"kind": "prefix", "length": 3, "projection": 8},
    ],
    ids=["lora", "ia3", "prompt", "prefix", "prefix-mlp-folded"],
)
def test_peft_loads_our_causal_lm_deltas_with_equal_logits(
    tiny_llama, instructions, tmp_path, delta
):
    recipe = lm_recipe(tiny_llama, instructions, "causal-lm", delta)
    model, deltas = perturbed(recipe)
    save_delta(tmp_path, deltas, recipe, str(tiny_llama), None)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path
    ).eval()
    ids = torch.randint(4, 40, (2, 9))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, peft(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=4),
        IA3Config(task_type=TaskType.CAUSAL_LM),
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
    ],
    ids=["lora", "ia3", "prompt"],
)
def test_peft_causal_lm_adapters_load_in_deltacli(tiny_llama, tmp_path, config):
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config)
    randomize_trainable(peft, seed=5, std=0.3)
    peft.eval().save_pretrained(tmp_path)
    saved = read_delta(tmp_path, model=str(tiny_llama))
    assert saved.recipe.task == "causal-lm"
    model, deltas = prepare_model(saved.recipe)
    saved.load_into(deltas)
    ids = torch.randint(4, 40, (2, 9))
    with torch.no_grad():
        assert (model.eval()(input_ids=ids).logits - peft(input_ids=ids).logits).abs().max() <= 1e-5


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
    recipe = lm_recipe(tiny_llama, instructions, "causal-lm", {"kind": "lora", "r": 4})
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


def test_seq2seq_loads_pairs_from_jsonl(pairs):
    assert load_table(str(pairs["train"])).column_names == ["source", "target"]
