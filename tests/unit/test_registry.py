"""Registry and plots against a real SQLite MLflow store in a temporary home (no mocks)."""

from __future__ import annotations

import json
import subprocess
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tasks.plots import importance_figure, roc_pr_figures
from tasks.registry import (
    CHALLENGER,
    CHAMPION,
    NONFINITE_METRICS_TAG,
    ModelRef,
    PromotionDecision,
    client_for,
    decide_promotion,
    download_bundle,
    ensure_experiment,
    flatten_params,
    get_alias,
    git_commit,
    local_artifact_root,
    log_training_run,
    record_decision,
    register_bundle,
    resolve_model_uri,
    run_metric,
    set_alias,
)

SEED = 20240611
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


def make_bundle(root: Path, tag: str) -> Path:
    """A small bundle directory: its files' content differs per `tag`."""
    bundle = root / f"bundle-{tag}"
    (bundle / "transform").mkdir(parents=True)
    (bundle / "bundle.json").write_text(json.dumps({"kind": "xgboost", "tag": tag}))
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    (bundle / "model.onnx").write_bytes(rng.bytes(4096))
    (bundle / "model.ubj").write_bytes(rng.bytes(1024))
    (bundle / "transform" / "spec.json").write_text(json.dumps({"columns": ["a", "b"]}))
    return bundle


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def train_and_register(uri: str, root: Path, tag: str, pr_auc: float) -> ModelRef:
    run_id = log_training_run(
        uri,
        "exp",
        f"run-{tag}",
        params={"xgboost": {"max_depth": 6, "eval_metric": ["logloss", "aucpr"]}, "seed": SEED},
        metrics={"pr_auc": pr_auc, "roc_auc": NAN, "log_loss": 0.1},
        bundle_dir=make_bundle(root, tag),
        tags={"backend": "cpu", "data_fingerprint": "abc123"},
    )
    return register_bundle(uri, "fraud-xgboost", run_id, tags={"tag": tag})


def promote_if_better(uri: str, ref: ModelRef, metric: str) -> PromotionDecision:
    """The flow's promotion step, as the registry functions are meant to be combined."""
    set_alias(uri, ref.name, CHALLENGER, ref.version)
    champion = get_alias(uri, ref.name, CHAMPION)
    current = None if champion is None else run_metric(uri, champion.run_id, metric)
    value = run_metric(uri, ref.run_id, metric)
    decision = decide_promotion(metric, NAN if value is None else value, current)
    record_decision(uri, ref, decision)
    return decision


# ---------------------------------------------------------------- decide_promotion


@pytest.mark.parametrize(
    ("metric", "challenger", "champion", "min_improvement", "promote"),
    [
        ("pr_auc", 0.80, None, 0.0, True),  # first model
        ("pr_auc", 0.81, 0.80, 0.0, True),
        ("pr_auc", 0.79, 0.80, 0.0, False),
        ("roc_auc", 0.90, 0.90, 0.0, False),  # tie does not beat
        ("roc_auc", 0.91, 0.90, 0.01, False),  # improvement equal to the margin is a tie
        ("roc_auc", 0.9101, 0.90, 0.01, True),
        ("log_loss", 0.20, 0.25, 0.0, True),  # lower is better
        ("log_loss", 0.30, 0.25, 0.0, False),
        ("log_loss", 0.24, 0.25, 0.01, False),
        ("log_loss", 0.2399, 0.25, 0.01, True),
        ("pr_auc", NAN, 0.80, 0.0, False),
        ("pr_auc", NAN, None, 0.0, False),  # NaN never promotes, even as first model
        ("pr_auc", 0.50, NAN, 0.0, True),
    ],
)
def test_decide_promotion(
    metric: str, challenger: float, champion: float | None, min_improvement: float, promote: bool
) -> None:
    d = decide_promotion(metric, challenger, champion, min_improvement)
    assert d.promote is promote, d.reason
    assert d.metric == metric
    assert d.challenger is challenger and d.champion is champion
    reason = d.reason.lower()  # NaN is spelled "NaN" in the sentence
    assert f"{challenger:.6g}" in reason
    assert ("no current champion" if champion is None else f"{champion:.6g}") in reason


def test_decide_promotion_reasons_and_errors() -> None:
    assert "no current champion" in decide_promotion("pr_auc", 0.5, None).reason
    assert "NaN" in decide_promotion("pr_auc", 0.5, NAN).reason
    assert "lower is better" in decide_promotion("log_loss", 0.3, 0.2).reason
    with pytest.raises(ValueError, match="unknown promotion metric"):
        decide_promotion("accuracy", 0.5, 0.4)
    with pytest.raises(ValueError, match="min_improvement"):
        decide_promotion("pr_auc", 0.5, 0.4, min_improvement=-0.1)


# ---------------------------------------------------------------- params, experiments


def test_flatten_params_nested_and_limits() -> None:
    flat = flatten_params(
        {
            "xgboost": {"max_depth": 8, "eval": {"metrics": ["logloss", "aucpr"]}},
            "lr": 0.1,
            "enabled": True,
            "long": "x" * 10_000,
            "odd[key]": None,
        }
    )
    assert flat["xgboost.max_depth"] == "8"
    assert flat["xgboost.eval.metrics"] == '["logloss", "aucpr"]'
    assert flat["lr"] == "0.1" and flat["enabled"] == "True"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")
    assert flat["odd_key_"] == "None"


def test_experiment_uses_local_artifact_root(home: Path, uri: str) -> None:
    assert not home.exists()
    assert local_artifact_root(uri) == home.resolve() / "mlartifacts"
    assert local_artifact_root("http://localhost:5000") is None
    exp_id = ensure_experiment(uri, "exp", None)
    assert ensure_experiment(client_for(uri), "exp", None) == exp_id
    location = client_for(uri).get_experiment(exp_id).artifact_location
    assert location == (home.resolve() / "mlartifacts").as_uri()
    assert (home / "mlartifacts").is_dir()


# ---------------------------------------------------------------- run, register, alias


def test_log_register_alias_roundtrip(tmp_path: Path, uri: str, home: Path) -> None:
    figures = roc_pr_figures([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6], tmp_path / "plots", "xgb")
    bundle = make_bundle(tmp_path, "one")
    run_id = log_training_run(
        uri,
        "exp",
        "run-one",
        params={"xgboost": {"max_depth": 6}, "seed": SEED},
        metrics={"pr_auc": 0.8, "roc_auc": NAN},
        bundle_dir=bundle,
        figures=figures,
        tags={"git_commit": "abc1234"},
    )
    client = client_for(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((home.resolve() / "mlartifacts").as_uri())
    assert run.data.params == {"xgboost.max_depth": "6", "seed": str(SEED)}
    assert run.data.metrics == {"pr_auc": 0.8}
    assert run.data.tags[NONFINITE_METRICS_TAG] == "roc_auc"
    assert run.data.tags["git_commit"] == "abc1234"
    logged = {f.path for f in client.list_artifacts(run_id, "bundle")}
    assert {"bundle/bundle.json", "bundle/model.onnx", "bundle/transform"} <= logged
    plots = {f.path for f in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/xgb-roc.png", "plots/xgb-pr.png"}
    assert run_metric(uri, run_id, "roc_auc") is None

    ref = register_bundle(uri, "fraud-mlp", run_id)
    assert ref == ModelRef("fraud-mlp", 1, run_id, f"{run.info.artifact_uri}/bundle", ())
    assert ref.uri == "models:/fraud-mlp/1"
    assert get_alias(uri, "fraud-mlp", CHAMPION) is None
    assert get_alias(uri, "no-such-model", CHAMPION) is None
    set_alias(uri, "fraud-mlp", CHAMPION, 1)
    assert get_alias(uri, "fraud-mlp", CHAMPION) == ModelRef(
        "fraud-mlp", 1, run_id, ref.source, (CHAMPION,)
    )


def test_register_refuses_run_without_bundle(tmp_path: Path, uri: str) -> None:
    run_id = log_training_run(
        uri, "exp", "r", params={}, metrics={}, bundle_dir=make_bundle(tmp_path, "b")
    )
    with pytest.raises(FileNotFoundError, match="no bundle"):
        register_bundle(uri, "m", run_id, artifact_path="elsewhere")
    with pytest.raises(FileNotFoundError, match=r"no bundle\.json"):
        log_training_run(uri, "exp", "r", params={}, metrics={}, bundle_dir=tmp_path)


def test_promotion_worse_then_better(tmp_path: Path, uri: str) -> None:
    first = train_and_register(uri, tmp_path, "first", pr_auc=0.80)
    d1 = promote_if_better(uri, first, "pr_auc")
    assert d1.promote and "no current champion" in d1.reason

    worse = train_and_register(uri, tmp_path, "worse", pr_auc=0.75)
    d2 = promote_if_better(uri, worse, "pr_auc")
    assert not d2.promote
    champion = get_alias(uri, "fraud-xgboost", CHAMPION)
    challenger = get_alias(uri, "fraud-xgboost", CHALLENGER)
    assert champion is not None and champion.version == 1
    assert challenger is not None and challenger.version == 2
    tags = client_for(uri).get_model_version("fraud-xgboost", "2").tags
    assert tags["promotion_decision"] == "rejected"
    assert tags["promotion_reason"] == d2.reason
    assert "0.75" in tags["promotion_reason"] and "0.8" in tags["promotion_reason"]
    assert float(tags["promotion_challenger_value"]) == 0.75
    assert float(tags["promotion_champion_value"]) == 0.80
    assert tags["tag"] == "worse"

    better = train_and_register(uri, tmp_path, "better", pr_auc=0.85)
    assert promote_if_better(uri, better, "pr_auc").promote
    champion = get_alias(uri, "fraud-xgboost", CHAMPION)
    assert champion is not None and champion.version == 3
    assert champion.aliases == (CHALLENGER, CHAMPION)
    tags = client_for(uri).get_model_version("fraud-xgboost", "3").tags
    assert tags["promotion_decision"] == "promoted"


# ---------------------------------------------------------------- resolve and download


def test_resolve_model_uri(tmp_path: Path, uri: str) -> None:
    ref = train_and_register(uri, tmp_path, "a", pr_auc=0.7)
    set_alias(uri, ref.name, CHAMPION, ref.version)
    assert resolve_model_uri(uri, "models:/fraud-xgboost@champion").version == 1
    assert resolve_model_uri(uri, "models:/fraud-xgboost/1").run_id == ref.run_id
    cases = {
        "models:/fraud-xgboost@challenger": "no alias 'challenger'",
        "models:/fraud-xgboost/7": "no version 7",
        "models:/nope@champion": "no registered model 'nope'",
        "models:/fraud-xgboost/Production": "stages",
        "runs:/abc/bundle": "malformed",
        "models:/fraud-xgboost": "malformed",
        "models:/a/1/extra": "malformed",
    }
    for bad, message in cases.items():
        with pytest.raises(ValueError, match=message):
            resolve_model_uri(uri, bad)


def test_download_bundle_identical_and_cached(tmp_path: Path, uri: str) -> None:
    ref = train_and_register(uri, tmp_path, "dl", pr_auc=0.7)
    dest = tmp_path / "cache"
    got = download_bundle(uri, ref, dest)
    assert got.is_relative_to(dest / "fraud-xgboost" / "1")
    assert tree(got) == tree(tmp_path / "bundle-dl")
    assert [p.name for p in (dest / "fraud-xgboost").iterdir()] == ["1"]  # no staging left

    (got / "model.onnx").write_bytes(b"sentinel")  # a re-download would overwrite this
    again = download_bundle(uri, ref, dest)
    assert again == got and (again / "model.onnx").read_bytes() == b"sentinel"

    # same name and version from another registry: the cache must not be trusted
    other = ModelRef(ref.name, ref.version, "other-run", ref.source, ())
    fresh = download_bundle(uri, other, dest)
    assert tree(fresh) == tree(tmp_path / "bundle-dl")


# ---------------------------------------------------------------- figures, provenance


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))


def test_figures_are_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    y = rng.integers(0, 2, 5000)
    p = np.clip(0.3 * y + rng.random(5000) * 0.7, 0, 1)
    figs = roc_pr_figures(y, p, tmp_path, "XGBoost test split")
    assert set(figs) == {"roc", "pr"}
    assert figs["roc"].name == "xgboost_test_split-roc.png"
    for path in figs.values():
        _assert_png(path)
    one_class = roc_pr_figures(np.zeros(10), np.linspace(0, 1, 10), tmp_path, "single")
    for path in one_class.values():
        _assert_png(path)
    importance = {f"f{i}": float(rng.random()) for i in range(40)}
    _assert_png(importance_figure(importance, tmp_path, "xgb", top=20))
    _assert_png(importance_figure({}, tmp_path, "empty"))


def test_git_commit(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"
    try:
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        identity = ["-c", "user.name=t", "-c", "user.email=t@t"]
        commit = ["commit", "-q", "--allow-empty", "-m", "x"]
        subprocess.run(["git", "-C", str(tmp_path), *identity, *commit], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not usable here")
    sha = git_commit(tmp_path)
    assert len(sha) >= 7 and all(c in "0123456789abcdef" for c in sha)


def test_global_tracking_uri_untouched(tmp_path: Path, uri: str) -> None:
    before = mlflow.get_tracking_uri()
    train_and_register(uri, tmp_path, "g", pr_auc=0.7)
    assert mlflow.get_tracking_uri() == before
