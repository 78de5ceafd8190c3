"""Batch scoring flow: new input partitions -> the champion model on every worker of a dask
cluster -> one predictions parquet per input file, a manifest, and a run summary with drift.

Prefect sees a handful of task runs per flow run whatever the number of files: one task drives
all dask futures and reports progress in an artifact (see tasks/scoring.py for the work itself).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Literal, cast
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks import registry, scoring
from tasks.backend import resolve_backend
from tasks.bundle import check_scorer
from tasks.cluster import cluster_address, dask_client
from tasks.config import ClusterConfig
from tasks.prefect_tasks import resolve_backend_task, worth_retrying
from tasks.spec import TransformSpec
from tasks.train import TRANSFORM_DIR


@task(
    name="resolve-model",
    retries=2,
    retry_delay_seconds=3,
    retry_condition_fn=worth_retrying,
    cache_policy=NO_CACHE,
)
def resolve_model_task(tracking_uri: str, model_uri: str) -> registry.ModelRef:
    ref = registry.resolve_model_uri(tracking_uri, model_uri)
    get_run_logger().info("model %s is %s version %s", model_uri, ref.name, ref.version)
    return ref


@task(name="discover-inputs", cache_policy=NO_CACHE)
def discover_inputs_task(
    input_path: str, output_dir: str, data_format: str
) -> list[scoring.InputPartition]:
    parts = scoring.discover_partitions(input_path, output_dir, data_format)
    get_run_logger().info("%d input file(s) in %s", len(parts), input_path)
    return parts


@task(name="plan-scoring", cache_policy=NO_CACHE)
def plan_scoring_task(
    parts: list[scoring.InputPartition], output_dir: str, ref: registry.ModelRef
) -> tuple[list[scoring.InputPartition], int]:
    entries = scoring.read_manifest(output_dir, [p.path for p in parts])
    todo, done = scoring.plan_partitions(parts, entries, ref.name, ref.version)
    get_run_logger().info(
        "%d file(s) to score; %d already done with %s v%s",
        len(todo),
        len(done),
        ref.name,
        ref.version,
    )
    return todo, len(done)


@task(
    name="download-model",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=worth_retrying,
    cache_policy=NO_CACHE,
)
def download_model_task(tracking_uri: str, ref: registry.ModelRef, output_dir: str) -> str:
    """Into the output directory, which every worker must see anyway."""
    dest = Path(output_dir) / scoring.MODELS_DIR
    return str(registry.download_bundle(tracking_uri, ref, dest))


# Retried once: a rerun skips every file the first attempt committed.
@task(
    name="score-partitions",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=worth_retrying,
    cache_policy=NO_CACHE,
)
def score_partitions_task(
    job: scoring.ScoringJob,
    todo: list[scoring.InputPartition],
    cluster: str,
    cluster_cfg: ClusterConfig,
    files_per_task: int,
    progress_interval_s: float,
) -> dict[str, Any]:
    """Drive all dask futures from this one task, updating a progress artifact as groups finish
    (at most once per `progress_interval_s`, and at the end)."""
    log = get_run_logger()
    started = time.perf_counter()
    artifact = cast(
        UUID,
        create_progress_artifact(
            0.0, key="batch-scoring-progress", description=f"0 of {len(todo)} file(s) scored"
        ),
    )
    last_logged = [-1]
    throttle = scoring.ProgressThrottle(progress_interval_s)

    def progress(totals: scoring.RunTotals, done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        note = (
            f"{done} of {total} file(s): {totals.rows_scored:,} rows scored, "
            f"{totals.rows_quarantined:,} quarantined"
        )
        if throttle.due(done, total, time.monotonic()):
            update_progress_artifact(artifact, pct, description=note)
        if int(pct // 10) > last_logged[0]:
            last_logged[0] = int(pct // 10)
            log.info(note)

    backend = resolve_backend(job.device)
    address = cluster_address(cluster, cluster_cfg)
    with dask_client(cluster_cfg, backend, address) as client:
        log.info("dask dashboard: %s", client.dashboard_link)
        run = scoring.run_on_cluster(
            client, job, todo, files_per_task=files_per_task, on_progress=progress
        )
    return {
        "totals": run.totals.to_json(),
        "workers": run.workers,
        "tasks": run.tasks,
        "seconds_scoring": run.seconds_scoring,
        "seconds_total": time.perf_counter() - started,
    }


@task(name="summarize-scoring", cache_policy=NO_CACHE)
def summarize_task(
    base: dict[str, Any],
    result: dict[str, Any] | None,
    files_total: int,
    files_skipped: int,
    bundle_dir: str | None,
    persist: bool,
) -> dict[str, Any]:
    """Summary, artifacts, and (when `persist`) the run JSON plus removal of superseded files."""
    result = result or {"totals": scoring.RunTotals().to_json(), "workers": 0}
    histograms = (
        TransformSpec.load(Path(bundle_dir) / TRANSFORM_DIR).histograms if bundle_dir else {}
    )
    summary = scoring.run_summary(
        **base,
        workers=int(result["workers"]),
        totals=scoring.RunTotals.from_json(result["totals"]),
        files_total=files_total,
        files_skipped=files_skipped,
        tasks=int(result.get("tasks", 0)),
        seconds_scoring=float(result.get("seconds_scoring", 0.0)),
        seconds_total=float(result.get("seconds_total", 0.0)),
        histograms=histograms,
    )
    log = get_run_logger()
    if persist:
        removed = scoring.sweep_outputs(base["output_dir"])
        if removed:
            log.info("removed %d superseded or stale file(s): %s", len(removed), removed[:5])
        log.info("run summary: %s", scoring.write_run_summary(base["output_dir"], summary))
    create_table_artifact(
        scoring.summary_table(summary),
        key="batch-scoring-summary",
        description="batch scoring: rows, throughput, quarantine, score distribution",
    )
    create_markdown_artifact(
        scoring.summary_markdown(summary),
        key="batch-scoring-report",
        description="batch scoring: drift and quarantined files",
    )
    rows = summary["rows"]
    log.info(
        "%s rows in: %s scored, %s quarantined (%s rows/s); %d file(s) skipped",
        f"{rows['in']:,}",
        f"{rows['scored']:,}",
        f"{rows['quarantined']:,}",
        f"{summary['rows_per_second']:,.0f}",
        files_skipped,
    )
    return summary


@flow(name="batch_scoring", log_prints=True)
def batch_scoring(
    input_path: str,
    output_dir: str,
    model_uri: str | None = None,
    scorer: Literal["xgboost", "onnx"] = "xgboost",
    cluster: str = "local",
    partition_rows: int | None = None,
    device: Literal["auto", "cpu", "gpu"] | None = None,
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    home: str | None = None,
) -> dict[str, Any]:
    """Score new input partitions with a registered model; resumable and idempotent.

    Args:
        input_path: directory, glob or file of parquet/CSV files with the raw columns.
        output_dir: predictions, `_manifest/` and `_models/`; workers must see it.
        model_uri: `models:/<name>@<alias>` or `models:/<name>/<version>`; default: the
            config's XGBoost champion.
        scorer: `xgboost` (native) or `onnx` (ONNX Runtime), both in-process on the workers.
        cluster: `local` (made for this run) or an existing dask scheduler address.
        partition_rows: rows a worker holds at once; default `scoring.partition_rows`.
        device: `auto | cpu | gpu`; default the config's.
        config_path, overrides, home: as for the training flows (no config: the built-in
            dataset's config in `home`, else defaults).
    """
    cfg = scoring.scoring_config(config_path, overrides, home, input_path)
    out = str(Path(output_dir).expanduser().resolve())
    dev = resolve_backend_task(device or cfg.device)
    ref = resolve_model_task(cfg.tracking_uri, model_uri or scoring.champion_uri(cfg))
    run_id = str(flow_run.get_id() or uuid.uuid4().hex[:12])
    base: dict[str, Any] = {
        "run_id": run_id,
        "input_path": input_path,
        "output_dir": out,
        "model": {"name": ref.name, "version": ref.version, "uri": ref.uri},
        "scorer": scorer,
        "device": dev,
        "max_fraction": cfg.scoring.max_quarantined_fraction,
    }
    parts = discover_inputs_task(input_path, out, cfg.data.format)
    if not parts:  # a clean no-op: nothing is written
        return summarize_task(base, None, 0, 0, None, persist=False)
    with scoring.output_lock(out):
        todo, skipped = plan_scoring_task(parts, out, ref)
        result, bundle_dir = None, None
        if todo:
            bundle_dir = download_model_task(cfg.tracking_uri, ref, out)
            check_scorer(Path(bundle_dir), scorer)  # before any worker would fail on it
            job = scoring.ScoringJob(
                bundle_dir=bundle_dir,
                model_name=ref.name,
                model_version=ref.version,
                scorer=scorer,
                device=dev,  # type: ignore[arg-type]
                output_dir=out,
                partition_rows=partition_rows or cfg.scoring.partition_rows,
                data_format=cfg.data.format,
                run_id=run_id,
                io_threads=cfg.scoring.io_threads,
                gpu_io=cfg.scoring.gpu_io,
                gpu_streams=cfg.scoring.gpu_streams,
                batch_rows=cfg.scoring.batch_rows,
                batch_read_threads=cfg.scoring.batch_read_threads,
                output_compression=cfg.scoring.output_compression,
                output_id_encoding=cfg.scoring.output_id_encoding,
            )
            cluster_cfg = scoring.scoring_cluster_config(cfg, dev)
            result = score_partitions_task(
                job,
                todo,
                cluster,
                cluster_cfg,
                cfg.scoring.files_per_task,
                cfg.scoring.progress_interval_s,
            )
        summary = summarize_task(base, result, len(parts), skipped, bundle_dir, persist=True)
    if summary["failed"]:
        raise scoring.QuarantineExceeded(summary["failure"])
    return summary
