"""Scoring the current champion on the challenger's test split, so the promotion gate compares
two models on the same rows (each with its own transform)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks import registry
from tasks.bundle import LoadedBundle, frame_to_raw
from tasks.etl import EtlOutput
from tasks.metrics import classification_metrics


def score_raw_split(
    bundle: LoadedBundle, raw_dir: Path, target: str
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) for every row of the raw parquet files under raw_dir."""
    ys, ps = [], []
    for path in sorted(raw_dir.glob("*.parquet")):
        frame = pd.read_parquet(path)
        if len(frame) == 0:
            continue
        ps.append(bundle.predict_raw(frame_to_raw(frame, bundle.spec.raw_columns)))
        ys.append(frame[target].to_numpy())
    if not ps:
        return np.zeros(0), np.zeros(0, np.float32)
    return np.concatenate(ys), np.concatenate(ps)


def evaluate_bundle(bundle_dir: Path, etl: EtlOutput, metric: str) -> float:
    """A bundle's `metric` on this ETL's raw test split, scored from raw rows through ONNX.

    Challenger and champion both go through this one path, so an identical model ties instead
    of "winning" by float32 noise between native and ONNX scoring.
    """
    bundle = LoadedBundle.load(bundle_dir, scorer="onnx")
    y, p = score_raw_split(bundle, etl.raw_test_dir, bundle.spec.target_column)
    return float(classification_metrics(y, p)[metric])


def evaluate_champion(
    tracking_uri: str, champion: registry.ModelRef, etl: EtlOutput, cache: Path, metric: str
) -> float:
    """The champion's `metric` on this ETL's raw test split."""
    return evaluate_bundle(registry.download_bundle(tracking_uri, champion, cache), etl, metric)
