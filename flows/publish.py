"""Publish flow: champions of the registered models -> Triton model repository, atomically."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.prefect_tasks import publish_task


@flow(name="publish", log_prints=True)
def publish_flow(
    config_path: str, model_names: list[str], overrides: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    return [publish_task(config_path, overrides or {}, name) for name in model_names]
