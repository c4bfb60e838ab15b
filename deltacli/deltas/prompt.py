"""Prompt tuning (Lester et al., 2021): n trainable input embeddings prepended to every input.

A forward pre-hook on the model turns `input_ids` into embeddings, prepends the prompt, and
widens the attention mask and token types to match, exactly as PEFT does, so a saved prompt is
a PEFT adapter (`prompt_embeddings`, n × hidden).

Causal models read their answer at the last position and cannot find padding once they get
embeddings instead of ids; for them the padding is moved in front of the prompt and positions
are counted over real tokens only, so a padded batch gives each example's own result (PEFT
reads a pad there).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from deltacli.deltas.base import Delta, DeltaConfig, register
from deltacli.errors import DeltacliError
from deltacli.schema import option


@dataclasses.dataclass
class PromptConfig(DeltaConfig):
    length: int = option(20, "prompt vectors prepended to the input (n)")
    init: Literal["random", "vocab"] = option(
        "vocab", "start from random vectors or from the embeddings of random vocabulary tokens"
    )

    def __post_init__(self) -> None:
        if self.length < 1:
            raise DeltacliError(f"prompt length must be at least 1, got {self.length}")


@register
class Prompt(Delta):
    kind = "prompt"
    config_class = PromptConfig
    peft_type = "PROMPT_TUNING"
    peft_head_prefix = "base_model."
    config: PromptConfig

    def attach(self, model: nn.Module) -> None:
        vocabulary = model.get_input_embeddings()
        holder = nn.Module()
        holder.embedding = nn.Embedding(
            self.config.length,
            vocabulary.embedding_dim,
            device=vocabulary.weight.device,
            dtype=vocabulary.weight.dtype,
        )
        if self.config.init == "vocab" and vocabulary.weight.device.type != "meta":
            rows = torch.randint(0, vocabulary.num_embeddings, (self.config.length,))
            with torch.no_grad():
                holder.embedding.weight.copy_(vocabulary.weight[rows])
        model.add_module("prompt_encoder", holder)
        self.model, self.holder = model, holder
        self.causal = any(getattr(m, "is_causal", False) for m in model.modules())
        self._hook = model.register_forward_pre_hook(self._prepend, with_kwargs=True)
        self.params = {"prompt_encoder.embedding.weight": holder.embedding.weight}

    def _prepend(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)
        batch, length = embeds.shape[0], self.config.length
        prompt = self.holder.embedding.weight.unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)
        for name, fill in (("attention_mask", 1), ("token_type_ids", 0)):
            if kwargs.get(name) is not None:
                value = kwargs[name]
                lead = torch.full((batch, length), fill, dtype=value.dtype, device=value.device)
                kwargs[name] = torch.cat([lead, value], dim=1)
        if self.causal and kwargs.get("attention_mask") is not None:
            kwargs = _padding_first(kwargs)
        return (), kwargs

    def detach(self) -> None:
        self._hook.remove()
        del self.model.prompt_encoder
        super().detach()

    def peft_key(self, name: str) -> str:
        return "prompt_embeddings"

    def peft_config(self, model: nn.Module) -> dict:
        config = model.config
        return {
            "num_virtual_tokens": self.config.length,
            "token_dim": config.hidden_size,
            "num_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM",
        }


def _padding_first(kwargs: dict) -> dict:
    """Move padding to the front (stable, so prompt then tokens keep their order) and number
    positions over the real tokens only."""
    mask = kwargs["attention_mask"]
    order = torch.argsort(mask, dim=1, stable=True)
    for name in ("inputs_embeds", "attention_mask", "token_type_ids"):
        if kwargs.get(name) is not None:
            value = kwargs[name]
            index = order if value.ndim == 2 else order.unsqueeze(-1).expand_as(value)
            kwargs[name] = value.gather(1, index)
    kwargs["position_ids"] = (kwargs["attention_mask"].long().cumsum(1) - 1).clamp(min=0)
    return kwargs
