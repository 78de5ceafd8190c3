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

    with prefect_test_harness(server_startup_timeout=120):
        yield
