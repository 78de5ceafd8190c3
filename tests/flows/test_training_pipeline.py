"""The training flows end to end on a real (temporary) Prefect API and a real SQLite MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks import registry
from tasks.config import builtin_config
from tasks.pipeline import config_to_toml
from tasks.publish import read_model_config, validate_repository

pytestmark = pytest.mark.usefixtures("prefect_api")

SMALL = {
    "model.xgboost.n_estimators": 30,
    "model.mlp.epochs": 2,
    "model.mlp.batch_size": 512,
    "model.mlp.hidden": [16],
    "device": "cpu",
}


def write_config(tmp: Path, raw: Path, **overrides: object) -> Path:
    cfg = builtin_config(
        raw, tmp / "home", **{**SMALL, "publish.model_repo": str(tmp / "repo"), **overrides}
    )
    path = tmp / "config.toml"
    path.write_text(config_to_toml(cfg))
    return path


@pytest.fixture(scope="module")
def first_run(raw_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from flows.training_pipeline import training_pipeline

    tmp = tmp_path_factory.mktemp("pipeline")
    config = write_config(tmp, raw_dataset)
    summary = training_pipeline(config_path=str(config))
    return tmp, summary


def test_pipeline_registers_promotes_and_publishes(first_run: tuple[Path, dict]) -> None:
    tmp, summary = first_run
    last = json.loads((tmp / "home" / "last_run.json").read_text())
    assert last == json.loads(json.dumps(summary, default=str))
    assert last["backend"] == "cpu"
    by_kind = {m["kind"]: m for m in last["models"]}
    assert set(by_kind) == {"xgboost", "mlp"}
    for m in last["models"]:
        assert m["version"] == 1 and m["promoted"] and m["alias"] == "champion"
        assert 0.5 < m["metrics"]["roc_auc"] <= 1.0
    uri = f"sqlite:///{tmp / 'home' / 'mlflow.db'}"
    champion = registry.get_alias(uri, "gpupipe-xgboost", "champion")
    assert champion is not None and champion.version == 1
    repo = Path(last["triton_repository"])
    assert validate_repository(repo) == []
    fil = read_model_config(repo / "gpupipe-xgboost" / "config.pbtxt")
    assert fil.backend == "fil"
    assert (repo / "gpupipe-xgboost" / "1").is_dir()


def test_worse_model_stays_challenger(first_run: tuple[Path, dict], raw_dataset: Path) -> None:
    from flows.training_pipeline import training_pipeline

    tmp, _ = first_run
    config = write_config(
        tmp,
        raw_dataset,
        **{
            "model.xgboost.n_estimators": 1,
            "model.xgboost.max_depth": 1,
            "model.mlp.enabled": False,
        },
    )
    summary = training_pipeline(config_path=str(config))
    (xgb,) = summary["models"]
    assert xgb["version"] == 2
    assert not xgb["promoted"] and xgb["alias"] == "challenger"
    assert "champion" in xgb["reason"] or "not" in xgb["reason"]
    uri = f"sqlite:///{tmp / 'home' / 'mlflow.db'}"
    assert registry.get_alias(uri, "gpupipe-xgboost", "champion").version == 1  # type: ignore[union-attr]
    assert registry.get_alias(uri, "gpupipe-xgboost", "challenger").version == 2  # type: ignore[union-attr]
    served = read_model_config(
        Path(summary["triton_repository"]) / "gpupipe-xgboost-ensemble" / "config.pbtxt"
    )
    assert all(step.model_version == 1 for step in served.ensemble_scheduling.step)


def test_etl_is_cached_by_input_fingerprint(
    first_run: tuple[Path, dict], raw_dataset: Path
) -> None:
    from prefect import flow

    from tasks.prefect_tasks import etl_task

    tmp, summary = first_run
    config = str(tmp / "config.toml")

    @flow
    def twice() -> tuple[str, str]:
        a = etl_task(config, {}, "cpu", return_state=True)
        b = etl_task(config, {}, "cpu", return_state=True)
        return a.name, b.name

    _, second = twice()
    assert second == "Cached"
    assert summary["data_fingerprint"] in json.dumps(summary)


def test_a_deleted_etl_output_is_made_again_not_taken_from_the_cache(
    raw_dataset: Path, tmp_path: Path
) -> None:
    from prefect import flow

    from tasks.prefect_tasks import etl_task

    config = str(write_config(tmp_path, raw_dataset))

    @flow
    def etl_once() -> tuple[str, dict]:
        state = etl_task(config, {}, "cpu", return_state=True)
        return state.name, state.result()

    etl_once()
    _, cached = etl_once()  # the output exists: cached from here on
    shutil.rmtree(tmp_path / "home" / "etl")
    name, again = etl_once()
    assert name != "Cached"
    assert again == cached
    assert (Path(again["root"]) / "etl.json").is_file()


def test_cli_run_on_builtin_dataset(tmp_path: Path) -> None:
    from flows.cli import app

    result = CliRunner().invoke(
        app,
        [
            "run",
            "--rows",
            "20000",
            "--home",
            str(tmp_path / "home"),
            "--device",
            "cpu",
            "--set",
            "model.xgboost.n_estimators=10",
            "--set",
            "model.mlp.epochs=1",
            "--set",
            f"publish.model_repo={json.dumps(str(tmp_path / 'repo'))}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "gpupipe run complete" in result.output
    last = json.loads((tmp_path / "home" / "last_run.json").read_text())
    assert last["triton_repository"] == str(tmp_path / "repo")
    assert (tmp_path / "home" / "data" / "builtin-20000" / "part-00000.parquet").is_file()


def test_cli_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    from flows.cli import app

    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nsource = "x"\ntarget = "y"\n')
    result = CliRunner().invoke(app, ["run", "--config", str(bad)])
    assert result.exit_code == 2
    assert "bad.toml" in result.output and "id" in result.output


def test_cli_single_stage_etl_reuses_the_pipeline_output(first_run: tuple[Path, dict]) -> None:
    from flows.cli import app

    tmp, summary = first_run
    result = CliRunner().invoke(app, ["etl", "--config", str(tmp / "config.toml")])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{") :])
    assert out["fingerprint"] == summary["data_fingerprint"]
    assert sum(out["rows"].values()) == sum(summary["rows"].values())


def test_identical_retrain_ties_and_stays_challenger(
    first_run: tuple[Path, dict], raw_dataset: Path
) -> None:
    """Same data, same config, same seed: the new version must not win by float noise."""
    from flows.training_pipeline import training_pipeline

    tmp, first = first_run
    config = write_config(tmp, raw_dataset, **{"model.mlp.enabled": False})
    summary = training_pipeline(config_path=str(config))
    (xgb,) = summary["models"]
    first_xgb = next(m for m in first["models"] if m["kind"] == "xgboost")
    assert xgb["metrics"]["pr_auc"] == pytest.approx(first_xgb["metrics"]["pr_auc"], abs=1e-6)
    assert not xgb["promoted"], xgb["reason"]
    uri = f"sqlite:///{tmp / 'home' / 'mlflow.db'}"
    assert registry.get_alias(uri, "gpupipe-xgboost", "champion").version == 1  # type: ignore[union-attr]


def test_a_first_model_the_gate_refuses_is_reported_not_published(
    raw_dataset: Path, tmp_path: Path
) -> None:
    """The test split (the latest rows by time) holds no positives, so PR AUC is undefined and
    the gate promotes neither first model. The pipeline still completes: both versions are
    registered as challengers, nothing is published, and the summary says why."""
    import pandas as pd

    from flows.training_pipeline import training_pipeline

    frame = pd.concat([pd.read_parquet(p) for p in sorted(raw_dataset.glob("*.parquet"))])
    latest = frame["timestamp"] >= frame["timestamp"].quantile(0.7)
    frame.loc[latest, "is_fraud"] = 0
    data = tmp_path / "data"
    data.mkdir()
    frame.to_parquet(data / "part-0.parquet", index=False)
    config = write_config(tmp_path, data)
    summary = training_pipeline(config_path=str(config))
    assert summary["published"] == []
    assert [m["alias"] for m in summary["models"]] == ["challenger", "challenger"]
    skipped = {s["name"]: s["reason"] for s in summary["not_published"]}
    assert set(skipped) == {m["name"] for m in summary["models"]}
    for reason in skipped.values():
        assert "no champion: v1 not promoted" in reason and "single class" in reason
    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    for m in summary["models"]:
        assert registry.get_alias(uri, m["name"], "champion") is None
        assert registry.get_alias(uri, m["name"], "challenger") is not None
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
    last = json.loads((tmp_path / "home" / "last_run.json").read_text())
    assert last["not_published"] == summary["not_published"]
