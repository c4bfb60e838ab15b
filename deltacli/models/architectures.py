"""One table of architectures: where each role sits in a model family, by name pattern.

Every delta kind that needs module names asks this table for *roles* (the attention's query,
the FFN's output, the self-attention sublayer ...) and turns them into its own targets: LoRA
takes query and value, SIFT the four attention projections, IA3 key, value and the FFN
output, the adapters and prefix tuning the sublayers. Adding an architecture is one entry
here; a test attaches every shipped kind to a tiny model of every entry.

Patterns follow `deltas.targets.matches`: a plain name is a suffix on dot boundaries
(`query` matches every layer's `...attention.self.query`), `re:` a regular expression.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from deltacli.errors import DeltacliError

# Top-level modules that are a task head rather than the pretrained body, in every family.
HEADS = ("pre_classifier", "classifier", "score", "classification_head")
# Top-level modules that map hidden states to the vocabulary.
LM_HEADS = ("lm_head",)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Name patterns of one family's roles. Fused projections (GPT-2's `c_attn`) fill several
    roles with one pattern; a kind that asks for several roles gets each pattern once."""

    query: str
    key: str
    value: str
    output: str  # the attention's output projection, in every attention (self and cross)
    ffn_input: str  # the FFN's first projection(s)
    ffn_output: str  # the FFN's last projection, whose output is the FFN sublayer's output
    self_attention: str  # the module whose input is the self-attention sublayer's input
    ffn: str  # the module whose input is the FFN sublayer's input
    # The projection whose output is the self-attention sublayer's output; `output` unless
    # the family also has cross-attention (T5, BART).
    self_attention_output: str | None = None
    # Whether attention runs through transformers' AttentionInterface (prefix tuning hooks it).
    attention_interface: bool = True
    # PEFT's IA3 preset (targets, feedforward) where it departs from (key, value, ffn_output)
    # and (ffn_output): kept so that deltacli's IA3 counts and files equal PEFT's.
    ia3: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def patterns(self, *roles: str) -> list[str]:
        """The patterns of `roles`, each once, in the order asked."""
        found = [getattr(self, role) for role in roles]
        return list(dict.fromkeys(p for p in found if p is not None))

    @property
    def sublayer_output(self) -> dict[str, str]:
        """Where the attention and FFN sublayers end, for the adapters' `at`."""
        return {"attention": self.self_attention_output or self.output, "ffn": self.ffn_output}

    @property
    def sublayer_input(self) -> dict[str, str]:
        """Which module's input each sublayer reads, for parallel adapters and prefixes."""
        return {"attention": self.self_attention, "ffn": self.ffn}


_BERT = Architecture(
    query="query",
    key="key",
    value="value",
    output="attention.output.dense",
    ffn_input="intermediate.dense",
    ffn_output=r"re:.*\.layer\.\d+\.output\.dense",
    self_attention="attention.self",
    ffn="intermediate",
    ia3=(("key", "value", "output.dense"), ("output.dense",)),
)
_LLAMA = Architecture(
    query="q_proj",
    key="k_proj",
    value="v_proj",
    output="o_proj",
    ffn_input=r"re:.*\.mlp\.(gate|up)_proj",
    ffn_output="mlp.down_proj",
    self_attention="self_attn",
    ffn="mlp",
)

ARCHITECTURES: dict[str, Architecture] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "deberta-v2": dataclasses.replace(
        _BERT,
        query="query_proj",
        key="key_proj",
        value="value_proj",
        attention_interface=False,
        ia3=None,
    ),
    "distilbert": Architecture(
        query="q_lin",
        key="k_lin",
        value="v_lin",
        output="out_lin",
        ffn_input="ffn.lin1",
        ffn_output="ffn.lin2",
        self_attention="attention",
        ffn="ffn",
        ia3=(("q_lin", "v_lin", "lin2"), ("lin2",)),
    ),
    "gpt2": Architecture(
        query="c_attn",
        key="c_attn",
        value="c_attn",
        output="attn.c_proj",
        ffn_input="mlp.c_fc",
        ffn_output="mlp.c_proj",
        self_attention="attn",
        ffn="mlp",
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "phi3": dataclasses.replace(
        _LLAMA,
        query="qkv_proj",
        key="qkv_proj",
        value="qkv_proj",
        ffn_input="mlp.gate_up_proj",
    ),
    "t5": Architecture(
        query="q",
        key="k",
        value="v",
        output="o",
        ffn_input=r"re:.*\.DenseReluDense\.wi(_[01])?",
        ffn_output="DenseReluDense.wo",
        self_attention="SelfAttention",
        self_attention_output="SelfAttention.o",
        ffn="DenseReluDense",
    ),
    "bart": Architecture(
        query="q_proj",
        key="k_proj",
        value="v_proj",
        output="out_proj",
        ffn_input=r"re:.*layers\.\d+\.fc1",
        ffn_output=r"re:.*layers\.\d+\.fc2",
        self_attention=r"re:.*layers\.\d+\.self_attn",
        self_attention_output=r"re:.*layers\.\d+\.self_attn\.out_proj",
        ffn=r"re:.*layers\.\d+\.fc1",
        ia3=(("q_proj", "v_proj", "fc2"), ("fc2",)),
    ),
}


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture(model: nn.Module, wanted: str, fix: str) -> Architecture:
    """The table's entry for `model`, or an error saying that `wanted` (e.g. "a LoRA target
    preset") needs one, and how to do without (`fix`)."""
    found = ARCHITECTURES.get(model_type(model))
    if found is None:
        raise DeltacliError(f"no {wanted} for model type {model_type(model)!r}; {fix}")
    return found
