from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from tasks.config import ConfigError, builtin_config, load_config, parse_override
from tasks.pipeline import config_to_toml

GOOD = """
device = "cpu"
home = "state"
[data]
source = "in/*.csv"
target = "label"
id = "row_id"
numeric = ["x1", "x2"]
categorical = ["color"]
[model.xgboost]
max_depth = 4
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.toml"
    p.write_text(text)
    return p


def test_loads_and_applies_overrides(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), {"model.xgboost.max_depth": 3, "device": "auto"})
    assert cfg.model.xgboost.max_depth == 3
    assert cfg.device == "auto"
    assert cfg.data.timestamp is None
    assert cfg.tracking_uri == f"sqlite:///{(Path('state').resolve() / 'mlflow.db')}"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (GOOD.replace('device = "cpu"', 'device = "tpu"'), "device"),
        (GOOD.replace('target = "label"\n', ""), "target"),
        (GOOD.replace("max_depth = 4", "max_depth = 0"), "max_depth"),
        (GOOD + "\n[surprise]\nx = 1\n", "surprise"),
        (GOOD.replace('categorical = ["color"]', 'categorical = ["x1"]'), "more than one role"),
    ],
)
def test_invalid_config_names_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(write(tmp_path, text))
    assert str(tmp_path / "cfg.toml") in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[data\n"))


def test_entity_value_must_be_numeric(tmp_path: Path) -> None:
    text = GOOD + '\n[[features.entities]]\nkey = "color"\nvalue = "nope"\n'
    with pytest.raises(ConfigError, match="nope"):
        load_config(write(tmp_path, text))


def test_parse_override_reads_toml_values() -> None:
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("device=gpu") == ("device", "gpu")
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = builtin_config(tmp_path / "data", tmp_path / "home", **{"model.mlp.hidden": [8, 4]})
    again = load_config(write(tmp_path, config_to_toml(cfg)))
    assert again == cfg


def test_ignored_etl_partition_rows_still_loads_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(FutureWarning, match="etl_partition_rows is ignored"):
        cfg = load_config(write(tmp_path, "etl_partition_rows = 500000\n" + GOOD))
    assert cfg.etl_partition_rows == 500000
    # a config that does not set it loads silently, and the TOML gpupipe writes leaves it out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = load_config(write(tmp_path, GOOD))
    assert "etl_partition_rows" not in config_to_toml(quiet)


@pytest.mark.parametrize(
    ("device", "overrides", "threads"),
    [
        ("gpu", {}, 1),
        ("gpu", {"scoring.gpu_worker_threads": 2}, 2),
        ("gpu", {"scoring.gpu_worker_threads": 3, "cluster.threads_per_worker": 4}, 3),
        ("cpu", {"scoring.gpu_worker_threads": 2, "cluster.threads_per_worker": 4}, 4),
    ],
)
def test_scoring_cluster_threads(
    tmp_path: Path, device: str, overrides: dict[str, int], threads: int
) -> None:
    from tasks.scoring import scoring_cluster_config

    cfg = load_config(write(tmp_path, GOOD), {"cluster.n_workers": 2, **overrides})
    got = scoring_cluster_config(cfg, device)
    assert got.threads_per_worker == threads
    assert got.n_workers == 2  # the rest of the cluster settings carry over
    assert cfg.cluster.threads_per_worker == overrides.get("cluster.threads_per_worker", 1)


def test_scoring_gpu_worker_threads_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gpu_worker_threads"):
        load_config(write(tmp_path, GOOD), {"scoring.gpu_worker_threads": 0})
