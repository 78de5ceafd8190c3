"""Training flow: features -> XGBoost and MLP bundles (native + ONNX, parity-checked)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from tasks.pipeline import config_with_overrides
from tasks.prefect_tasks import train_task


@flow(name="train", log_prints=True)
def train_flow(
    config_path: str, etl: dict[str, Any], device: str, overrides: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Train every enabled model kind on one ETL output; returns bundle paths and metrics."""
    overrides = overrides or {}
    cfg = config_with_overrides(config_path, overrides)
    kinds = ["xgboost", *(["mlp"] if cfg.model.mlp.enabled else [])]
    run_id = str(flow_run.get_id() or "local")
    return [train_task(kind, config_path, overrides, device, etl, run_id) for kind in kinds]
