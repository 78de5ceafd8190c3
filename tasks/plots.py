"""Evaluation figures logged with a training run: ROC and precision-recall curves, feature
importance. PNG files only; nothing is shown on screen."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# Curves of millions of test rows draw the same picture from a few thousand points.
_MAX_CURVE_POINTS = 2000
_DPI = 110


def _new_figure(width: float, height: float) -> Any:
    """A figure drawn by the Agg canvas directly, bypassing pyplot: no GUI backend is chosen,
    no global figure registry grows, and it is safe from worker threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    fig.clear()  # pyplot is never involved, so this (and dropping it) is all closing takes
    return path


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_").lower() or "model"


def _thin(x: npt.NDArray[Any], y: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    if len(x) <= _MAX_CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, _MAX_CURVE_POINTS).astype(np.int64))
    return x[keep], y[keep]


def roc_pr_figures(
    y_true: npt.ArrayLike, p: npt.ArrayLike, out_dir: Path, title: str
) -> dict[str, Path]:
    """Write `<title>-roc.png` and `<title>-pr.png` (AUC and average precision in the legends).

    A split with one class has no curve; its figures say so instead of raising.

    Returns:
        {"roc": path, "pr": path}.
    """
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    scores = np.asarray(p, np.float64).reshape(-1)
    if len(y) != len(scores):
        raise ValueError(f"y_true has {len(y)} rows but p has {len(scores)}")
    out_dir = Path(out_dir)
    slug = _slug(title)
    two_classes = len(np.unique(y)) == 2

    roc = _new_figure(5.0, 5.0)
    ax = roc.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    if two_classes:
        fpr, tpr, _ = roc_curve(y, scores)
        fx, ty = _thin(fpr, tpr)
        ax.plot(fx, ty, linewidth=2, label=f"ROC AUC = {auc(fpr, tpr):.4f}")
    else:
        ax.text(0.5, 0.5, "one class only: no curve", ha="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"{title}: ROC")
    ax.legend(loc="lower right")

    pr = _new_figure(5.0, 5.0)
    ax = pr.add_subplot()
    if two_classes:
        precision, recall, _ = precision_recall_curve(y, scores)
        rx, py = _thin(recall, precision)
        ap = average_precision_score(y, scores)
        ax.step(rx, py, where="post", linewidth=2, label=f"PR AUC (AP) = {ap:.4f}")
        rate = float(y.mean())
        ax.axhline(rate, linestyle="--", color="grey", linewidth=1, label=f"base rate {rate:.4f}")
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "one class only: no curve", ha="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision")
    ax.set_title(f"{title}: precision-recall")

    return {
        "roc": _save(roc, out_dir / f"{slug}-roc.png"),
        "pr": _save(pr, out_dir / f"{slug}-pr.png"),
    }


def importance_figure(
    importance: dict[str, float], out_dir: Path, title: str, top: int = 20
) -> Path:
    """Horizontal bars of the `top` largest importances, largest at the top; writes
    `<title>-importance.png`."""
    ranked = sorted(importance.items(), key=lambda kv: kv[1], reverse=True)[: max(top, 0)]
    fig = _new_figure(7.0, 1.0 + 0.3 * max(len(ranked), 3))
    ax = fig.add_subplot()
    if ranked:
        names = [name for name, _ in reversed(ranked)]
        values = [value for _, value in reversed(ranked)]
        ax.barh(names, values, color="tab:blue")
        ax.set_xlabel("importance")
    else:
        ax.text(0.5, 0.5, "no importance recorded", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(f"{title}: top {len(ranked)} features")
    return _save(fig, Path(out_dir) / f"{_slug(title)}-importance.png")
