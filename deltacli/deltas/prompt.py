"""Prompt tuning (Lester et al., 2021): n trainable input embeddings prepended to every input.

A forward pre-hook on the model turns `input_ids` into embeddings, prepends the prompt, and
widens the attention mask and token types to match, exactly as PEFT does, so a saved prompt is
a PEFT adapter (`prompt_embeddings`, n × hidden).

Causal classifiers read their answer at the last position and cannot find padding once they
get embeddings instead of ids; for them the padding is moved in front of the prompt and
positions are counted over real tokens only, so a padded batch gives each example's own result
(PEFT reads a pad there). Causal LMs get -100 labels for the prompt, and during generation the
cached prompt is counted in the mask and the positions.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from deltacli.config.schema import AT_LEAST_ONE, option
from deltacli.deltas.base import (
    DeltaConfig,
    PromptLearning,
    register,
    trainable_like,
)
from deltacli.errors import DeltacliError
from deltacli.labels import IGNORE
from deltacli.models.architectures import HEADS


@dataclasses.dataclass
class PromptConfig(DeltaConfig):
    length: int = option(20, "prompt vectors prepended to the input (n)", AT_LEAST_ONE)
    init: Literal["random", "vocab"] = option(
        "vocab", "start from random vectors or from the embeddings of random vocabulary tokens"
    )


@register
class Prompt(PromptLearning):
    kind = "prompt"
    config_class = PromptConfig
    peft_type = "PROMPT_TUNING"
    config: PromptConfig

    def attach(self, model: nn.Module) -> None:
        vocabulary = model.get_input_embeddings()
        holder = nn.Module()
        holder.embedding = nn.Embedding(
            self.config.length, vocabulary.embedding_dim, **trainable_like(vocabulary.weight)
        )
        if self.config.init == "vocab" and vocabulary.weight.device.type != "meta":
            rows = torch.randint(0, vocabulary.num_embeddings, (self.config.length,))
            with torch.no_grad():
                holder.embedding.weight.copy_(vocabulary.weight[rows])
        self.add_module(model, "prompt_encoder", holder)
        self.holder = holder
        self.causal = any(getattr(m, "is_causal", False) for m in model.modules())
        self.classifier = any(name in HEADS for name, _ in model.named_children())
        self.add_hook(model.register_forward_pre_hook, self._prepend, with_kwargs=True)
        self.params = {"prompt_encoder.embedding.weight": holder.embedding.weight}

    def _prepend(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        length = self.config.length
        if kwargs.get("encoder_outputs") is not None:
            raise DeltacliError(
                "prompt tuning cannot generate with encoder-decoder models yet; "
                "score their loss instead (deltacli eval without --generate)"
            )
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and cache.get_seq_length() > 0:
            return (), _after_prompt(kwargs, length)  # a later generation step: prompt is cached
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)
        batch = embeds.shape[0]
        prompt = self.holder.embedding.weight.unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)
        for name, fill in (("attention_mask", 1), ("token_type_ids", 0), ("labels", IGNORE)):
            value = kwargs.get(name)
            if value is not None and (name != "labels" or value.ndim == 2):
                lead = torch.full((batch, length), fill, dtype=value.dtype, device=value.device)
                kwargs[name] = torch.cat([lead, value], dim=1)
        if kwargs.get("position_ids") is not None:
            lead = torch.arange(length, device=embeds.device).expand(batch, -1)
            kwargs["position_ids"] = torch.cat([lead, kwargs["position_ids"] + length], dim=1)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(length + embeds.shape[1], device=embeds.device)
        # A causal classifier reads its last position, and generation continues from it: both
        # want the padding in front. Training a causal LM keeps the rows as the labels have
        # them (whether or not the labels are passed in: the trainer computes its own loss).
        token_labels = kwargs.get("labels") is not None and kwargs["labels"].ndim == 2
        generating = not model.training and not token_labels
        if (
            self.causal
            and (self.classifier or generating)
            and kwargs.get("attention_mask") is not None
        ):
            kwargs = _padding_first(kwargs)
        return (), kwargs

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

    @classmethod
    def from_peft(cls, config: dict) -> dict:
        return {"kind": cls.kind, "length": config["num_virtual_tokens"]}


def _after_prompt(kwargs: dict, length: int) -> dict:
    """A generation step after the first: the cache holds the prompt, so the mask and the
    positions count it."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        lead = torch.ones(mask.shape[0], length, dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = torch.cat([lead, mask], dim=1)
    for name in ("position_ids", "cache_position"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name] + length
    return kwargs


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
