"""Shared fixtures: small synthetic data made by the tests themselves, seeds logged."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

TEST_SEED = int(os.environ.get("GPUPIPE_TEST_SEED", "20261123"))


def pytest_report_header(config: pytest.Config) -> str:
    return f"gpupipe test seed: {TEST_SEED} (set GPUPIPE_TEST_SEED to change)"


@pytest.fixture(scope="session")
def test_seed() -> int:
    return TEST_SEED


@pytest.fixture(scope="session")
def raw_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30k generated transactions in 3 time-ordered parquet files."""
    from tasks.generate import generate_transactions

    out = tmp_path_factory.mktemp("raw")
    generate_transactions(30_000, out, seed=TEST_SEED % 1000, rows_per_file=10_000)
    return out


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A real, temporary Prefect API (ephemeral server with its own SQLite database)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.cli import quiet_embedded_prefect_server

    quiet_embedded_prefect_server()  # as `gpupipe` runs it
    with prefect_test_harness(server_startup_timeout=120):
        yield


SMALL_MODELS = {
    "model.xgboost.n_estimators": 20,
    "model.mlp.epochs": 1,
    "model.mlp.batch_size": 512,
    "model.mlp.hidden": [16],
}


@pytest.fixture(scope="session")
def small_bundles(raw_dataset: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The CPU ETL output of `raw_dataset` and real xgboost + mlp bundles trained on it."""
    from tasks.backend import resolve_backend
    from tasks.config import builtin_config
    from tasks.etl import load_transform, run_etl
    from tasks.train import train_mlp, train_xgboost

    cpu = resolve_backend("cpu")
    home = tmp_path_factory.mktemp("bundles-home")
    cfg = builtin_config(raw_dataset, home, **SMALL_MODELS)
    etl = run_etl(cfg, cpu, home / "etl")
    spec, _ = load_transform(etl.transform_dir)
    args = (etl, spec.feature_names, spec.target_column, cfg.model, cpu)
    xgb = train_xgboost(*args, home / "xgb", 0)
    mlp = train_mlp(*args, home / "mlp", 0)
    return etl, {"xgboost": xgb.bundle_dir, "mlp": mlp.bundle_dir}
