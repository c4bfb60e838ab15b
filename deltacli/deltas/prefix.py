"""Prefix tuning (Li & Liang, 2021): l trainable key/value vectors prepended in every attention
layer, so every query can attend to them.

The prefix enters through the attention computation itself, not through `past_key_values`
(which transformers 5 is retiring, and on which PEFT's prefix tuning fails for BERT-family
encoders): deltacli registers its own attention function and mask builder with transformers,
which prepend each layer's prefix to the keys and values and let every query see it. The
prefix may be reparameterised through an MLP while training (`projection`); the saved delta
holds the MLP's output, in PEFT's `prompt_embeddings` layout (l × 2·layers·kv_width).
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from deltacli.config.schema import AT_LEAST_ONE, option
from deltacli.deltas.base import (
    DeltaConfig,
    PromptLearning,
    register,
    trainable_like,
    whole,
)
from deltacli.deltas.targets import modules_by_name, select
from deltacli.errors import DeltacliError
from deltacli.models.architectures import architecture

ATTENTION = "deltacli_prefix"
# attention module -> the Prefix delta that feeds it, and its layer's position in the stack
_FEEDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prefixed_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention with this layer's prefix prepended to keys and values."""
    fed = _FEEDS.get(module)
    if fed is not None and fed[0].enabled:
        delta, layer = fed
        prefix_key, prefix_value = delta.layer_prefix(layer, key)
        length = prefix_key.shape[2]
        attention_mask = _widen_mask(attention_mask, length, query, key, module)
        if kwargs.get("position_bias") is not None:  # T5: no relative bias toward the prefix
            kwargs["position_bias"] = F.pad(kwargs["position_bias"], (length, 0))
        key = torch.cat([prefix_key, key], dim=2)
        value = torch.cat([prefix_value, value], dim=2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _widen_mask(mask, length: int, query, key, module):
    """The mask with `length` leading key columns every query may attend to."""
    if mask is not None:
        attend = True if mask.dtype == torch.bool else 0.0
        return F.pad(mask, (length, 0), value=attend)
    queries, keys = query.shape[2], key.shape[2]
    if not (getattr(module, "is_causal", False) and queries > 1):
        return None  # no padding and no causality: everything attends, the prefix too
    # sdpa's own causal flag would align the wrong corner once keys outnumber queries.
    causal = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril(keys - queries)
    prefix = torch.ones(queries, length, dtype=torch.bool, device=query.device)
    return torch.cat([prefix, causal], dim=1)[None, None]


AttentionInterface.register(ATTENTION, _prefixed_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@dataclasses.dataclass
class PrefixConfig(DeltaConfig):
    length: int = option(30, "prefix vectors per layer (l)", AT_LEAST_ONE)
    projection: int | None = option(
        None,
        "train the prefix through an MLP of this width (folded away when saved); null: directly",
    )


class PrefixEncoder(nn.Module):
    """The prefix of every layer as one (l × 2·layers·kv_width) matrix, PEFT's layout."""

    def __init__(self, length: int, width: int, hidden: int, projection: int | None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(length, hidden if projection else width)
        self.transform = (
            nn.Sequential(nn.Linear(hidden, projection), nn.Tanh(), nn.Linear(projection, width))
            if projection
            else None
        )

    def forward(self) -> torch.Tensor:
        weight = self.embedding.weight
        return self.transform(weight) if self.transform is not None else weight


@register
class Prefix(PromptLearning):
    kind = "prefix"
    config_class = PrefixConfig
    peft_type = "PREFIX_TUNING"
    config: PrefixConfig

    def attach(self, model: nn.Module) -> None:
        config = model.config
        found = architecture(model, "attention preset", "prefix tuning needs a known architecture")
        if not found.attention_interface:
            raise DeltacliError(
                f"prefix tuning enters through transformers' attention interface, which "
                f"{config.model_type} does not use; try lora, adapter or prompt instead"
            )
        modules = modules_by_name(model)
        attention = select(modules, [found.self_attention], what="attention module")
        self.layers = len(attention)
        heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        width = self.layers * 2 * self.kv_heads * self.head_dim
        like = trainable_like(model.get_input_embeddings().weight)
        encoder = PrefixEncoder(
            self.config.length, width, config.hidden_size, self.config.projection
        )
        self.add_module(model, "prefix_encoder", encoder.to(**like))
        self.encoder = encoder
        previous = config._attn_implementation
        if previous not in (None, "sdpa", "eager", ATTENTION):
            raise DeltacliError(
                f"prefix tuning prepends keys through sdpa, so attention: {previous} cannot run "
                "it; leave attention at auto"
            )
        model.set_attn_implementation(ATTENTION)
        self.on_detach(partial(model.set_attn_implementation, previous))
        for layer, name in enumerate(attention):
            _FEEDS[modules[name]] = (self, layer)
            self.on_detach(partial(_FEEDS.pop, modules[name], None))
        # A decoder's prefix is l earlier tokens (PEFT's cache): its tokens count from l. An
        # encoder's absolute positions stay as pretrained (BERT's [CLS] stays at 0).
        causal = any(getattr(modules[name], "is_causal", False) for name in attention)
        accepts = "position_ids" in inspect.signature(model.forward).parameters
        self._shifts_positions = causal and accepts
        self.add_hook(model.register_forward_pre_hook, self._refresh, with_kwargs=True)
        self.add_hook(model.register_forward_hook, self._release)
        self._current: torch.Tensor | None = None
        self.params = {f"prefix_encoder.{n}": p for n, p in encoder.named_parameters()}

    def _refresh(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Compute every layer's prefix once per forward pass (through the MLP, if any); in a
        decoder, number the real tokens after the prefix, as the prefix's original form (a
        cache of l earlier tokens) does: positions l, l+1, ... instead of 0, 1, ..."""
        self._current = self.encoder()
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if self._shifts_positions and ids is not None:
            positions = kwargs.get("position_ids")
            if positions is None:
                cached = kwargs.get("cache_position")
                positions = (
                    cached if cached is not None else torch.arange(ids.shape[1], device=ids.device)
                )
                positions = positions.unsqueeze(0).expand(ids.shape[0], -1)
            kwargs["position_ids"] = positions + self.config.length
        return args, kwargs

    def _release(self, model: nn.Module, args: tuple, output: object) -> None:
        self._current = None  # do not keep the graph alive between passes

    def layer_prefix(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values, shaped (batch, kv_heads, l, head_dim) like `like`."""
        prefix = self._current if self._current is not None else self.encoder()
        length = prefix.shape[0]
        pairs = prefix.view(length, self.layers * 2, self.kv_heads, self.head_dim)
        key, value = (
            pairs[:, 2 * layer + i].transpose(0, 1).unsqueeze(0).expand(like.shape[0], -1, -1, -1)
            for i in (0, 1)
        )
        return key.to(like.dtype), value.to(like.dtype)

    def export(self) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        """The prefix as trained, MLP folded: what inference needs and PEFT loads."""
        whole_params = {name: whole(p) for name, p in self.encoder.named_parameters()}
        with torch.no_grad():
            folded = functional_call(self.encoder, whole_params, ()).detach()
        config = dataclasses.replace(self.config, projection=None)
        return config, {"prefix_encoder.embedding.weight": folded}

    def peft_config(self, model: nn.Module) -> dict:
        width = self.kv_heads * self.head_dim
        return {
            "num_virtual_tokens": self.config.length,
            "token_dim": width,
            "num_layers": self.layers,
            "num_attention_heads": self.kv_heads,
            "num_transformer_submodules": 1,
            "encoder_hidden_size": width,
            "prefix_projection": False,
        }

    @classmethod
    def from_peft(cls, config: dict) -> dict:
        # PEFT saves a reparameterised prefix folded, as deltacli does.
        return {"kind": cls.kind, "length": config["num_virtual_tokens"]}
