"""Metrics agree with scikit-learn's reference implementations."""

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from deltacli.scoring import classification_metrics


@pytest.mark.parametrize("classes", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(classes, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (200,), generator=generator)
    noise = torch.randint(0, classes, (200,), generator=generator)
    keep = torch.rand(200, generator=generator) < 0.6
    predictions = torch.where(keep, labels, noise)
    ours = classification_metrics(predictions, labels)
    assert ours["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert ours["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert ours["mcc"] == pytest.approx(matthews_corrcoef(labels, predictions))


def test_constant_predictions_have_zero_correlation():
    labels = torch.tensor([0, 1, 0, 1])
    metrics = classification_metrics(torch.zeros(4, dtype=torch.long), labels)
    assert metrics["mcc"] == 0.0
    assert metrics["accuracy"] == 0.5
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, [0, 0, 0, 0], average="macro"))
