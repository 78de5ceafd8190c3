"""Fixtures for the batch-scoring flow tests: a registered champion in a real SQLite MLflow store,
generated input partitions and a real dask cluster of worker processes. Built once per session;
each test writes to its own output directory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tasks.registry import ModelRef

INPUT_ROWS = 10_000
INPUT_FILES = 4


@dataclass(frozen=True)
class ScoringSetup:
    home: Path
    config: Path  # TOML of the built-in dataset, registry under `home`
    tracking_uri: str
    model_name: str  # registered name the flow resolves by default (@champion)
    bundles: tuple[Path, Path]  # two different trained XGBoost bundles
    champion: ModelRef
    inputs: Path  # INPUT_FILES parquet partitions of INPUT_ROWS raw rows
    input_frame: pd.DataFrame
    input_rows: int = INPUT_ROWS
    input_files: int = INPUT_FILES

    def register(self, name: str, bundle_dir: Path, alias: str | None = None) -> ModelRef:
        return register(self.tracking_uri, name, bundle_dir, alias)


def register(uri: str, name: str, bundle_dir: Path, alias: str | None = None) -> ModelRef:
    """Log a bundle as a training run, register it as a new version of `name`, set `alias`."""
    from tasks import registry

    run_id = registry.log_training_run(
        uri,
        "scoring-tests",
        f"{name}-{bundle_dir.name}",
        params={},
        metrics={},
        bundle_dir=bundle_dir,
    )
    ref = registry.register_bundle(uri, name, run_id)
    if alias:
        registry.set_alias(uri, name, alias, ref.version)
    return ref


@pytest.fixture(scope="session")
def scoring_setup(
    raw_dataset: Path, tmp_path_factory: pytest.TempPathFactory, test_seed: int
) -> ScoringSetup:
    from tasks.backend import resolve_backend
    from tasks.config import load_config
    from tasks.etl import load_transform, run_etl
    from tasks.generate import generate_transactions
    from tasks.pipeline import write_builtin_config
    from tasks.train import train_xgboost

    home = tmp_path_factory.mktemp("scoring-home")
    config = write_builtin_config(
        raw_dataset,
        home,
        {
            "model.xgboost.n_estimators": 15,
            "model.mlp.enabled": False,
            "device": "cpu",
            "cluster.n_workers": 2,
        },
    )
    cfg = load_config(config)
    backend = resolve_backend("cpu")
    etl = run_etl(cfg, backend, home / "etl")
    spec, _ = load_transform(etl.transform_dir)
    args = (spec.feature_names, spec.target_column)
    first = train_xgboost(etl, *args, cfg.model, backend, home / "bundle-a", 0)
    other = cfg.model.model_copy(
        update={"xgboost": cfg.model.xgboost.model_copy(update={"max_depth": 3})}
    )
    second = train_xgboost(etl, *args, other, backend, home / "bundle-b", 1)
    name = cfg.model_name("xgboost")
    champion = register(cfg.tracking_uri, name, first.bundle_dir, "champion")
    inputs = home / "inputs"
    paths = generate_transactions(
        INPUT_ROWS, inputs, seed=test_seed % 991 + 3, rows_per_file=INPUT_ROWS // INPUT_FILES
    )
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    return ScoringSetup(
        home=home,
        config=config,
        tracking_uri=cfg.tracking_uri,
        model_name=name,
        bundles=(first.bundle_dir, second.bundle_dir),
        champion=champion,
        inputs=inputs,
        input_frame=frame,
    )


@pytest.fixture(scope="session")
def dask_address() -> Iterator[str]:
    """A cluster of two single-threaded worker processes, shared by the flow tests."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address
