"""Preference pairs: a prompt, the answer people preferred and the one they rejected; the
losses that learn from them (DPO, IPO, SimPO, ORPO) and the metrics that show it.

Records come in TRL's formats, so a preference dataset made for TRL trains here unchanged:
- `prompt`, `chosen`, `rejected` as strings (an end-of-sequence token is added to each
  answer), or as message lists rendered by the tokenizer's chat template;
- `chosen` and `rejected` only (implicit prompt): the prompt is their common prefix.

Tokenisation follows TRL's DPOTrainer: the prompt alone and prompt + answer are tokenised,
and the answer starts where the two token lists part (a template may render a prompt alone
differently). Prompt tokens get label -100, so only the answers are scored; each pair is one
term of the loss, however long its answers.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterable

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from deltacli.config.sections import DataConfig, TrainConfig
from deltacli.errors import DeltacliError
from deltacli.labels import IGNORE
from deltacli.tasks.generation import PLAIN_CHAT_TEMPLATE, chat_text
from deltacli.tasks.losses import aligned, precise
from deltacli.tasks.tables import REFERENCE_COLUMNS, Encoded, TaskData

ANSWERS = ("chosen", "rejected")
# The usual β of each loss where a recipe leaves train.beta unset (TRL's defaults; SimPO's
# paper uses β = 2 to 2.5 with a target margin γ = 0.5 to 1.6).
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}


def prepare_pairs(
    train: datasets.Dataset,
    evaluation: datasets.Dataset,
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    mask_prompt: bool,
) -> TaskData:
    """Both sets as token pairs; the eval prompts with their chosen answers (for previews)."""
    train_encoded = encode_pairs(train, tokenizer, config)
    eval_encoded = encode_pairs(evaluation, tokenizer, config)
    truncated = train_encoded.truncated + eval_encoded.truncated
    prompts = pair_prompts(evaluation, config, tokenizer)
    return TaskData(train_encoded.table, eval_encoded.table, None, truncated, prompts)


def pairs_for_scoring(
    table: datasets.Dataset, config: DataConfig, tokenizer: PreTrainedTokenizerBase, source: str
) -> tuple[datasets.Dataset, None]:
    return encode_pairs(table, tokenizer, config).table, None


def encode_pairs(
    table: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, config: DataConfig
) -> Encoded:
    """`chosen_input_ids`/`chosen_labels` and the same for `rejected`: prompt + answer, cut
    at `max_length` tokens (the answer is cut, never the prompt)."""
    missing = [c for c in ANSWERS if c not in table.column_names]
    if missing:
        raise DeltacliError(
            f"preference data needs the columns chosen and rejected (and optionally prompt); "
            f"missing {', '.join(missing)} (columns: {', '.join(table.column_names)})"
        )
    rows: dict[str, list] = {f"{a}_{k}": [] for a in ANSWERS for k in ("input_ids", "labels")}
    truncated = 0
    for number, record in enumerate(table, start=1):
        prompt, answers = _token_pair(record, tokenizer, number)
        if len(prompt) >= config.max_length:
            raise DeltacliError(
                f"record {number}: its prompt is {len(prompt)} tokens, which leaves no room "
                f"for an answer within data.max_length={config.max_length}; raise max_length"
            )
        cut = False
        for answer, ids in zip(ANSWERS, answers, strict=True):
            sequence = (prompt + ids)[: config.max_length]
            cut |= len(prompt) + len(ids) > config.max_length
            rows[f"{answer}_input_ids"].append(sequence)
            rows[f"{answer}_labels"].append([IGNORE] * len(prompt) + sequence[len(prompt) :])
        truncated += cut
    return Encoded(datasets.Dataset.from_dict(rows), truncated)


def _token_pair(
    record: dict, tokenizer: PreTrainedTokenizerBase, number: int
) -> tuple[list[int], tuple[list[int], list[int]]]:
    """The prompt's tokens and each answer's, as TRL's DPOTrainer tokenises them."""
    record = {"prompt": None} | record  # no prompt column: the prompt is implicit
    chosen, rejected, prompt = record["chosen"], record["rejected"], record["prompt"]
    if chosen is None or rejected is None:
        raise DeltacliError(f"record {number}: chosen and rejected must both be given")
    if prompt is None:
        prompt, chosen, rejected = split_prompt(chosen, rejected)
    conversational = isinstance(chosen, list)
    if conversational != isinstance(rejected, list) or (
        conversational and not isinstance(prompt, list)
    ):
        raise DeltacliError(
            f"record {number}: prompt, chosen and rejected must all be strings or all be "
            "message lists"
        )
    if chosen == rejected:
        raise DeltacliError(f"record {number}: chosen and rejected are the same answer")
    if conversational:
        prompt_ids = _chat_ids(tokenizer, prompt, generation_prompt=True)
        full = [_chat_ids(tokenizer, prompt + answer) for answer in (chosen, rejected)]
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = [
            tokenizer(prompt + (a if a.endswith(eos) else a + eos))["input_ids"]
            for a in (chosen, rejected)
        ]
    start = min(_common_prefix(prompt_ids, ids) for ids in full)
    answers = (full[0][start:], full[1][start:])
    if not all(answers):
        raise DeltacliError(f"record {number}: an answer is empty once the prompt is removed")
    return prompt_ids[:start], answers


def split_prompt(chosen, rejected) -> tuple:
    """An implicit prompt: the longest common prefix of the two answers (characters of
    strings, whole messages of conversations), as TRL's `extract_prompt` finds it."""
    index = 0
    for index in range(min(len(chosen), len(rejected))):
        if chosen[index] != rejected[index]:
            if isinstance(chosen, str) and index and chosen[index - 1] == " ":
                index -= 1  # the space belongs to the answer
            break
    return chosen[:index], chosen[index:], rejected[index:]


def _chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False
) -> list[int]:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=tokenizer.chat_template or PLAIN_CHAT_TEMPLATE,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=generation_prompt,
    )["input_ids"]


def _common_prefix(ids: list[int], other: list[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def pair_prompts(
    table: datasets.Dataset, config: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, str]]:
    """(prompt text, chosen answer) for generation previews and `eval --generate`."""
    pairs = []
    for record in table:
        record = {"prompt": None} | record  # no prompt column: the prompt is implicit
        chosen, prompt = record["chosen"], record["prompt"]
        if prompt is None:
            prompt, chosen, _ = split_prompt(chosen, record["rejected"])
        if isinstance(chosen, list):
            text = chat_text(tokenizer, prompt, generation_prompt=True)
            pairs.append((text, chosen[-1]["content"]))
        else:
            pairs.append((prompt, chosen))
    return pairs


def pad_pairs(tokenizer: PreTrainedTokenizerBase, table: datasets.Dataset) -> Callable:
    """A batch of B pairs as 2B rows, the chosen answers first; the precomputed reference
    log-probabilities (if the table has them) in the same order.

    Rows are padded on the left and numbered from their first real token (`position_ids`),
    so that every answer ends at the last position: the model then computes the logits of
    the last few positions only (`answer_logps`), not a vocabulary-wide row per prompt token.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [row[f"{a}_input_ids"] for a in ANSWERS for row in rows]
        labels = [row[f"{a}_labels"] for a in ANSWERS for row in rows]
        width = max(map(len, sequences))
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
        batch = {
            "input_ids": torch.tensor([[pad] * (width - len(s)) + s for s in sequences]),
            "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "labels": torch.tensor([[IGNORE] * (width - len(s)) + s for s in labels]),
        }
        if REFERENCE_COLUMNS[0] in rows[0]:
            reference = [row[c] for c in REFERENCE_COLUMNS for row in rows]
            batch["reference_logps"] = torch.tensor(reference, dtype=torch.float64)
        return batch

    return collate


def pair_units(labels: list[int]) -> int:
    """Each pair is one term of the loss."""
    return 1


@dataclasses.dataclass(frozen=True)
class Logps:
    """Summed log-probabilities of each answer's tokens, and how many tokens each has."""

    sums: torch.Tensor
    counts: torch.Tensor

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sums.chunk(2)

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.sums / self.counts.clamp(min=1)).chunk(2)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def policy_logps(model: nn.Module, batch: dict) -> Logps:
    """The model's log-probabilities of every row's answer in a padded pair batch, asking
    the model (where it can) for the logits of the positions that score answers only."""
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    labels = batch["labels"]
    if _keeps_logits(model):
        answered = (labels != IGNORE).any(0).nonzero()
        keep = labels.shape[1] - int(answered.min()) + 1 if len(answered) else 1
        inputs["logits_to_keep"] = keep
        labels = labels[:, -keep:]
    return answer_logps(model(**inputs).logits, labels)


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do)."""
    return _takes_logits_to_keep(type(getattr(model, "module", model)))  # inside DDP too


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """Read once per class: this runs on every pass of a training step."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> Logps:
    """log p(answer | prompt) of every row: the logits at t score the label at t + 1. A
    prompt delta prepends positions, so the logits are aligned on the labels' last ones.
    Row by row, so that only one row's vocabulary-wide log-softmax exists at a time."""
    logits, labels = aligned(logits, labels, shift=True)
    mask = labels != IGNORE
    targets = labels.masked_fill(~mask, 0)
    sums = []
    for row, target, keep in zip(logits, targets, mask, strict=True):
        row = precise(row)
        picked = row.gather(-1, target[:, None]).squeeze(-1) - row.logsumexp(-1)
        sums.append((picked * keep).sum())
    return Logps(torch.stack(sums), mask.sum(1))


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    """One of the pairwise losses, with its settings (`train.loss`, `beta` ...)."""

    name: str  # dpo | ipo | simpo | orpo
    beta: float
    gamma: float = 0.5  # SimPO's target reward margin
    smoothing: float = 0.0  # cDPO/SimPO: the share of pairs assumed to be flipped
    sft_weight: float = 0.0  # RPO: the weight of the chosen answer's mean NLL

    @classmethod
    def from_train(cls, train: TrainConfig) -> PreferenceLoss:
        name = "dpo" if train.loss == "auto" else train.loss
        beta = train.beta if train.beta is not None else DEFAULT_BETA[name]
        return cls(name, beta, train.simpo_gamma, train.label_smoothing, train.sft_weight)

    @property
    def needs_reference(self) -> bool:
        """DPO and IPO compare with a reference policy; SimPO and ORPO need none."""
        return self.name in ("dpo", "ipo")

    def terms(self, policy: Logps, reference: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per pair: the loss and the implicit rewards (TRL's definitions), with the
        policy's log-probabilities of both answers and whether it gives the chosen answer
        the higher one (meaningful before training too, when every reward is 0).
        `reference`: the reference's summed log-probabilities, chosen then rejected."""
        chosen, rejected = policy.halves()
        chosen_count, rejected_count = policy.counts.chunk(2)
        if self.needs_reference:
            reference_chosen, reference_rejected = reference.to(chosen.dtype).chunk(2)
            chosen_ratio, rejected_ratio = chosen - reference_chosen, rejected - reference_rejected
            if self.name == "dpo":
                loss = self._smoothed(self.beta * (chosen_ratio - rejected_ratio))
            else:  # IPO, on ratios per answer token as TRL normalises them
                per_token = chosen_count.clamp(min=1), rejected_count.clamp(min=1)
                gap = chosen_ratio / per_token[0] - rejected_ratio / per_token[1]
                loss = (gap - 1 / (2 * self.beta)) ** 2
            rewards = self.beta * chosen_ratio, self.beta * rejected_ratio
        else:
            chosen_mean, rejected_mean = policy.means()
            if self.name == "simpo":
                loss = self._smoothed(self.beta * (chosen_mean - rejected_mean) - self.gamma)
            else:  # ORPO: the chosen answer's NLL plus β times the odds-ratio term
                log_odds = (chosen_mean - rejected_mean) - (
                    _log1mexp(chosen_mean) - _log1mexp(rejected_mean)
                )
                loss = -chosen_mean - self.beta * F.logsigmoid(log_odds)
            rewards = self.beta * chosen_mean, self.beta * rejected_mean
        if self.sft_weight and self.name != "orpo":
            loss = loss - self.sft_weight * policy.means()[0]
        return {
            "loss": loss,
            "reward_accuracy": (rewards[0] > rewards[1]).to(loss.dtype),
            "preference_accuracy": (chosen > rejected).to(loss.dtype),
            "reward_margin": rewards[0] - rewards[1],
            "chosen_reward": rewards[0],
            "rejected_reward": rewards[1],
            "chosen_logp": chosen,
            "rejected_logp": rejected,
        }

    def _smoothed(self, logits: torch.Tensor) -> torch.Tensor:
        """-log σ(x), or with label smoothing ε the conservative form (cDPO)."""
        clean = -F.logsigmoid(logits)
        if not self.smoothing:
            return clean
        return (1 - self.smoothing) * clean - self.smoothing * F.logsigmoid(-logits)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def score_pairs(
    model: nn.Module,
    batches: Iterable[dict],
    accelerator: Accelerator,
    labels: list | None = None,
    *,
    loss: PreferenceLoss,
) -> dict:
    """The mean loss, reward accuracy and margin, the rewards and log-probabilities of both
    answers over every pair (the reference's log-probabilities come precomputed with the
    batches)."""
    sums: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        terms = loss.terms(policy_logps(model, batch), batch.get("reference_logps"))
        gathered = accelerator.gather_for_metrics({k: v.double() for k, v in terms.items()})
        for name, values in gathered.items():
            sums.setdefault(name, []).append(values.cpu())
    means = {name: float(torch.cat(values).mean()) for name, values in sums.items()}
    return {**means, "examples": len(torch.cat(sums["loss"]))}


def score_options(train: TrainConfig) -> dict:
    """What the scorer needs from the recipe: the loss and its β."""
    return {"loss": PreferenceLoss.from_train(train)}
