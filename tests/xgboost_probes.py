"""Inputs that probe an XGBoost model's split rule, shared by the tests of everything that scores
XGBoost models without XGBoost (the ONNX export, the tree kernel)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def split_points(booster: Any) -> dict[int, np.ndarray]:
    """Each feature's split thresholds, from the model itself."""
    model = json.loads(bytes(booster.save_raw(raw_format="json")))
    points: dict[int, list[float]] = {}
    for tree in model["learner"]["gradient_booster"]["model"]["trees"]:
        for left, feature, value in zip(
            tree["left_children"], tree["split_indices"], tree["split_conditions"], strict=True
        ):
            if left != -1:
                points.setdefault(int(feature), []).append(value)
    return {f: np.asarray(v, np.float32) for f, v in points.items()}


def threshold_probes(booster: Any, seed: int, k: int) -> np.ndarray:
    """(rows, k) float32: random rows with one feature exactly on a split point or one float
    step either side, for every split point of the model."""
    rng = np.random.default_rng(seed)
    rows = []
    for feature, values in split_points(booster).items():
        for v in values:
            for point in (
                v,
                np.nextafter(v, np.float32(-np.inf)),
                np.nextafter(v, np.float32(np.inf)),
            ):
                row = rng.normal(size=k).astype(np.float32)
                row[feature] = point
                rows.append(row)
    return np.stack(rows)
