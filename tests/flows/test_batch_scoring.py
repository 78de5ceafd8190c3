"""The batch-scoring flow on a real dask cluster and a real (temporary) Prefect API: exactly once,
resumable, rescoring on a new champion, surviving a killed worker, quarantine and accounting, the
no-op, the CLI and the deployment file."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tasks.backend import probe_gpu
from tasks.bundle import LoadedBundle, frame_to_raw
from tasks.scoring import LAST_RUN_FILE, MANIFEST_DIR, all_entries

ScoringSetup = Any  # tests/flows/conftest.py: ScoringSetup

pytestmark = pytest.mark.usefixtures("prefect_api")

REPO = Path(__file__).resolve().parents[2]
GPU_OK, GPU_WHY = probe_gpu()
INPUT_ROWS, INPUT_FILES = 10_000, 4  # what the scoring_setup fixture generates
SCORE_ATOL = 1e-6  # same transform code and model in and out of the flow
ONNX_ATOL = 1e-4  # the bundle's ONNX parity tolerance (model.onnx_parity_atol)


def run_flow(setup: ScoringSetup, out: Path, **kw: Any) -> Any:
    from flows.batch_scoring import batch_scoring

    params: dict[str, Any] = {
        "input_path": str(setup.inputs),
        "output_dir": str(out),
        "config_path": str(setup.config),
        "device": "cpu",
    }
    params.update(kw)
    return batch_scoring(**params)


def predictions(out: Path) -> pd.DataFrame:
    files = sorted(out.glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def in_process_scores(bundle_dir: Path, frame: pd.DataFrame, scorer: str = "xgboost") -> pd.Series:
    bundle = LoadedBundle.load(bundle_dir, scorer)  # type: ignore[arg-type]
    probs = bundle.predict_raw(frame_to_raw(frame, bundle.spec.raw_columns))
    return pd.Series(probs, index=frame["transaction_id"].to_numpy())


def assert_exactly_once(out: Path, frame: pd.DataFrame, bundle_dir: Path, atol: float, **kw: Any):
    got = predictions(out)
    assert len(got) == len(frame)
    assert got["transaction_id"].is_unique
    assert set(got["transaction_id"]) == set(frame["transaction_id"])
    want = in_process_scores(bundle_dir, frame, **kw).loc[got["transaction_id"]].to_numpy()
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=0, atol=atol)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    return got


def flow_run_artifacts(run_id: str) -> dict[str, Any]:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]))
        )
    return {a.key or a.type: a for a in arts}


# ---------------------------------------------------------------- exactly once, resume, rescore


@pytest.fixture(scope="module")
def first_run(scoring_setup: ScoringSetup, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("scored")
    summary = run_flow(scoring_setup, out)  # cluster="local": the flow starts its own cluster
    return out, summary


def test_every_row_once_with_the_in_process_score(scoring_setup: ScoringSetup, first_run) -> None:
    out, summary = first_run
    assert (scoring_setup.input_rows, scoring_setup.input_files) == (INPUT_ROWS, INPUT_FILES)
    got = assert_exactly_once(out, scoring_setup.input_frame, scoring_setup.bundles[0], SCORE_ATOL)
    assert set(got["model_name"]) == {scoring_setup.model_name}
    assert set(got["model_version"]) == {scoring_setup.champion.version}
    assert len(list(out.glob("*.parquet"))) == INPUT_FILES  # one predictions file per input
    assert summary["rows"] == {"in": INPUT_ROWS, "scored": INPUT_ROWS, "quarantined": 0}
    assert summary["files"] == {"total": 4, "scored": 4, "quarantined": 0, "skipped": 0}
    assert summary["accounting_holds"] and not summary["failed"]
    assert summary["workers"] == 2 and summary["rows_per_second"] > 0
    assert summary["dask_tasks"] == 4  # CPU workers: one file per task here (GROUPS_PER_WORKER)
    assert sum(summary["score_distribution"]["counts"]) == INPUT_ROWS
    spec = LoadedBundle.load(scoring_setup.bundles[0]).spec
    assert set(summary["drift_psi"]) == set(spec.feature_names)
    assert all(v is not None and v >= 0 for v in summary["drift_psi"].values())
    entries = all_entries(out)
    assert len(entries) == INPUT_FILES and all(e.status == "scored" for e in entries)
    assert all(set(e.drift_counts) == set(spec.feature_names) for e in entries)
    import json

    assert (
        json.loads((out / MANIFEST_DIR / LAST_RUN_FILE).read_text())["run_id"] == summary["run_id"]
    )
    artifacts = flow_run_artifacts(summary["run_id"])
    assert {"batch-scoring-progress", "batch-scoring-summary", "batch-scoring-report"} <= set(
        artifacts
    )
    assert artifacts["batch-scoring-progress"].data == 100.0


def test_rerun_scores_nothing_new(scoring_setup: ScoringSetup, first_run) -> None:
    out, _ = first_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    summary = run_flow(scoring_setup, out)
    assert summary["files"] == {"total": 4, "scored": 0, "quarantined": 0, "skipped": 4}
    assert summary["rows"] == {"in": 0, "scored": 0, "quarantined": 0}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before


def test_new_champion_rescores_and_a_pinned_version_works(
    scoring_setup: ScoringSetup, dask_address: str, tmp_path: Path
) -> None:
    name = "rescore-xgboost"
    first, second = scoring_setup.bundles
    v1 = scoring_setup.register(name, first, "champion")
    out = tmp_path / "out"
    kw = {"model_uri": f"models:/{name}@champion", "cluster": dask_address}
    assert run_flow(scoring_setup, out, **kw)["files"]["scored"] == INPUT_FILES
    v2 = scoring_setup.register(name, second, "champion")
    summary = run_flow(scoring_setup, out, **kw)
    assert summary["model"]["version"] == v2.version
    assert summary["files"]["scored"] == INPUT_FILES and summary["files"]["skipped"] == 0
    got = assert_exactly_once(out, scoring_setup.input_frame, second, SCORE_ATOL)
    assert set(got["model_version"]) == {v2.version}
    assert len(list(out.glob("*.parquet"))) == INPUT_FILES  # v1 predictions were replaced
    pinned = run_flow(
        scoring_setup, out, model_uri=f"models:/{name}/{v1.version}", cluster=dask_address
    )
    assert pinned["model"]["version"] == v1.version and pinned["files"]["scored"] == INPUT_FILES
    assert set(
        assert_exactly_once(out, scoring_setup.input_frame, first, SCORE_ATOL)["model_version"]
    ) == {v1.version}


def test_a_scorer_that_cannot_score_the_bundle_fails_before_any_worker_runs(
    scoring_setup: ScoringSetup, dask_address: str, tmp_path: Path
) -> None:
    """The XGBoost scorer asked for a bundle of another kind: the flow fails on the driver with
    the bundle check's own error, not with every worker task failing, and writes nothing. (The
    bundle is the trained XGBoost bundle with its kind relabelled `mlp` in bundle.json: the
    check reads only the kind.)"""
    import json
    import shutil

    relabelled = tmp_path / "bundle-mlp-kind"
    shutil.copytree(scoring_setup.bundles[0], relabelled)
    meta = json.loads((relabelled / "bundle.json").read_text())
    (relabelled / "bundle.json").write_text(json.dumps({**meta, "kind": "mlp"}))
    name = "relabelled-mlp"
    scoring_setup.register(name, relabelled, "champion")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="scorer 'xgboost' needs an XGBoost bundle") as raised:
        run_flow(scoring_setup, out, model_uri=f"models:/{name}@champion", cluster=dask_address)
    assert "task(s) failed" not in str(raised.value)
    assert list(out.glob("*.parquet")) == [] and all_entries(str(out)) == []
    onnx = run_flow(
        scoring_setup,
        out,
        model_uri=f"models:/{name}@champion",
        scorer="onnx",
        cluster=dask_address,
    )
    assert onnx["rows"]["scored"] == INPUT_ROWS


def test_onnx_scorer(scoring_setup: ScoringSetup, dask_address: str, tmp_path: Path) -> None:
    summary = run_flow(scoring_setup, tmp_path / "out", scorer="onnx", cluster=dask_address)
    assert summary["scorer"] == "onnx" and summary["rows"]["scored"] == INPUT_ROWS
    assert_exactly_once(
        tmp_path / "out", scoring_setup.input_frame, scoring_setup.bundles[0], ONNX_ATOL
    )


# ---------------------------------------------------------------- a worker dies mid-run


def _slow_scoring(delay_s: float) -> None:
    """Runs inside each worker process: every chunk takes `delay_s` longer to score."""
    from tasks.scoring import CpuEngine

    original = CpuEngine.score

    def slow(self: Any, frame: Any) -> Any:
        time.sleep(delay_s)
        return original(self, frame)

    CpuEngine.score = slow  # type: ignore[method-assign]


def test_worker_killed_mid_run_still_scores_every_row_once(
    scoring_setup: ScoringSetup, tmp_path: Path, test_seed: int
) -> None:
    from distributed import Client, LocalCluster

    from tasks.generate import generate_transactions

    inputs = tmp_path / "in"
    paths = generate_transactions(8_000, inputs, seed=test_seed % 983 + 5, rows_per_file=1_000)
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    out = tmp_path / "out"
    killed: dict[str, Any] = {}
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(_slow_scoring, 0.5)
        pids = client.run(os.getpid)

        def kill_a_busy_worker() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                done = len(list((out / MANIFEST_DIR).glob("*.json"))) if out.is_dir() else 0
                busy = [w for w, keys in client.processing().items() if keys and w in pids]
                if done >= 1 and busy:
                    killed["worker"], killed["files_done"] = busy[0], done
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        summary = run_flow(
            scoring_setup,
            out,
            input_path=str(inputs),
            cluster=cluster.scheduler_address,
            overrides={"scoring.files_per_task": 2},
        )
        killer.join(timeout=5)
    assert killed, "no worker was killed: the run finished before the killer saw it busy"
    assert killed["files_done"] < len(paths)
    assert summary["rows"] == {"in": 8_000, "scored": 8_000, "quarantined": 0}
    assert summary["files"]["scored"] == len(paths) and summary["accounting_holds"]
    assert_exactly_once(out, frame, scoring_setup.bundles[0], SCORE_ATOL)
    assert len(list(out.glob("*.parquet"))) == len(paths)


# ---------------------------------------------------------------- quarantine and accounting


BAD_KINDS = {
    "unreadable": "unreadable parquet",
    "missing-column": "column 'amount': missing",
    "mistyped-column": "column 'amount': expected a numeric type",
    "null-ids": "all ids are null",
    "duplicate-ids": "duplicate ids",
}


@pytest.fixture(scope="module")
def mixed_inputs(scoring_setup: ScoringSetup, tmp_path_factory: pytest.TempPathFactory):
    """Two good files (one with NaN, inf and unseen values) and one file of each bad kind."""
    base = scoring_setup.input_frame
    d = tmp_path_factory.mktemp("mixed")
    good = base.iloc[:2000].copy()
    good.loc[good.index[:10], "amount"] = np.nan
    good.loc[good.index[10:20], "amount"] = np.inf
    good.loc[good.index[20:30], "channel"] = "carrier-pigeon"
    good.loc[good.index[30:40], "mcc"] = 1
    good.loc[good.index[40:50], "timestamp"] = pd.NaT
    good.to_parquet(d / "good-1.parquet", index=False)
    base.iloc[2000:3000].to_parquet(d / "good-2.parquet", index=False)
    bad = base.iloc[3000:3500]
    (d / "unreadable.parquet").write_bytes(b"PAR1 definitely not parquet")
    bad.drop(columns=["amount"]).to_parquet(d / "missing-column.parquet", index=False)
    bad.assign(amount=bad["amount"].astype(str)).to_parquet(
        d / "mistyped-column.parquet", index=False
    )
    bad.assign(transaction_id=np.nan).to_parquet(d / "null-ids.parquet", index=False)
    dup = bad.copy()
    dup.loc[dup.index[1], "transaction_id"] = dup["transaction_id"].iloc[0]
    dup.to_parquet(d / "duplicate-ids.parquet", index=False)
    return d, pd.concat([good, base.iloc[2000:3000]], ignore_index=True)


# batch_rows 2500, all files in one task: duplicate-ids.parquet is read with good-1, good-2 on
# its own (the missing and mistyped columns are found without reading), null-ids (float ids) alone
BATCHED = {"scoring.batch_rows": 2500, "scoring.files_per_task": 7}


@pytest.mark.parametrize("batching", [{}, BATCHED], ids=["file-by-file", "batched"])
def test_bad_partitions_are_quarantined_and_accounting_holds(
    batching: dict[str, int],
    scoring_setup: ScoringSetup,
    mixed_inputs,
    dask_address: str,
    tmp_path: Path,
) -> None:
    inputs, good = mixed_inputs
    out = tmp_path / "out"
    summary = run_flow(
        scoring_setup,
        out,
        input_path=str(inputs),
        cluster=dask_address,
        overrides={"scoring.max_quarantined_fraction": 1.0, **batching},
    )
    rows = summary["rows"]
    assert rows["in"] == rows["scored"] + rows["quarantined"]
    assert rows["scored"] == 3000 and rows["quarantined"] == 4 * 500  # unreadable: rows unknown
    assert summary["files"]["quarantined"] == len(BAD_KINDS) and not summary["failed"]
    reasons = {Path(q["input"]).stem: q["reason"] for q in summary["quarantined"]}
    assert set(reasons) == set(BAD_KINDS)
    for kind, fragment in BAD_KINDS.items():
        assert fragment in reasons[kind], (kind, reasons[kind])
    by_input = {Path(e.input).stem: e for e in all_entries(out)}
    assert {k for k, e in by_input.items() if e.status == "quarantined"} == set(BAD_KINDS)
    # rows with NaN, inf and unseen categories are scored, never dropped
    assert_exactly_once(out, good, scoring_setup.bundles[0], SCORE_ATOL)


def test_too_much_quarantined_ends_failed_with_the_counts(
    scoring_setup: ScoringSetup, mixed_inputs, dask_address: str, tmp_path: Path
) -> None:
    inputs, _ = mixed_inputs
    out = tmp_path / "out"
    state = run_flow(
        scoring_setup, out, input_path=str(inputs), cluster=dask_address, return_state=True
    )
    assert state.is_failed()
    assert "quarantined" in (state.message or "") and "max_quarantined_fraction" in (
        state.message or ""
    )
    import json

    last = json.loads((out / MANIFEST_DIR / LAST_RUN_FILE).read_text())
    assert (
        last["failed"]
        and last["rows"]["in"] == last["rows"]["scored"] + last["rows"]["quarantined"]
    )


def test_empty_input_directory_is_a_clean_noop(scoring_setup: ScoringSetup, tmp_path: Path) -> None:
    empty = tmp_path / "incoming"
    empty.mkdir()
    out = tmp_path / "out"
    summary = run_flow(scoring_setup, out, input_path=str(empty))
    assert summary["files"] == {"total": 0, "scored": 0, "quarantined": 0, "skipped": 0}
    assert summary["rows"] == {"in": 0, "scored": 0, "quarantined": 0} and not summary["failed"]
    assert not out.exists()


def test_each_worker_loads_a_model_once(
    scoring_setup: ScoringSetup, dask_address: str, tmp_path: Path
) -> None:
    from distributed import Client

    from tasks.cluster import cache_loads

    for i in range(2):
        run_flow(scoring_setup, tmp_path / f"out-{i}", cluster=dask_address)
    with Client(dask_address) as client:
        loads = client.run(cache_loads)
    assert loads and all(n == 1 for per_worker in loads.values() for n in per_worker.values())


# ---------------------------------------------------------------- CLI and deployments


def test_cli_score_and_exit_codes(
    scoring_setup: ScoringSetup, mixed_inputs, dask_address: str, tmp_path: Path
) -> None:
    from flows.cli import app

    runner = CliRunner()
    for command in ("score", "serve"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
    common = ["--config", str(scoring_setup.config), "--cluster", dask_address, "--device", "cpu"]
    ok = runner.invoke(
        app,
        ["score", "--input", str(scoring_setup.inputs), "--output", str(tmp_path / "a"), *common],
    )
    assert ok.exit_code == 0, ok.output
    assert f"{INPUT_ROWS:,} scored" in ok.output
    inputs, _ = mixed_inputs
    bad = runner.invoke(app, ["score", "-i", str(inputs), "-o", str(tmp_path / "b"), *common])
    assert bad.exit_code == 1, bad.output
    assert "FAILED" in bad.output
    typo = runner.invoke(
        app,
        [
            "score",
            "-i",
            str(inputs),
            "-o",
            str(tmp_path / "c"),
            "--model",
            "models:/nope@x",
            *common,
        ],
    )
    assert typo.exit_code == 2 and "nope" in typo.output


def test_deployment_file_defines_a_valid_nightly_schedule() -> None:
    from prefect.flows import load_flow_from_entrypoint

    from flows.cli_scoring import load_scoring_deployments, runner_deployments

    path = REPO / "deployments" / "prefect.yaml"
    specs = load_scoring_deployments(path)
    assert [s.name for s in specs] == ["nightly-batch-scoring"]
    (spec,) = specs
    assert [(s.cron, s.active) for s in spec.schedules] == [("0 2 * * *", True)]
    import yaml

    entry = yaml.safe_load(path.read_text())["deployments"][0]["entrypoint"]
    flow = load_flow_from_entrypoint(str(REPO / entry), use_placeholder_flow=False)
    assert flow.name == "batch_scoring"
    flow.validate_parameters(spec.parameters)  # raises on unknown or mistyped parameters
    (deployment,) = runner_deployments(specs)
    assert deployment.name == "nightly-batch-scoring"
    assert deployment.parameters == spec.parameters and len(deployment.schedules) == 1
    (override,) = runner_deployments(specs, cron="*/5 * * * *")
    assert override.schedules[0].schedule.cron == "*/5 * * * *"


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
@pytest.mark.parametrize("partition_rows", [1_500, 3_000])  # files streamed; files batched
def test_gpu_flow_matches_the_cpu_model(
    partition_rows: int, scoring_setup: ScoringSetup, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary = run_flow(scoring_setup, out, device="gpu", partition_rows=partition_rows)
    assert summary["device"] == "gpu" and summary["rows"]["scored"] == INPUT_ROWS
    assert_exactly_once(out, scoring_setup.input_frame, scoring_setup.bundles[0], 1e-5)
