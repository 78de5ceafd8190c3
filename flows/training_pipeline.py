"""The parent flow: ETL -> train -> register (promotion gate) -> publish to Triton."""

from __future__ import annotations

import json
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.etl import etl_flow
from flows.publish import publish_flow
from flows.register import register_flow
from flows.train import train_flow
from tasks.pipeline import (
    DEFAULT_BUILTIN_ROWS,
    HomeLayout,
    atomic_write_text,
    config_with_overrides,
    metrics_table,
    model_card,
)
from tasks.prefect_tasks import prepare_config_task, resolve_backend_task


@flow(name="training_pipeline", log_prints=True)
def training_pipeline(
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    rows: int = DEFAULT_BUILTIN_ROWS,
    home: str | None = None,
) -> dict[str, Any]:
    """Raw files to registered models and a published Triton repository.

    Args:
        config_path: TOML config; None uses the built-in dataset (generated on first use).
        overrides: dotted-key overrides, e.g. {"model.xgboost.max_depth": 6}.
        rows: rows of the built-in dataset (ignored with a config).
        home: state directory for the built-in dataset (a config names its own `home`).
    """
    overrides = dict(overrides or {})
    if home and config_path:
        overrides["home"] = home
    path = prepare_config_task(config_path, overrides, rows, home)
    cfg = config_with_overrides(path, overrides)
    device = resolve_backend_task(cfg.device)
    etl = etl_flow(path, overrides, device=device)
    trained = train_flow(path, etl, device, overrides)
    results = register_flow(path, trained, etl, device, overrides)
    # a model publishes its champion; one that has none yet (its first version was not
    # promoted) is reported, not an error: the gate decided, and there is nothing to serve
    with_champion = [r["name"] for r in results if r["champion_version"] is not None]
    published = publish_flow(path, with_champion, overrides) if with_champion else []
    not_published = [
        {"name": r["name"], "reason": f"no champion: v{r['version']} not promoted ({r['reason']})"}
        for r in results
        if r["champion_version"] is None
    ]
    repo = str(cfg.model_repo_path)
    create_markdown_artifact(
        model_card(cfg, etl, results, device, repo),
        key="model-card",
        description="gpupipe model card",
    )
    create_table_artifact(
        metrics_table(results), key="model-metrics", description="test-split metrics"
    )
    summary = {
        "config": path,
        "backend": device,
        "data_fingerprint": etl["fingerprint"],
        "rows": etl["rows"],
        "tracking_uri": cfg.tracking_uri,
        "models": [
            {
                "name": r["name"],
                "version": r["version"],
                "kind": r["kind"],
                "metrics": r["metrics"],
                "alias": "champion" if r["promoted"] else "challenger",
                "promoted": r["promoted"],
                "reason": r["reason"],
            }
            for r in results
        ],
        "published": published,
        "not_published": not_published,
        "triton_repository": repo,
    }
    layout = HomeLayout(cfg.home_path)
    layout.home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.last_run, json.dumps(summary, indent=2, default=str))
    return summary
