"""ETL flow: raw files -> features parquet + fitted transform spec (paths out)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.pipeline import config_with_overrides
from tasks.prefect_tasks import etl_task, prepare_config_task, resolve_backend_task


@flow(name="etl", log_prints=True)
def etl_flow(
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    rows: int = 1_000_000,
    home: str | None = None,
) -> dict[str, Any]:
    """Run the ETL for a config (or the built-in dataset); returns the output paths as JSON."""
    overrides = overrides or {}
    path = prepare_config_task(config_path, overrides, rows, home)
    resolved = device or resolve_backend_task(config_with_overrides(path, overrides).device)
    return etl_task(path, overrides, resolved)
