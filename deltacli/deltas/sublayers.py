"""Where a transformer layer's two sublayers begin and end, per architecture.

The unified view (He et al., 2022) places a delta at the attention or the feed-forward
sublayer and reads either the sublayer's input (parallel) or its output (sequential). For
each architecture this names, by pattern, the module whose *input* is the sublayer's input
and the module whose *output* is the sublayer's output before the residual connection.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from deltacli.errors import DeltacliError


@dataclasses.dataclass(frozen=True)
class Sublayer:
    reads: str  # pattern: the module whose input is the sublayer's input
    writes: str  # pattern: the module whose output is the sublayer's output


_BERT = {
    "attention": Sublayer(r"re:.*\.attention\.self", r"re:.*\.attention\.output\.dense"),
    "ffn": Sublayer(r"re:.*\.intermediate", r"re:.*\.layer\.\d+\.output\.dense"),
}
_LLAMA = {
    "attention": Sublayer(r"re:.*\.self_attn", r"re:.*\.self_attn\.o_proj"),
    "ffn": Sublayer(r"re:.*\.mlp", r"re:.*\.mlp\.down_proj"),
}
PRESETS: dict[str, dict[str, Sublayer]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "distilbert": {
        "attention": Sublayer(r"re:.*\.attention", r"re:.*\.attention\.out_lin"),
        "ffn": Sublayer(r"re:.*\.ffn", r"re:.*\.ffn\.lin2"),
    },
    "gpt2": {
        "attention": Sublayer(r"re:.*\.attn", r"re:.*\.attn\.c_proj"),
        "ffn": Sublayer(r"re:.*\.mlp", r"re:.*\.mlp\.c_proj"),
    },
    "t5": {
        "attention": Sublayer(r"re:.*\.SelfAttention", r"re:.*\.SelfAttention\.o"),
        "ffn": Sublayer(r"re:.*\.DenseReluDense", r"re:.*\.DenseReluDense\.wo"),
    },
    "bart": {
        "attention": Sublayer(
            r"re:.*layers\.\d+\.self_attn", r"re:.*layers\.\d+\.self_attn\.out_proj"
        ),
        "ffn": Sublayer(r"re:.*layers\.\d+\.fc1", r"re:.*layers\.\d+\.fc2"),
    },
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
}


def sublayer(model: nn.Module, at: str) -> Sublayer:
    """The attention or feed-forward sublayer of this model's architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PRESETS:
        raise DeltacliError(
            f"no sublayer preset for model type {model_type!r}; name the modules with "
            "`reads` and `writes` patterns"
        )
    return PRESETS[model_type][at]


def partner(name: str, candidates: list[str]) -> str | None:
    """The candidate in the same block as `name`: the one sharing the longest dotted prefix
    with it, which must reach past the block's index (`encoder.block.3.` is not
    `decoder.block.3.`)."""
    parts = name.split(".")

    def shared(other: str) -> int:
        count = 0
        for a, b in zip(parts, other.split("."), strict=False):
            if a != b:
                break
            count += 1
        return count

    best = max(candidates, key=shared, default=None)
    if best is None:
        return None
    common = parts[: shared(best)]
    return best if any(part.isdigit() for part in common) else None
