"""Metrics agree with scikit-learn's: GLUE's F1 (the positive class) for two labels, macro and
weighted F1 for more, Matthews correlation for all; each named exactly in the tables."""

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from deltacli.render import metric_rows
from deltacli.tasks.scoring import classification_metrics, positive_class

# A fixed binary prediction set (MRPC-like: mostly positive), on which macro- and GLUE F1 differ.
TRUTH = [1, 1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1]
GUESS = [1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1]


def test_binary_f1_is_the_positive_class_f1_that_glue_reports():
    ours = classification_metrics(torch.tensor(GUESS), torch.tensor(TRUTH), classes=2, positive=1)
    assert ours["f1"] == pytest.approx(f1_score(TRUTH, GUESS, average="binary"))
    assert ours["macro_f1"] == pytest.approx(f1_score(TRUTH, GUESS, average="macro"))
    assert ours["f1"] != pytest.approx(ours["macro_f1"])
    flipped = classification_metrics(
        torch.tensor(GUESS), torch.tensor(TRUTH), classes=2, positive=0
    )
    assert flipped["f1"] == pytest.approx(f1_score(TRUTH, GUESS, average="binary", pos_label=0))
    assert "weighted_f1" not in ours


@pytest.mark.parametrize("classes", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(classes, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (200,), generator=generator)
    noise = torch.randint(0, classes, (200,), generator=generator)
    keep = torch.rand(200, generator=generator) < 0.6
    predictions = torch.where(keep, labels, noise)
    ours = classification_metrics(predictions, labels, classes)
    assert ours["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert ours["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert ours["mcc"] == pytest.approx(matthews_corrcoef(labels, predictions))
    if classes > 2:
        assert ours["weighted_f1"] == pytest.approx(
            f1_score(labels, predictions, average="weighted")
        )
        assert "f1" not in ours


def test_constant_predictions_have_zero_correlation():
    labels = torch.tensor([0, 1, 0, 1])
    metrics = classification_metrics(torch.zeros(4, dtype=torch.long), labels, 2)
    assert metrics["mcc"] == 0.0
    assert metrics["accuracy"] == 0.5
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, [0, 0, 0, 0], average="macro"))
    assert metrics["f1"] == pytest.approx(f1_score(labels, [0, 0, 0, 0], zero_division=0))


@pytest.mark.parametrize(
    ("labels", "positive"),
    [([0, 1], 1), (["neg", "pos"], 1), (["negative", "positive"], 1), (["false", "true"], 1),
     (["yes", "no"], 0), (["not_entailment", "entailment"], 1), (["a", "b"], 1)],
)  # fmt: skip
def test_the_positive_class_is_named_one_true_positive_or_else_the_second(labels, positive):
    assert positive_class(labels) == positive


def test_tables_name_f1_with_its_class():
    rows = dict(metric_rows({"accuracy": 0.8, "f1": 0.87, "macro_f1": 0.77, "positive_class": "1"}))
    assert rows == {"accuracy": 0.8, "F1 (positive class: 1)": 0.87, "macro-F1": 0.77}
