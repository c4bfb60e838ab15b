"""GGUF export: llama.cpp (through llama-cpp-python) loads the exported model and adapter and
computes what deltacli computes; the adapter's tensors are PEFT's ΔW in llama.cpp's row order;
what cannot be exported is refused with one line and nothing written."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from deltacli.recipe import parse_recipe
from deltacli.storage.delta_folder import save_delta
from deltacli.storage.llama_cpp import permute_rotary
from helpers import perturbed

gguf = pytest.importorskip("gguf")
TEXTS = [
    "the movie was good and the plot was great",
    "a really awful film, very bad",
    "hello there, what is the sentiment of this review?",
] * 20
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = "the movie was good"


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (grouped-query attention, untied head) with a byte-level BPE tokenizer
    llama.cpp reads as GPT-2's, weights large enough that logits differ clearly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("bpe-llama")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special, initial_alphabet=alphabet)
    core.train_from_iterator(TEXTS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")  # fmt: skip
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def lora_delta(base: Path, folder: Path, **options):
    """Base + a LoRA on every linear layer with random A and B, saved; the model with it."""
    recipe = parse_recipe({
        "name": "t", "model": str(base), "task": "causal-lm",
        "data": {"train": "x.jsonl", "eval": "x.jsonl"},
        "deltas": [{"kind": "lora", "r": 4, "alpha": 8, "targets": ["all-linear"], **options}],
    })  # fmt: skip
    model, deltas = perturbed(recipe, std=0.3)
    folder.mkdir()
    save_delta(folder, deltas, recipe, str(base), None)
    return model.eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(model_file: Path, ids: list[int], adapter: Path | None = None):
    """llama.cpp's logits for every position (float32 KV cache: its default is float16)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    options = {"lora_path": str(adapter)} if adapter else {}
    llm = llama_cpp.Llama(str(model_file), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=2, type_k=0, type_v=0, **options)  # fmt: skip
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


@pytest.fixture(scope="module")
def exported_base(bpe_llama, tmp_path_factory) -> Path:
    from deltacli.commands.export import export

    out = tmp_path_factory.mktemp("export") / "base"
    export(bpe_llama, out)
    return out / "model.gguf"


def test_llama_cpp_reads_the_exported_model_and_tokenizer_as_transformers_does(
    bpe_llama, exported_base
):
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizer = AutoTokenizer.from_pretrained(bpe_llama)
    ids = tokenizer(PROMPT)["input_ids"]
    llm = llama_cpp.Llama(str(exported_base), n_ctx=64, verbose=False, vocab_only=True)
    try:
        assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    finally:
        llm.close()
    expected = hf_logits(LlamaForCausalLM.from_pretrained(bpe_llama).eval(), ids)
    got = llama_cpp_logits(exported_base, ids)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("options", [{}, {"rslora": True}], ids=["lora", "rslora"])
def test_llama_cpp_with_the_exported_adapter_computes_base_plus_delta(
    cli, bpe_llama, exported_base, tmp_path, options
):
    model = lora_delta(bpe_llama, tmp_path / "delta", **options)
    code, _, err = cli("export", tmp_path / "delta", "--to", "gguf", "-o", tmp_path / "out",
                       "--base-gguf", exported_base)  # fmt: skip
    assert code == 0, err
    ids = AutoTokenizer.from_pretrained(bpe_llama)(PROMPT)["input_ids"]
    expected = hf_logits(model, ids)
    base = llama_cpp_logits(exported_base, ids)
    got = llama_cpp_logits(exported_base, ids, tmp_path / "out" / "adapter.gguf")
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale
    assert np.abs(base - expected).max() > 0.05 * scale  # the adapter is what moved them
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert f"FROM {exported_base}" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "<|im_start|>{{ .Role }}" in modelfile


def test_the_adapter_holds_peft_delta_weights_in_llama_cpp_row_order(bpe_llama, tmp_path):
    """Without llama.cpp: the file's metadata, and B·A·alpha/r of every tensor pair equal to
    the saved delta's ΔW as PEFT scales it (rsLoRA: alpha/√r), q/k rows permuted as
    llama.cpp's converter permutes the base's."""
    from deltacli.commands.export import export
    from deltacli.files.tensors import load_tensors

    lora_delta(bpe_llama, tmp_path / "delta", rslora=True)
    saved = load_tensors(tmp_path / "delta" / "adapter_model.safetensors")
    export(tmp_path / "delta", tmp_path / "out")
    reader = gguf.GGUFReader(tmp_path / "out" / "adapter.gguf")
    fields = {name: reader.fields[name].contents() for name in reader.fields}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    alpha = fields["adapter.lora.alpha"]
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    assert len(tensors) == 2 * 7 * 2  # A and B of 7 linear layers in 2 blocks
    for module, name, heads in (("self_attn.q_proj", "attn_q", 4),
                                ("self_attn.k_proj", "attn_k", 2), ("mlp.down_proj", "ffn_down", None)):  # fmt: skip
        a, b = tensors[f"blk.1.{name}.weight.lora_a"], tensors[f"blk.1.{name}.weight.lora_b"]
        key = f"base_model.model.model.layers.1.{module}"
        expected = saved[f"{key}.lora_B.weight"] @ saved[f"{key}.lora_A.weight"] * (8 / 4**0.5)
        expected = permute_rotary(expected, heads) if heads else expected
        torch.testing.assert_close(b @ a * (alpha / a.shape[0]), expected, rtol=1e-5, atol=1e-6)


def test_a_merged_delta_of_any_linear_kind_exports_as_a_whole_model(cli, bpe_llama, tmp_path):
    recipe = parse_recipe({
        "name": "t", "model": str(bpe_llama), "task": "causal-lm",
        "data": {"train": "x.jsonl", "eval": "x.jsonl"}, "deltas": [{"kind": "ia3"}],
    })  # fmt: skip
    model, deltas = perturbed(recipe, std=0.3)
    (tmp_path / "ia3").mkdir()
    save_delta(tmp_path / "ia3", deltas, recipe, str(bpe_llama), None)
    code, _, err = cli("export", tmp_path / "ia3", "--to", "gguf", "-o", tmp_path / "x")
    assert code == 2 and "llama.cpp has no adapter of that kind" in " ".join(err.split())
    assert not (tmp_path / "x").exists()
    code, _, err = cli("merge", bpe_llama, tmp_path / "ia3", tmp_path / "merged")
    assert code == 0, err
    code, _, err = cli("export", tmp_path / "merged", "--to", "gguf", "-o", tmp_path / "gguf")
    assert code == 0, err
    ids = AutoTokenizer.from_pretrained(bpe_llama)(PROMPT)["input_ids"]
    expected = hf_logits(model.eval(), ids)
    got = llama_cpp_logits(tmp_path / "gguf" / "model.gguf", ids)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("case", ["dora", "gpt2", "not-a-model", "sentencepiece"])
def test_what_llama_cpp_cannot_load_is_refused_and_nothing_written(
    cli, bpe_llama, tiny_gpt2, tmp_path, case
):
    if case == "sentencepiece":  # Llama 2's kind: byte fallback, ▁ for spaces
        from tokenizers import Tokenizer, models, pre_tokenizers

        shutil.copytree(bpe_llama, tmp_path / "in")
        core = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1}, merges=[], byte_fallback=True))
        core.pre_tokenizer = pre_tokenizers.Metaspace()
        PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(
            tmp_path / "in"
        )
        message = "this one is SentencePiece-style BPE"
    elif case == "dora":
        lora_delta(bpe_llama, tmp_path / "in", use_dora=True)
        message = "llama.cpp has no DoRA adapters"
    elif case == "gpt2":
        lora_delta(tiny_gpt2, tmp_path / "in")
        message = "GGUF export supports Llama-family models (llama, mistral); this one is gpt2"
    else:
        (tmp_path / "in").mkdir()
        message = "is neither a delta folder nor a model folder"
    code, _, err = cli("export", tmp_path / "in", "--to", "gguf", "-o", tmp_path / "out")
    assert code == 2 and message in " ".join(err.split())
    assert not (tmp_path / "out").exists()


def test_a_chatml_modelfile_carries_the_template_default_system_and_stop(bpe_llama):
    from deltacli.commands.export import modelfile_text

    tokenizer = AutoTokenizer.from_pretrained(bpe_llama)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n"
        "{% endif %}" + CHATML
    )
    text = modelfile_text(Path("/models/base.gguf"), "adapter.gguf", tokenizer)
    assert text.splitlines()[1:3] == ["FROM /models/base.gguf", "ADAPTER ./adapter.gguf"]
    assert 'SYSTEM """Be kind."""' in text and 'PARAMETER stop "<|im_end|>"' in text
