"""Every saved delta carries a model card (README.md): labels in id order, metrics per epoch
with exact names, and load snippets that run, so a PEFT user gets the label names too."""

import re

import pytest
import torch

from deltacli.storage.card import CARD_FILE
from deltacli.training.runs import train
from helpers import tiny_recipe


def snippets(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


@pytest.mark.parametrize("delta", [{"kind": "lora", "r": 2}, {"kind": "adapter", "r": 4}])
def test_a_saved_delta_has_a_card_whose_snippets_load_it_with_its_labels(
    tiny_bert, sentiment, tmp_path, delta
):
    train(tiny_recipe(tiny_bert, sentiment, delta, max_steps=2), tmp_path / "out")
    card = (tmp_path / "out" / CARD_FILE).read_text()
    assert "| labels (id order) | 0: `neg`, 1: `pos` |" in card
    assert "F1 (positive class: pos)" in card and "macro-F1" in card
    found = snippets(card)
    assert len(found) == (2 if delta["kind"] == "lora" else 1)  # PEFT has LoRA, not adapters
    for snippet in found:
        scope: dict = {}
        exec(snippet, scope)  # the lines a user copies, as they are
        model = scope["model"].eval()
        assert model.config.id2label == {0: "neg", 1: "pos"}
        with torch.no_grad():
            assert model(input_ids=torch.tensor([[2, 8, 3]])).logits.shape == (1, 2)
