"""llama.cpp's GGUF files, written with the `gguf` package: a LoRA adapter, or a whole
Llama-family model with its byte-level BPE tokenizer.

What llama.cpp's own converters (`convert_lora_to_gguf.py`, `convert_hf_to_gguf.py`) would
write, computed here without a copy of llama.cpp. Two details make it exact:

- llama.cpp stores Llama's query and key rows in another order than Hugging Face (its
  converter interleaves each head's two rotary halves for its kernel), so q/k weights — and
  B of a q/k LoRA — are permuted the same way; A reads the input and is unchanged.
- llama.cpp scales every LoRA by alpha / rank of the file; where a delta scales otherwise
  (rsLoRA's alpha / sqrt(r), per-module patterns) the difference is folded into B.

A whole model is written tensor by tensor from its safetensors shards (nothing but one tensor
in memory), as float32 or float16. Tokenizers: byte-level BPE with GPT-2's pre-tokenizer
(llama.cpp's `gpt-2`), or another that llama.cpp knows when its name is given (`pre`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from deltacli.deltas.base import PEFT_PREFIX
from deltacli.errors import DeltacliError
from deltacli.models.shards import ShardReader

DTYPES = {"f32": np.float32, "f16": np.float16}
LLAMA_FAMILY = ("llama", "mistral")  # model types llama.cpp runs as its `llama` architecture
ARCHITECTURE = "llama"


def check_llama(config) -> None:
    if config.model_type not in LLAMA_FAMILY:
        raise DeltacliError(
            f"GGUF export supports Llama-family models ({', '.join(LLAMA_FAMILY)}); this one "
            f"is {config.model_type}"
        )
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        raise DeltacliError(
            f"GGUF export does not write {kind} rotary scaling yet; use llama.cpp's "
            "convert_hf_to_gguf.py for this model"
        )


def _tensor_names(config):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def permute_rotary(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's reordering of q/k rows (`LlamaModel.permute` in its converter): each
    head's two rotary halves interleaved."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rotary_heads(name: str, config) -> int | None:
    """How many heads a q/k weight's rows hold (None for other weights)."""
    if name.endswith("q_proj"):
        return config.num_attention_heads
    if name.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


# ---------------------------------------------------------------------------- LoRA adapters


def adapter_tensors(values: dict[str, torch.Tensor], peft: dict, config) -> dict[str, torch.Tensor]:
    """A PEFT LoRA's A and B under llama.cpp's names (`blk.0.attn_q.weight.lora_a`), B
    permuted for q/k and scaled so that llama.cpp's alpha / rank gives PEFT's scaling."""
    names = _tensor_names(config)
    alpha = float(peft["lora_alpha"])
    out = {}
    for key in sorted(values):
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise DeltacliError(f"the delta holds {key}, which is not a LoRA tensor")
            continue
        module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        a, b = values[key].float(), values[key.replace(".lora_A.", ".lora_B.")].float()
        target = names.get_name(module)
        if target is None:
            raise DeltacliError(f"llama.cpp has no tensor for {module}")
        heads = _rotary_heads(module, config)
        if heads is not None:
            b = permute_rotary(b, heads)
        b = b * (peft_scaling(peft, module) * a.shape[0] / alpha)
        out[f"{target}.weight.lora_a"], out[f"{target}.weight.lora_b"] = a, b
    if not out:
        raise DeltacliError("the delta holds no LoRA tensors")
    return out


def peft_scaling(peft: dict, module: str) -> float:
    """PEFT's scaling of `module`'s LoRA: alpha / r, or alpha / sqrt(r) with rsLoRA; a rank
    or alpha pattern that names the module wins."""
    rank = _patterned(peft.get("rank_pattern"), module, peft["r"])
    alpha = _patterned(peft.get("alpha_pattern"), module, peft["lora_alpha"])
    return alpha / (math.sqrt(rank) if peft.get("use_rslora") else rank)


def _patterned(pattern: dict | None, module: str, default: float) -> float:
    """The value PEFT's `rank_pattern` / `alpha_pattern` gives `module`, else `default`."""
    if not pattern:
        return default
    from peft.tuners.tuners_utils import get_pattern_key

    return pattern.get(get_pattern_key(pattern, module), default)


def write_adapter(
    path: Path, tensors: dict[str, torch.Tensor], alpha: float, dtype: str, adapter_type: str
) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, adapter_type)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.numpy().astype(DTYPES[dtype]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


# ---------------------------------------------------------------------------- whole models


def write_model(
    path: Path,
    folder: Path,
    config,
    tokenizer: PreTrainedTokenizerBase,
    dtype: str = "f32",
    pre: str | None = None,
    progress: Callable[[Iterator], Iterator] = iter,
) -> int:
    """A Hugging Face Llama folder (safetensors; its config passed `check_llama`) as one GGUF
    file; the tensors written."""
    import gguf

    with contextlib.ExitStack() as readers:
        tensors = _model_tensors(folder, config, readers)
        writer = gguf.GGUFWriter(path, ARCHITECTURE)
        _hyperparameters(writer, config, dtype)
        _tokenizer(writer, tokenizer, pre)
        for name, (reader, key, _) in tensors.items():
            shape = reader.info[key].shape
            kept = _stored(dtype, len(shape))
            writer.add_tensor_info(name, shape, kept, math.prod(shape) * kept.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, (reader, key, heads) in progress(tensors.items()):
            tensor = reader.read(key).float()
            if heads is not None:
                tensor = permute_rotary(tensor, heads)
            writer.write_tensor_data(tensor.numpy().astype(_stored(dtype, tensor.dim())))
        writer.close()
    return len(tensors)


def _stored(dtype: str, dimensions: int) -> np.dtype:
    """How a tensor is stored: matrices in `dtype`, norms (vectors) in float32."""
    return np.dtype(DTYPES[dtype] if dimensions > 1 else np.float32)


def _model_tensors(
    folder: Path, config, readers: contextlib.ExitStack
) -> dict[str, tuple[ShardReader, str, int | None]]:
    """GGUF name -> (the shard holding it, its key there, q/k heads to permute by); each
    shard's reader closes with `readers`."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise DeltacliError(f"{folder} holds no safetensors weights to export")
    names = _tensor_names(config)
    out = {}
    for shard in shards:
        reader = readers.enter_context(ShardReader(shard))
        for key in reader.info:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            target = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise DeltacliError(f"llama.cpp has no tensor for {key} of {shard.name}")
            out[target] = (reader, key, _rotary_heads(key.removesuffix(".weight"), config))
    return out


def _hyperparameters(writer, config, dtype: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    kinds = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(kinds[dtype])


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _tokenizer(writer, tokenizer: PreTrainedTokenizerBase, pre: str | None) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` model: tokens by id, their types,
    merges, special ids, chat template."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model["type"] != "BPE" or _is_sentencepiece(state):
        kind = "SentencePiece-style BPE" if model["type"] == "BPE" else model["type"]
        raise DeltacliError(
            f"GGUF export converts byte-level BPE tokenizers; this one is {kind} (Llama 2 and "
            "Mistral use one): use llama.cpp's convert_hf_to_gguf.py"
        )
    pre = pre or _pre_tokenizer(state.get("pre_tokenizer"))
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    vocab |= {t["content"]: i for i, t in added.items()}
    size = max(len(tokenizer), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    for i, token in added.items():
        types[i] = gguf.TokenType.CONTROL if token["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
    ):
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _is_sentencepiece(state: dict) -> bool:
    """SentencePiece's BPE as `tokenizers` holds it: bytes as <0x..> fallback tokens, spaces
    as ▁ (Metaspace) — llama.cpp reads it as another model (`llama`), not `gpt2`."""
    parts = [state.get("pre_tokenizer"), state.get("decoder"), state.get("normalizer")]
    around = json.dumps(parts, ensure_ascii=False)
    return bool(state["model"].get("byte_fallback")) or "Metaspace" in around or "▁" in around


def _pre_tokenizer(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for GPT-2's byte-level pre-tokenizer; others need `pre` given."""
    pre_tokenizer = pre_tokenizer or {}
    if pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2"
    raise DeltacliError(
        "the tokenizer splits text before BPE otherwise than GPT-2 does, and llama.cpp needs "
        "the name of that pre-tokenizer: pass --tokenizer-pre NAME (llama.cpp's "
        "tokenizer.ggml.pre, e.g. llama-bpe, smollm, qwen2)"
    )
