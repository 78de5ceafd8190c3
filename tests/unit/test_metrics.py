"""tasks.metrics against scikit-learn's definitions, ties and edge cases included."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from tasks.metrics import classification_metrics


@pytest.mark.parametrize(
    ("rows", "positive_rate", "decimals"),
    [(2, 0.5, None), (50, 0.3, None), (5000, 0.01, 2), (5000, 0.2, 1), (100_000, 0.05, 3)],
)
def test_metrics_equal_scikit_learn(rows: int, positive_rate: float, decimals: int | None) -> None:
    rng = np.random.default_rng(rows)
    y = (rng.random(rows) < positive_rate).astype(np.float32)
    y[:2] = [1, 0]  # both classes
    # scores that carry signal, rounded to make many ties when `decimals` is set
    p = np.clip(rng.random(rows) * 0.7 + 0.3 * y, 0, 1).astype(np.float32)
    if decimals is not None:
        p = np.round(p, decimals)
    got = classification_metrics(y, p)
    assert got["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert got["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    clipped = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    assert got["log_loss"] == pytest.approx(log_loss(y, clipped), rel=1e-12)
    assert got["rows"] == rows
    assert got["positive_rate"] == pytest.approx(y.mean())


def test_all_tied_scores_give_chance_auc_and_the_base_rate() -> None:
    y = np.array([1, 0, 0, 1, 0, 0, 0, 0])
    got = classification_metrics(y, np.full(8, 0.4))
    assert got["roc_auc"] == 0.5
    assert got["pr_auc"] == pytest.approx(0.25)


def test_perfect_and_reversed_rankings() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.7])
    assert classification_metrics(y, p)["roc_auc"] == 1.0
    assert classification_metrics(y, p)["pr_auc"] == 1.0
    assert classification_metrics(y, 1 - p)["roc_auc"] == 0.0


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_has_no_auc_but_a_log_loss(label: int) -> None:
    got = classification_metrics(np.full(5, label), np.full(5, 0.25))
    assert np.isnan(got["roc_auc"]) and np.isnan(got["pr_auc"])
    expected = -np.log(0.25) if label else -np.log(0.75)
    assert got["log_loss"] == pytest.approx(expected)


def test_extreme_scores_are_clipped_for_log_loss_only() -> None:
    y = np.array([1, 0, 1, 0])
    p = np.array([1.0, 0.0, 1e-9, 2e-9])  # the 1e-9 vs 2e-9 order is kept for the AUC
    got = classification_metrics(y, p)
    assert np.isfinite(got["log_loss"])
    assert got["roc_auc"] == pytest.approx(roc_auc_score(y, p))
