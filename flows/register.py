"""Registry flow: log to MLflow, register as challenger, promote to champion through the gate."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.prefect_tasks import register_task


@flow(name="register", log_prints=True)
def register_flow(
    config_path: str,
    trained: list[dict[str, Any]],
    etl: dict[str, Any],
    device: str,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    return [register_task(config_path, overrides or {}, t, etl, device) for t in trained]
