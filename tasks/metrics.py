"""Binary classification metrics computed with the array module of their inputs: NumPy on the
CPU, CuPy on the GPU (the test predictions never leave the device to be scored).

ROC AUC and average precision share one sort of the scores and follow scikit-learn's definitions,
ties included: the curves step once per distinct score, ROC AUC is the trapezoidal area under
(FPR, TPR), and average precision is sum over thresholds of (R_k - R_{k-1}) * P_k. scikit-learn
needs several sorts and passes over the data, which made it most of a training stage's time
after the fit on a test split of millions of rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.drift import array_module_of

PROBABILITY_CLIP = 1e-7


def classification_metrics(y: Any, p: Any) -> dict[str, float]:
    """ROC AUC, PR AUC (average precision) and log loss of scores `p` for 0/1 labels `y`; the
    AUCs are NaN when `y` has a single class. Log loss clips `p` to [1e-7, 1 - 1e-7]."""
    xp = array_module_of(p)
    y = xp.asarray(y).reshape(-1).astype(xp.int64)
    p = xp.asarray(p).reshape(-1)
    rows = int(y.shape[0])
    positives = int(y.sum())
    clipped = xp.clip(p.astype(xp.float64), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    log_loss = -(y * xp.log(clipped) + (1 - y) * xp.log1p(-clipped)).mean() if rows else np.nan
    single_class = positives in (0, rows)
    # the curves rank the scores as given (float32 sorts faster than float64, and clipping
    # would merge distinct extreme scores into ties)
    roc_auc, pr_auc = (np.nan, np.nan) if single_class else _curve_areas(xp, y, p)
    return {
        "roc_auc": float(roc_auc),
        "pr_auc": float(pr_auc),
        "log_loss": float(log_loss),
        "rows": float(rows),
        "positive_rate": positives / rows if rows else float("nan"),
    }


def _curve_areas(xp: Any, y: Any, p: Any) -> tuple[float, float]:
    """(ROC AUC, average precision) from one descending sort; both classes present."""
    order = xp.argsort(-p)
    p_sorted, y_sorted = p[order], y[order]
    # the last row of each run of equal scores: one point of each curve per distinct score
    last_of_run = xp.flatnonzero(xp.diff(p_sorted) != 0)
    ends = xp.concatenate([last_of_run, xp.asarray([p_sorted.shape[0] - 1])])
    true_pos = xp.cumsum(y_sorted)[ends]
    false_pos = ends + 1 - true_pos
    total_pos, total_neg = true_pos[-1], false_pos[-1]
    tpr = xp.concatenate([xp.zeros(1), true_pos / total_pos])
    fpr = xp.concatenate([xp.zeros(1), false_pos / total_neg])
    roc_auc = (xp.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2).sum()
    precision = true_pos / (ends + 1)
    average_precision = (xp.diff(tpr) * precision).sum()
    return float(roc_auc), float(average_precision)
