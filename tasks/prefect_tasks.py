"""Thin Prefect task wrappers around the pure functions of the training pipeline.

Retries go on steps that touch files or the registry; ETL is cached by its input fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import registry
from tasks.backend import BackendError, resolve_backend
from tasks.config import PipelineConfig
from tasks.etl import EtlOutput, etl_fingerprint, run_etl
from tasks.io import discover_files
from tasks.pipeline import HomeLayout, config_with_overrides, write_builtin_config

# Failures that a retry cannot cure: bad input, config or model references (DataError,
# ConfigError and the registry's lookups are ValueErrors), a missing GPU, programming errors.
PERMANENT_FAILURES: tuple[type[BaseException], ...] = (
    ValueError,
    LookupError,
    TypeError,
    NotImplementedError,
    BackendError,
)


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed run unless it failed for good (a
    PERMANENT_FAILURES exception), so a wrong model name or a bad input file fails at once
    instead of after its retries' delays. File, database and network errors still retry."""
    failure = state.data
    if not isinstance(failure, BaseException):  # a result record: the exception it holds
        failure = state.result(raise_on_failure=False)
    return not isinstance(failure, PERMANENT_FAILURES)


@task(
    name="prepare-config",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=worth_retrying,
    cache_policy=NO_CACHE,
)
def prepare_config_task(
    config_path: str | None, overrides: dict[str, Any], rows: int, home: str | None
) -> str:
    """Return a config file path; with none given, generate the built-in dataset on first use."""
    if config_path:
        config_with_overrides(config_path, overrides)  # fail early with the file's own message
        return str(Path(config_path).resolve())
    from tasks.generate import generate_transactions

    home_path = Path(home or ".gpupipe").expanduser().resolve()
    layout = HomeLayout(home_path)
    data_dir = layout.builtin_data(rows)
    log = get_run_logger()
    log.info("built-in dataset: %s rows in %s", f"{rows:,}", data_dir)
    generate_transactions(rows, data_dir, seed=0)
    return str(write_builtin_config(data_dir, home_path, overrides))


@task(name="resolve-backend", cache_policy=NO_CACHE)
def resolve_backend_task(device: str) -> str:
    backend = resolve_backend(device)
    get_run_logger().info("backend: %s (%s)", backend.device, backend.reason)
    return backend.device


def _etl_cache_key(_ctx: Any, params: dict[str, Any]) -> str | None:
    """The input fingerprint and when its output was written; None (run, do not cache) while
    there is no output. A key of the fingerprint alone outlived a deleted output: the cached
    result then named files that no longer existed, and training failed on them."""
    cfg: PipelineConfig = config_with_overrides(params["config_path"], params["overrides"])
    files = discover_files(cfg.data.source, cfg.data.format)
    backend = resolve_backend(params["device"])
    fingerprint = etl_fingerprint(files, cfg, backend)
    done = HomeLayout(cfg.home_path).etl_root / fingerprint / "etl.json"
    if not done.is_file():
        return None
    return f"etl-{fingerprint}-{done.stat().st_mtime_ns}"


@task(
    name="etl",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=worth_retrying,
    cache_key_fn=_etl_cache_key,
    persist_result=True,
)
def etl_task(config_path: str, overrides: dict[str, Any], device: str) -> dict[str, Any]:
    """Run (or reuse) the ETL for this input fingerprint; returns paths as JSON."""
    cfg = config_with_overrides(config_path, overrides)
    log = get_run_logger()
    out = run_etl(
        cfg, resolve_backend(device), HomeLayout(cfg.home_path).etl_root, progress=log.info
    )
    return out.to_json()


@task(name="train-model", cache_policy=NO_CACHE)
def train_task(
    kind: str,
    config_path: str,
    overrides: dict[str, Any],
    device: str,
    etl: dict[str, Any],
    run_id: str,
) -> dict[str, Any]:
    from tasks.etl import load_transform
    from tasks.train import train_mlp, train_xgboost

    cfg = config_with_overrides(config_path, overrides)
    etl_out = EtlOutput.from_json(etl)
    spec, _ = load_transform(etl_out.transform_dir)
    out_dir = HomeLayout(cfg.home_path).models_root / run_id / kind
    fn = train_xgboost if kind == "xgboost" else train_mlp
    model = fn(
        etl_out,
        spec.feature_names,
        spec.target_column,
        cfg.model,
        resolve_backend(device),
        out_dir,
        cfg.split.seed,
    )
    get_run_logger().info(
        "%s: test ROC AUC %.4f, PR AUC %.4f, log loss %.4f; ONNX parity max |diff| %.2e",
        kind,
        model.metrics["roc_auc"],
        model.metrics["pr_auc"],
        model.metrics["log_loss"],
        model.parity_max_abs_diff,
    )
    from tasks.plots import importance_figure, roc_pr_figures

    figures = roc_pr_figures(model.extra["y_test"], model.extra["p_test"], out_dir / "plots", kind)
    if "importance" in model.extra:
        figures["feature_importance"] = importance_figure(
            model.extra["importance"], out_dir / "plots", kind
        )
    return {
        "kind": kind,
        "bundle_dir": str(model.bundle_dir),
        "metrics": model.metrics,
        "params": model.params,
        "parity_max_abs_diff": model.parity_max_abs_diff,
        "figures": {k: str(v) for k, v in figures.items()},
    }


@task(
    name="register-model",
    retries=2,
    retry_delay_seconds=3,
    retry_condition_fn=worth_retrying,
    cache_policy=NO_CACHE,
)
def register_task(
    config_path: str,
    overrides: dict[str, Any],
    trained: dict[str, Any],
    etl: dict[str, Any],
    device: str,
) -> dict[str, Any]:
    """Log, register as challenger, compare with the champion on this test split, maybe promote."""
    from tasks.promotion import evaluate_bundle, evaluate_champion

    cfg = config_with_overrides(config_path, overrides)
    layout = HomeLayout(cfg.home_path)
    uri = cfg.tracking_uri
    name = cfg.model_name(trained["kind"])
    log = get_run_logger()
    champion = registry.get_alias(uri, name, "champion")
    champion_metric = None
    if champion is not None:
        champion_metric = evaluate_champion(
            uri,
            champion,
            EtlOutput.from_json(etl),
            layout.bundle_cache,
            cfg.registry.promotion_metric,
        )
        log.info(
            "current champion %s v%s scores %s=%.5f on this test split",
            name,
            champion.version,
            cfg.registry.promotion_metric,
            champion_metric,
        )
    tags = {
        "data_fingerprint": etl["fingerprint"],
        "git_commit": registry.git_commit(Path(__file__).resolve().parent.parent),
        "backend": device,
        "model_kind": trained["kind"],
    }
    run_id = registry.log_training_run(
        uri,
        cfg.registry.experiment,
        f"{name}-{etl['fingerprint']}",
        params={**trained["params"], "transform": {"etl_rows": etl["rows"]}},
        metrics={k: float(v) for k, v in trained["metrics"].items()}
        | {"onnx_parity_max_abs_diff": trained["parity_max_abs_diff"]},
        bundle_dir=Path(trained["bundle_dir"]),
        figures={k: Path(v) for k, v in trained["figures"].items()},
        tags=tags,
        artifact_root=layout.artifact_root,
    )
    ref = registry.register_bundle(uri, name, run_id, tags=tags)
    registry.set_alias(uri, name, "challenger", ref.version)
    metric = cfg.registry.promotion_metric
    challenger_metric = float(trained["metrics"][metric])
    if champion_metric is not None:
        challenger_metric = evaluate_bundle(
            Path(trained["bundle_dir"]), EtlOutput.from_json(etl), metric
        )
    decision = registry.decide_promotion(
        metric, challenger_metric, champion_metric, cfg.registry.min_improvement
    )
    registry.record_decision(uri, ref, decision)
    log.info("%s v%s: %s", name, ref.version, decision.reason)
    return {
        "name": name,
        "version": ref.version,
        "run_id": run_id,
        "promoted": decision.promote,
        "reason": decision.reason,
        "metrics": trained["metrics"],
        "kind": trained["kind"],
        # who holds the champion alias now: this version, the earlier champion, or no one
        "champion_version": ref.version
        if decision.promote
        else (champion.version if champion is not None else None),
    }


@task(
    name="publish-triton",
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=worth_retrying,
    cache_policy=NO_CACHE,
)
def publish_task(config_path: str, overrides: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Publish the current champion of one registered model to the Triton repository."""
    from tasks.publish import publish_bundle, validate_repository

    cfg = config_with_overrides(config_path, overrides)
    layout = HomeLayout(cfg.home_path)
    ref = registry.get_alias(cfg.tracking_uri, model_name, "champion")
    if ref is None:
        raise ValueError(f"{model_name}: no champion to publish")
    bundle = registry.download_bundle(cfg.tracking_uri, ref, layout.bundle_cache)
    repo = cfg.model_repo_path
    published = publish_bundle(
        bundle,
        repo,
        model_name,
        ref.version,
        max_batch_size=cfg.publish.max_batch_size,
        preferred_batch_sizes=cfg.publish.preferred_batch_sizes,
        max_queue_delay_us=cfg.publish.max_queue_delay_microseconds,
    )
    problems = validate_repository(repo)
    if problems:
        raise RuntimeError(f"{repo}: published repository is invalid:\n  " + "\n  ".join(problems))
    get_run_logger().info("published %s v%s to %s", model_name, ref.version, repo)
    return {
        "model": model_name,
        "version": ref.version,
        "repo": str(repo),
        "published": str(published),
    }
