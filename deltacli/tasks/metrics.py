"""Every metric deltacli reports, once: its exact display name, which way is better, and
whether it is a share (shown as a percentage). Scoring, the trainer's choice of the best
epoch, the report, the terminal tables and the model card all read it from here."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str  # the key in metrics.json
    display: str  # what tables print; `{positive_class}` is filled in from the scores
    higher_is_better: bool
    share: bool  # a fraction in [0, 1], shown as a percentage


_ALL = (
    Metric("accuracy", "accuracy", True, True),
    Metric("f1", "F1 (positive class: {positive_class})", True, True),
    Metric("macro_f1", "macro-F1", True, True),
    Metric("weighted_f1", "weighted F1", True, True),
    Metric("mcc", "Matthews corr.", True, False),
    Metric("perplexity", "perplexity", False, False),
    Metric("exact_match", "exact match", True, True),
    Metric("rouge_l", "ROUGE-L", True, True),
    Metric("bleu", "BLEU", True, False),  # sacrebleu's 0-100 scale
    Metric("reward_accuracy", "reward accuracy", True, True),
    Metric("reward_margin", "reward margin", True, False),
    Metric("preference_accuracy", "log p(chosen) > log p(rejected)", True, True),
    Metric("chosen_reward", "chosen reward", True, False),
    Metric("rejected_reward", "rejected reward", False, False),
    Metric("chosen_logp", "log p(chosen)", True, False),
    Metric("rejected_logp", "log p(rejected)", False, False),
    Metric("loss", "loss", False, False),
)
METRICS: dict[str, Metric] = {m.name: m for m in _ALL}


def metric(name: str) -> Metric:
    return METRICS[name]


def oriented(name: str, value: float) -> float:
    """`value` turned so that larger is better (loss and perplexity flip)."""
    return value if METRICS[name].higher_is_better else -value


def metric_rows(scores: dict, with_loss: bool = False) -> list[tuple[str, float]]:
    """(display name, value) of each metric present in `scores`, in the registry's order;
    F1 names its positive class. The loss only `with_loss`."""
    positive = scores.get("positive_class", "?")
    return [
        (m.display.format(positive_class=positive), scores[m.name])
        for m in _ALL
        if m.name in scores and (with_loss or m.name != "loss")
    ]
