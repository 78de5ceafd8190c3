"""Batch scoring without a cluster: naming, planning, grouping, accounting, the worker pipeline
(exactly once, chunking, quarantine, resume, rescoring) and the device transform's logic."""

from __future__ import annotations

import math
import os
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.backend import probe_gpu, resolve_backend
from tasks.bundle import LoadedBundle, frame_to_raw
from tasks.io import DataError
from tasks.scoring import (
    GPU_BATCH_READ_THREADS,
    GPU_BATCH_ROWS,
    GPU_TASK_BYTES,
    LAST_RUN_FILE,
    MANIFEST_DIR,
    InputPartition,
    ManifestEntry,
    OutputFormat,
    RunTotals,
    ScoringError,
    ScoringJob,
    dictionary_columns,
    discover_partitions,
    entry_file_name,
    failure_reason,
    files_per_batch,
    gpu_group_count,
    group_count,
    group_partitions,
    is_current,
    load_engine,
    output_file_name,
    output_lock,
    partition_of,
    plan_partitions,
    quarantined_fraction,
    raw_columns,
    read_entry,
    read_manifest,
    run_summary,
    score_partitions,
    scoring_roles,
    summary_markdown,
    summary_table,
    sweep_outputs,
    task_count,
    write_entry,
    write_run_summary,
)

GPU_OK, GPU_WHY = probe_gpu()
# (scoring.gpu_io, scoring.gpu_streams): cuDF I/O on the I/O threads' own CUDA streams (the
# default), cuDF I/O on the default stream, pyarrow I/O on CPU threads (streams do not apply)
GPU_IO_SETTINGS = [("cudf", True), ("cudf", False), ("arrow", True)]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def bundle_dir(raw_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small XGBoost bundle trained on the shared synthetic dataset."""
    from tasks.config import builtin_config
    from tasks.etl import load_transform, run_etl
    from tasks.train import train_xgboost

    home = tmp_path_factory.mktemp("scoring-unit")
    cfg = builtin_config(
        raw_dataset, home, **{"model.xgboost.n_estimators": 15, "model.mlp.enabled": False}
    )
    backend = resolve_backend("cpu")
    etl = run_etl(cfg, backend, home / "etl")
    spec, _ = load_transform(etl.transform_dir)
    model = train_xgboost(
        etl, spec.feature_names, spec.target_column, cfg.model, backend, home / "bundle", 0
    )
    return model.bundle_dir


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> LoadedBundle:
    return LoadedBundle.load(bundle_dir, "xgboost")


@pytest.fixture(scope="module")
def base_frame(tmp_path_factory: pytest.TempPathFactory, test_seed: int) -> pd.DataFrame:
    """6,000 fresh raw rows (another seed than the training data)."""
    from tasks.generate import generate_transactions

    out = tmp_path_factory.mktemp("score-input")
    paths = generate_transactions(6_000, out, seed=test_seed % 997 + 1, rows_per_file=6_000)
    return pd.read_parquet(paths[0])


def make_job(bundle_dir: Path, out: Path, **kw: Any) -> ScoringJob:
    params: dict[str, Any] = {
        "bundle_dir": str(bundle_dir),
        "model_name": "fraud-xgb",
        "model_version": 1,
        "scorer": "xgboost",
        "device": "cpu",
        "output_dir": str(out),
        "partition_rows": 1_000_000,
        "run_id": "unit",
    }
    params.update(kw)
    return ScoringJob(**params)


def write_parts(frame: pd.DataFrame, directory: Path, n: int, **kw: Any) -> list[InputPartition]:
    directory.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, chunk in enumerate(np.array_split(np.arange(len(frame)), n)):
        path = directory / f"part-{i}.parquet"
        frame.iloc[chunk].to_parquet(path, index=False, **kw)
        parts.append(partition_of(path))
    return parts


def score(job: ScoringJob, parts: list[InputPartition]) -> list[ManifestEntry]:
    return score_partitions(load_engine(job, threads=1), job, parts)


def outputs(out: Path) -> pd.DataFrame:
    files = sorted(p for p in out.glob("*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)


def expected_scores(bundle: LoadedBundle, frame: pd.DataFrame) -> pd.Series:
    probs = bundle.predict_raw(frame_to_raw(frame, bundle.spec.raw_columns))
    return pd.Series(probs, index=frame["transaction_id"].to_numpy())


def hidden_files(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- naming and planning


def _part(path: str = "/in/a.parquet", fp: str = "0123456789abcdef", size: int = 10):
    return InputPartition(path=path, fingerprint=fp, size=size)


def test_output_names_are_deterministic_per_content_model_and_version() -> None:
    a = output_file_name(_part(), "fraud/xgb", 3)
    assert a == output_file_name(_part(), "fraud/xgb", 3)
    assert a == "a-0123456789abcdef-fraud_xgb-v3.parquet"
    assert a != output_file_name(_part(), "fraud/xgb", 4)
    assert a != output_file_name(_part(fp="fedcba9876543210"), "fraud/xgb", 3)
    assert entry_file_name("/in/a.parquet") == entry_file_name("/in/a.parquet")
    assert entry_file_name("/in/a.parquet") != entry_file_name("/other/a.parquet")


def _entry(part: InputPartition, version: int = 1, name: str = "m", **kw: Any) -> ManifestEntry:
    return ManifestEntry(
        input=part.path,
        fingerprint=part.fingerprint,
        model_name=name,
        model_version=version,
        status=kw.pop("status", "scored"),
        rows_in=kw.pop("rows_in", 5),
        rows_scored=kw.pop("rows_scored", 5),
        rows_quarantined=kw.pop("rows_quarantined", 0),
        **kw,
    )


def test_plan_skips_only_same_content_and_model_version() -> None:
    same, changed, newer, other, fresh = (_part(f"/in/{c}.parquet") for c in "abcde")
    entries = {
        same.path: _entry(same),
        changed.path: _entry(_part(changed.path, fp="ffffffffffffffff")),
        newer.path: _entry(newer, version=0),
        other.path: _entry(other, name="another-model"),
    }
    todo, done = plan_partitions([same, changed, newer, other, fresh], entries, "m", 1)
    assert [p.path for p in todo] == [changed.path, newer.path, other.path, fresh.path]
    assert [e.input for e in done] == [same.path]
    assert is_current(entries[same.path], same, "m", 1)
    assert not is_current(None, same, "m", 1)


def test_group_count_bounds_tasks_not_files() -> None:
    assert group_count(0, 4) == 0
    assert group_count(3, 4) == 3
    assert group_count(10_000, 4) == 32  # a few dozen dask tasks for ten thousand files
    assert group_count(10, 4, files_per_task=3) == 4
    # workers reading 4 files at once get at least 8 files per task
    assert group_count(20, 1, files_in_flight=4) == 3
    assert group_count(10_000, 4, files_in_flight=4) == 32
    assert group_count(5, 2, files_in_flight=4) == 2


def test_gpu_tasks_one_per_thread_unless_inputs_are_large() -> None:
    gib = 1 << 30
    assert gpu_group_count(0, 0, 2) == 0
    assert gpu_group_count(200, 3 * gib, 1) == 1  # 200M rows of the bench: one long pipeline
    assert gpu_group_count(200, 3 * gib, 2) == 2  # a task per worker thread
    assert gpu_group_count(3, 1000, 8) == 3  # never more tasks than files
    assert gpu_group_count(100, 10 * GPU_TASK_BYTES, 2) == 10
    # a whole number of tasks per thread: 8 GPUs never wait on one GPU's last task
    assert gpu_group_count(100, 10 * GPU_TASK_BYTES + 1, 2) == 12
    assert gpu_group_count(1000, 25 * GPU_TASK_BYTES, 8) == 32
    assert gpu_group_count(20, 25 * GPU_TASK_BYTES, 8) == 20
    assert gpu_group_count(100, gib, 1, files_per_task=30) == 4  # set by the user


def test_task_count_follows_the_device(tmp_path: Path) -> None:
    parts = [_part(f"/in/{i:03d}.parquet", size=1 << 20) for i in range(200)]
    cpu, gpu = make_job(tmp_path, tmp_path), make_job(tmp_path, tmp_path, device="gpu")
    assert task_count(cpu, parts, 2, 2) == group_count(200, 2) == 16
    assert task_count(gpu, parts, 1, 1) == 1  # 200 MiB: one long pipeline
    assert task_count(gpu, parts, 2, 4) == 4  # a task per worker thread
    assert task_count(gpu, parts, 1, 1, files_per_task=29) == 7
    big = [_part(f"/in/{i:03d}.parquet", size=GPU_TASK_BYTES // 10) for i in range(200)]
    assert task_count(gpu, big, 2, 2) == 20  # 20 tasks' worth of bytes, 10 per thread


def test_batch_mode_defaults_and_tasks_of_two_batches(tmp_path: Path) -> None:
    cpu = make_job(tmp_path, tmp_path)
    gpu = make_job(tmp_path, tmp_path, device="gpu")
    assert (cpu.rows_per_batch, gpu.rows_per_batch) == (0, GPU_BATCH_ROWS)  # 0 = automatic
    assert make_job(tmp_path, tmp_path, batch_rows=5000).rows_per_batch == 5000
    assert make_job(tmp_path, tmp_path, device="gpu", batch_rows=5000).rows_per_batch == 5000
    assert files_per_batch(8_000_000, 2_000_000) == 4
    assert files_per_batch(8_000_000, 3_000_000) == 2
    assert files_per_batch(1000, 2_000_000) == 1  # a batch holds at least one file
    assert cpu.files_in_flight == 1  # batching off: the files read at once
    # GPU_BATCH_ROWS-row batches of files of up to 1M rows (partition_rows)
    assert gpu.files_in_flight == GPU_BATCH_ROWS // 1_000_000
    big_files = make_job(tmp_path, tmp_path, device="gpu", partition_rows=GPU_BATCH_ROWS // 2)
    assert big_files.files_in_flight == 4  # GPU_IO_THREADS, more than 2 files per batch
    batched = make_job(tmp_path, tmp_path, batch_rows=5000, partition_rows=1000)
    assert batched.files_in_flight == 5
    # every dask task gets at least two batches, so reading one overlaps scoring the other
    assert group_count(100, 1, files_in_flight=gpu.files_in_flight) == math.ceil(
        100 / (2 * gpu.files_in_flight)
    )
    assert group_count(100, 4, files_in_flight=batched.files_in_flight) == 10


@pytest.mark.parametrize("n_groups", [1, 2, 3, 7, 50])
def test_groups_are_contiguous_balanced_and_complete(n_groups: int, test_seed: int) -> None:
    rng = np.random.default_rng(test_seed)
    parts = [
        _part(f"/in/{i:03d}.parquet", size=int(s)) for i, s in enumerate(rng.integers(1, 100, 20))
    ]
    groups = group_partitions(parts, n_groups)
    assert [p for g in groups for p in g] == parts
    assert all(groups) and len(groups) == min(n_groups, len(parts))
    if n_groups == 2:
        sizes = [sum(p.size for p in g) for g in groups]
        assert abs(sizes[0] - sizes[1]) <= 100
    assert group_partitions([], 3) == []


# ---------------------------------------------------------------- accounting and summary


def test_totals_accounting_and_failure_threshold() -> None:
    totals = RunTotals()
    totals.add(_entry(_part("/a"), rows_in=90, rows_scored=90, score_counts=[90] + [0] * 9))
    totals.add(
        _entry(_part("/b"), status="quarantined", rows_in=10, rows_scored=0, rows_quarantined=10,
               reason="/b: column 'amount': missing")
    )  # fmt: skip
    assert (totals.rows_in, totals.rows_scored, totals.rows_quarantined) == (100, 90, 10)
    assert totals.accounting_holds and totals.files == 2
    assert quarantined_fraction(totals) == pytest.approx(0.1)
    assert failure_reason(totals, 0.2) is None
    assert "10.00%" in (failure_reason(totals, 0.05) or "")
    assert RunTotals.from_json(totals.to_json()).to_json() == totals.to_json()
    with pytest.raises(ScoringError, match="does not add up"):
        totals.add(_entry(_part("/c"), rows_in=5, rows_scored=4))
    only_unreadable = RunTotals()
    only_unreadable.add(
        _entry(_part("/d"), status="quarantined", rows_in=0, rows_scored=0, reason="unreadable")
    )
    assert quarantined_fraction(only_unreadable) == 1.0
    assert quarantined_fraction(RunTotals()) == 0.0


def test_summary_table_and_report(tmp_path: Path) -> None:
    from tasks.spec import Histogram

    totals = RunTotals()
    totals.add(
        _entry(_part("/a"), rows_in=4, rows_scored=4, positives=1, score_counts=[3] + [0] * 8 + [1],
               drift_counts={"amount": [1, 3]})
    )  # fmt: skip
    summary = run_summary(
        run_id="r1", input_path="/in", output_dir=str(tmp_path), model={"name": "m", "version": 2},
        scorer="xgboost", device="cpu", workers=2, totals=totals, files_total=3, files_skipped=2,
        seconds_scoring=2.0, seconds_total=3.0,
        histograms={"amount": Histogram(edges=[0.0], fractions=[0.5, 0.5])}, max_fraction=0.05,
    )  # fmt: skip
    assert summary["rows"] == {"in": 4, "scored": 4, "quarantined": 0}
    assert summary["rows_per_second"] == 2.0
    assert summary["drift_psi"]["amount"] > 0 and not summary["failed"]
    table = {r["metric"]: r["value"] for r in summary_table(summary)}
    assert table["rows scored"] == 4 and table["score [0.9, 1.0)"] == 1
    assert "| amount |" in summary_markdown(summary)
    path = write_run_summary(tmp_path, summary)
    assert path.is_file() and (tmp_path / MANIFEST_DIR / LAST_RUN_FILE).is_file()


# ---------------------------------------------------------------- inputs, manifest, lock


def test_discover_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert discover_partitions(str(empty)) == []
    assert discover_partitions(str(tmp_path / "nothing-*.parquet")) == []
    # a glob whose fixed directory does not exist is a typo, not an empty landing directory
    with pytest.raises(DataError, match="no such directory"):
        discover_partitions(str(tmp_path / "misspelt" / "*.parquet"))
    assert discover_partitions(str(tmp_path / "*" / "nothing-*.parquet")) == []
    with pytest.raises(DataError, match="no such file"):
        discover_partitions(str(tmp_path / "missing"))
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(data / "b.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(data / "a.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(data / ".hidden.parquet")
    (data / "README.txt").write_text("not a table")
    found = discover_partitions(str(data))
    assert [Path(p.path).name for p in found] == ["a.parquet", "b.parquet"]
    (data / "preds").mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(data / "preds" / "x.parquet")
    globbed = discover_partitions(str(data / "*" / "*.parquet"), output_dir=str(data / "preds"))
    assert globbed == []  # a glob skips the output directory's files (earlier predictions)
    # a directory or file inside the output directory would lose all its files: refused
    for source, output in [(data, data), (data / "preds", data), (data / "a.parquet", data)]:
        with pytest.raises(DataError, match="inside the output directory"):
            discover_partitions(str(source), output_dir=str(output))
    assert len(discover_partitions(str(data), output_dir=str(data / "preds"))) == 2
    before = found[0].fingerprint
    os.utime(data / "a.parquet", ns=(1, 1))
    assert partition_of(data / "a.parquet").fingerprint != before


def test_manifest_roundtrip_and_sweep(tmp_path: Path) -> None:
    part = _part(str(tmp_path / "in.parquet"))
    kept = output_file_name(part, "m", 2)
    old = output_file_name(part, "m", 1)
    for name in (kept, old, ".x.parquet.tmp-1234", "notes.parquet"):
        (tmp_path / name).write_bytes(b"x")
    write_entry(tmp_path, _entry(part, version=2, output=kept))
    assert read_entry(tmp_path, part.path) == _entry(part, version=2, output=kept)
    assert read_manifest(tmp_path, [part.path, "/nope"]) == {
        part.path: read_entry(tmp_path, part.path)
    }
    (tmp_path / MANIFEST_DIR / entry_file_name("/broken")).write_text("{not json")
    assert read_entry(tmp_path, "/broken") is None
    assert sweep_outputs(tmp_path) == sorted([old, ".x.parquet.tmp-1234"])
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == sorted([kept, "notes.parquet"])


def test_output_lock_is_exclusive(tmp_path: Path) -> None:
    with output_lock(tmp_path), pytest.raises(RuntimeError, match="another batch scoring run"):  # noqa: SIM117
        with output_lock(tmp_path):
            pass
    with output_lock(tmp_path):
        pass


# ---------------------------------------------------------------- the worker pipeline


@pytest.mark.parametrize("io_threads", [1, 2])
def test_every_row_once_with_the_in_process_score(
    io_threads: int,
    bundle_dir: Path,
    bundle: LoadedBundle,
    base_frame: pd.DataFrame,
    tmp_path: Path,
) -> None:
    """Also with several files read and written at once (what GPU workers do)."""
    parts = write_parts(base_frame, tmp_path / "in", 3)
    out = tmp_path / "out"
    entries = score(make_job(bundle_dir, out, io_threads=io_threads), parts)
    assert [e.status for e in entries] == ["scored"] * 3
    assert sum(e.rows_scored for e in entries) == len(base_frame)
    got = outputs(out)
    assert got["transaction_id"].is_unique
    assert set(got["transaction_id"]) == set(base_frame["transaction_id"])
    want = expected_scores(bundle, base_frame).loc[got["transaction_id"]].to_numpy()
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(got["label"], (got["score"] >= bundle.threshold).astype(np.int8))
    assert set(got["model_name"]) == {"fraud-xgb"} and set(got["model_version"]) == {1}
    assert list(got.columns) == ["transaction_id", "score", "label", "model_name", "model_version"]
    for entry, part in zip(entries, parts, strict=True):
        assert entry.output == output_file_name(part, "fraud-xgb", 1)
        assert read_entry(out, part.path) == entry
        assert sum(entry.score_counts) == entry.rows_scored
        assert all(sum(c) == entry.rows_scored for c in entry.drift_counts.values())
    assert hidden_files(out) == []


def test_cpu_output_dictionary_encodes_only_the_few_valued_columns(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    parts = write_parts(base_frame.iloc[:1000], tmp_path / "in", 1)
    (entry,) = score(make_job(bundle_dir, tmp_path / "out"), parts)
    meta = pq.ParquetFile(tmp_path / "out" / str(entry.output)).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(5)}
    dictionary = {c for c, enc in encodings.items() if "RLE_DICTIONARY" in enc}
    assert dictionary == {"label", "model_name", "model_version"}


def test_large_file_is_streamed_in_chunks_with_the_same_result(
    bundle_dir: Path, bundle: LoadedBundle, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    frame = base_frame.iloc[:2000]
    (part,) = write_parts(frame, tmp_path / "in", 1, row_group_size=500)
    out = tmp_path / "out"
    (entry,) = score(make_job(bundle_dir, out, partition_rows=700), [part])
    assert entry.status == "scored" and entry.rows_scored == 2000
    assert pq.ParquetFile(out / str(entry.output)).metadata.num_row_groups == math.ceil(2000 / 700)
    got = outputs(out)
    np.testing.assert_array_equal(got["transaction_id"], frame["transaction_id"])
    np.testing.assert_allclose(
        got["score"], expected_scores(bundle, frame).to_numpy(), rtol=0, atol=1e-7
    )


def _bad(kind: str, frame: pd.DataFrame, path: Path) -> str:
    """Write one kind of bad partition; return the expected reason fragment."""
    bad = frame.copy()
    if kind == "unreadable":
        path.write_bytes(b"PAR1 this is not a parquet file")
        return "unreadable parquet"
    if kind == "missing column":
        bad = bad.drop(columns=["amount"])
        reason = "column 'amount': missing"
    elif kind == "mistyped column":
        bad["amount"] = bad["amount"].astype(str)
        reason = "column 'amount': expected a numeric type"
    elif kind == "all-null id":
        bad["transaction_id"] = np.nan
        reason = "all ids are null"
    else:
        bad.loc[bad.index[1], "transaction_id"] = bad["transaction_id"].iloc[0]
        reason = "duplicate ids"
    bad.to_parquet(path, index=False, row_group_size=300)
    return reason


@pytest.mark.parametrize(
    "kind", ["unreadable", "missing column", "mistyped column", "all-null id", "duplicate ids"]
)
@pytest.mark.parametrize(("partition_rows", "io_threads"), [(1_000_000, 1), (400, 1), (400, 3)])
def test_bad_partitions_are_quarantined_with_reason(
    kind: str,
    partition_rows: int,
    io_threads: int,
    bundle_dir: Path,
    base_frame: pd.DataFrame,
    tmp_path: Path,
) -> None:
    good, bad = base_frame.iloc[:1000], base_frame.iloc[1000:2000]
    (good_part,) = write_parts(good, tmp_path / "in", 1)
    bad_path = tmp_path / "in" / "bad.parquet"
    reason = _bad(kind, bad, bad_path)
    out = tmp_path / "out"
    job = make_job(bundle_dir, out, partition_rows=partition_rows, io_threads=io_threads)
    entries = {e.input: e for e in score(job, [partition_of(bad_path), good_part])}
    quarantined = entries[str(bad_path.resolve())]
    assert quarantined.status == "quarantined"
    assert reason in str(quarantined.reason)
    rows = 0 if kind == "unreadable" else 1000
    assert (quarantined.rows_in, quarantined.rows_quarantined, quarantined.rows_scored) == (
        rows,
        rows,
        0,
    )
    assert quarantined.output is None
    assert entries[good_part.path].status == "scored"
    totals = RunTotals()
    for e in entries.values():
        totals.add(e)
    assert totals.accounting_holds and totals.rows_scored == 1000
    assert len(outputs(out)) == 1000 and hidden_files(out) == []


@pytest.mark.parametrize(("partition_rows", "missing"), [(1_000_000, 1), (1_000_000, 3), (400, 3)])
def test_rows_with_a_missing_id_are_scored_and_repeated_ids_still_quarantine(
    partition_rows: int,
    missing: int,
    bundle_dir: Path,
    bundle: LoadedBundle,
    base_frame: pd.DataFrame,
    tmp_path: Path,
) -> None:
    """A missing id is a bad value in its row: the row is scored (never dropped) with no id,
    however many rows lack one; several missing ids are not duplicates of each other. The other
    ids come out exact and integer, also above 2**53 (pandas would read them as float64). A
    repeated id that is there still quarantines the file, with that id as the example."""
    frame = base_frame.iloc[:1000].copy()
    frame["transaction_id"] = (frame["transaction_id"] + 2**60).astype("Int64")
    frame.loc[frame.index[10 : 10 + missing], "transaction_id"] = pd.NA
    # without pandas' metadata, as Spark or any non-pandas writer leaves it: pandas then reads
    # integers with nulls as float64
    (tmp_path / "in").mkdir()
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, tmp_path / "in" / "part-0.parquet", row_group_size=300)
    part = partition_of(tmp_path / "in" / "part-0.parquet")
    repeated = frame.copy()
    repeated.loc[repeated.index[500], "transaction_id"] = repeated["transaction_id"].iloc[600]
    bad_path = tmp_path / "in" / "repeated.parquet"
    repeated.to_parquet(bad_path, index=False)
    out = tmp_path / "out"
    job = make_job(bundle_dir, out, partition_rows=partition_rows)
    entries = {e.input: e for e in score(job, [part, partition_of(bad_path)])}
    scored, bad = entries[part.path], entries[str(bad_path.resolve())]
    assert (scored.status, scored.rows_in, scored.rows_scored) == ("scored", 1000, 1000)
    got = outputs(out)
    assert pq.read_schema(out / str(scored.output)).field("transaction_id").type == pa.int64()
    written = pq.read_table(out / str(scored.output)).column("transaction_id").to_pylist()
    assert written == [None if pd.isna(i) else int(i) for i in frame["transaction_id"]]
    want = bundle.predict_raw(frame_to_raw(frame, bundle.spec.raw_columns))
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=0, atol=1e-7)
    assert bad.status == "quarantined" and bad.rows_quarantined == 1000
    want_reason = f"1 duplicate ids (e.g. {int(frame['transaction_id'].iloc[600])})"
    assert want_reason in str(bad.reason)


def test_csv_integer_ids_with_missing_values_come_out_exact(
    bundle_dir: Path, bundle: LoadedBundle, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    """CSV: pandas parses an integer column with empty fields as float64; ids that were
    integers in training are parsed again as nullable integers, exact above 2**53."""
    frame = base_frame.iloc[:500].copy()
    frame["transaction_id"] = (frame["transaction_id"] + 2**60).astype("Int64")
    frame.loc[frame.index[[3, 7]], "transaction_id"] = pd.NA
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "part.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "out"
    (entry,) = score(make_job(bundle_dir, out), [partition_of(path)])
    assert (entry.status, entry.rows_scored) == ("scored", 500)
    written = pq.read_table(out / str(entry.output)).column("transaction_id")
    assert written.type == pa.int64()
    assert written.to_pylist() == [None if pd.isna(i) else int(i) for i in frame["transaction_id"]]
    np.testing.assert_allclose(
        pq.read_table(out / str(entry.output)).column("score").to_numpy(),
        bundle.predict_raw(frame_to_raw(frame, bundle.spec.raw_columns)),
        rtol=0,
        atol=1e-6,
    )


def test_bad_values_are_scored_the_way_training_defined(
    bundle_dir: Path, bundle: LoadedBundle, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    frame = base_frame.iloc[:500].copy()
    frame.loc[frame.index[0:5], "amount"] = np.nan
    frame.loc[frame.index[5:10], "amount"] = np.inf
    frame.loc[frame.index[10:15], "amount"] = -np.inf
    frame.loc[frame.index[15:20], "channel"] = "telepathy"
    frame.loc[frame.index[20:25], "channel"] = None
    frame.loc[frame.index[25:30], "mcc"] = 9999
    frame.loc[frame.index[30:35], "country"] = "XX"
    frame.loc[frame.index[35:40], "card_id"] = 10**12
    frame.loc[frame.index[40:45], "timestamp"] = pd.NaT
    frame.loc[frame.index[45:50], "customer_age"] = np.nan
    (part,) = write_parts(frame, tmp_path / "in", 1)
    out = tmp_path / "out"
    (entry,) = score(make_job(bundle_dir, out), [part])
    assert entry.status == "scored" and entry.rows_scored == 500
    got = outputs(out)
    assert np.isfinite(got["score"]).all()
    want = expected_scores(bundle, pd.read_parquet(part.path)).to_numpy()
    np.testing.assert_allclose(got["score"], want, rtol=0, atol=1e-7)


def test_cpu_engine_reads_string_categories_dictionary_encoded(
    bundle_dir: Path, bundle: LoadedBundle, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    """The CPU engine reads categorical-only string columns as categoricals and computes the
    exact model input that the row-by-row transform computes (missing and unseen values too)."""
    from tasks.numpy_features import transform_raw

    spec = bundle.spec
    assert set(dictionary_columns(spec)) == {"channel", "country", "mcc"}
    frame = base_frame.iloc[:600].copy()
    frame.loc[frame.index[0:5], "channel"] = None
    frame.loc[frame.index[5:10], "channel"] = "telepathy"
    frame.loc[frame.index[10:15], "country"] = "XX"
    (part,) = write_parts(frame, tmp_path / "in", 1, row_group_size=250)
    engine = load_engine(make_job(bundle_dir, tmp_path / "out"), threads=1)
    roles = scoring_roles(spec)
    read = engine.read(Path(part.path), "parquet", roles.columns, roles)
    assert isinstance(read["channel"].dtype, pd.CategoricalDtype)
    got = transform_raw(raw_columns(read, spec.raw_columns), bundle.spec_dict, bundle.lookups)
    plain = pd.read_parquet(part.path)
    want = bundle.features(frame_to_raw(plain, spec.raw_columns))
    np.testing.assert_array_equal(got, want)


def test_csv_partitions_score_like_parquet(
    bundle_dir: Path, bundle: LoadedBundle, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    frame = base_frame.iloc[:300]
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "p.csv"
    frame.to_csv(path, index=False)
    (entry,) = score(make_job(bundle_dir, tmp_path / "out"), [partition_of(path)])
    assert entry.status == "scored"
    np.testing.assert_allclose(
        outputs(tmp_path / "out")["score"], expected_scores(bundle, frame).to_numpy(), atol=1e-6
    )


def test_csv_with_text_in_a_number_column_past_its_sample_is_quarantined_with_its_rows(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    """The column's type shows only when the whole file is read (the schema check samples the
    first rows): the file is quarantined with the reason, and its rows are accounted as
    quarantined (they were counted as 0)."""
    frame = base_frame.iloc[:1500].copy()
    frame["amount"] = frame["amount"].astype(object)
    frame.loc[frame.index[1400], "amount"] = "twelve"
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "p.csv"
    frame.to_csv(path, index=False)
    (entry,) = score(make_job(bundle_dir, tmp_path / "out"), [partition_of(path)])
    assert entry.status == "quarantined"
    assert "'amount'" in entry.reason and "numeric" in entry.reason
    assert (entry.rows_in, entry.rows_scored, entry.rows_quarantined) == (1500, 0, 1500)


def test_empty_partition_is_scored_with_an_empty_output(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    (part,) = write_parts(base_frame.iloc[:0], tmp_path / "in", 1)
    (entry,) = score(make_job(bundle_dir, tmp_path / "out"), [part])
    assert (entry.status, entry.rows_in, entry.rows_scored) == ("scored", 0, 0)
    assert len(pd.read_parquet(tmp_path / "out" / str(entry.output))) == 0


def test_resume_keeps_committed_files_and_redoes_uncommitted_ones(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    parts = write_parts(base_frame, tmp_path / "in", 3)
    out = tmp_path / "out"
    job = make_job(bundle_dir, out)
    first = score(job, parts)
    # a crash after the rename of file 0 but before its manifest entry
    (out / MANIFEST_DIR / entry_file_name(parts[0].path)).unlink()
    again = score(job, parts)
    assert again[1:] == first[1:]  # committed: returned from the manifest, not rescored
    assert again[0].output == first[0].output and again[0].finished_at >= first[0].finished_at
    assert len(list(out.glob("*.parquet"))) == 3
    got = outputs(out)
    assert got["transaction_id"].is_unique and len(got) == len(base_frame)


def test_new_model_version_replaces_the_previous_output(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    parts = write_parts(base_frame, tmp_path / "in", 2)
    out = tmp_path / "out"
    score(make_job(bundle_dir, out, model_version=1), parts)
    entries = score(make_job(bundle_dir, out, model_version=2), parts)
    assert all(e.model_version == 2 for e in entries)
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(str(e.output) for e in entries)
    got = outputs(out)
    assert set(got["model_version"]) == {2} and len(got) == len(base_frame)


class _FailingEngine:
    """Delegates to a real engine but fails scoring on the n-th chunk."""

    def __init__(self, engine: Any, fail_on: int) -> None:
        self.engine = engine
        self.fail_on = fail_on
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def score(self, frame: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_on:
            raise ValueError("could not convert string to float: 'abc'")
        return self.engine.score(frame)


def test_a_chunk_that_cannot_be_scored_quarantines_the_whole_file(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    parts = write_parts(base_frame.iloc[:3000], tmp_path / "in", 2)
    out = tmp_path / "out"
    job = make_job(bundle_dir, out, partition_rows=500)
    engine = _FailingEngine(load_engine(job, threads=1), fail_on=2)
    first, second = score_partitions(engine, job, parts)  # type: ignore[arg-type]
    assert first.status == "quarantined" and "ValueError" in str(first.reason)
    assert first.rows_quarantined == 1500
    assert second.status == "scored" and second.rows_scored == 1500
    assert [p.name for p in out.glob("*.parquet")] == [second.output]
    assert hidden_files(out) == []


# ---------------------------------------------------------------- batch mode


class _Recording:
    """A real engine that records which files each read and batch write covered."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.calls: list[tuple[str, list[str]]] = []
        self.read_delay = 0.0
        self.reading = self.most_reading = 0  # batch reads in progress; the most at once
        self.read_threads: set[str] = set()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def read(self, path: Path, *args: Any) -> Any:
        self.calls.append(("read", [path.name]))
        return self.engine.read(path, *args)

    def read_chunks(self, path: Path, *args: Any) -> Any:
        self.calls.append(("read_chunks", [path.name]))
        return self.engine.read_chunks(path, *args)

    def read_many(self, paths: list[Path], columns: list[str]) -> Any:
        self.calls.append(("read_many", [p.name for p in paths]))
        with self._lock:
            self.reading += 1
            self.most_reading = max(self.most_reading, self.reading)
            self.read_threads.add(threading.current_thread().name)
        try:
            time.sleep(self.read_delay)  # reads long enough to overlap, where they can
            return self.engine.read_many(paths, columns)
        finally:
            with self._lock:
                self.reading -= 1

    def write_batch(self, table: Any, offsets: Any, paths: list[Path], fmt: OutputFormat) -> None:
        self.calls.append(("write_batch", [str(b - a) for a, b in pairwise(offsets)]))
        self.engine.write_batch(table, offsets, paths, fmt)

    def of(self, kind: str) -> list[list[str]]:
        return [names for k, names in self.calls if k == kind]


def write_sized(
    frame: pd.DataFrame, directory: Path, sizes: list[int], **kw: Any
) -> list[InputPartition]:
    """Consecutive rows of `frame` in parquet files part-0, part-1, ... of the given sizes."""
    directory.mkdir(parents=True, exist_ok=True)
    parts, start = [], 0
    for i, n in enumerate(sizes):
        path = directory / f"part-{i}.parquet"
        frame.iloc[start : start + n].to_parquet(path, index=False, **kw)
        parts.append(partition_of(path))
        start += n
    return parts


def score_batched(job: ScoringJob, parts: list[InputPartition]) -> tuple[list[Any], _Recording]:
    engine = _Recording(load_engine(job, threads=1))
    return score_partitions(engine, job, parts), engine  # type: ignore[arg-type]


def assert_same_results(
    entries: list[ManifestEntry], out: Path, want: list[ManifestEntry], want_out: Path
) -> None:
    """Per input file: the same manifest entry (but timings) and the same predictions file."""
    volatile = {"seconds", "finished_at", "run_id", "worker"}
    assert [e.input for e in entries] == [e.input for e in want]
    for got, expected in zip(entries, want, strict=True):
        assert got.model_dump(exclude=volatile) == expected.model_dump(exclude=volatile)
        if got.output is not None:
            assert read_entry(out, got.input) == got
            a, b = pq.read_table(out / got.output), pq.read_table(want_out / got.output)
            assert a.schema == b.schema
            pd.testing.assert_frame_equal(a.to_pandas(), b.to_pandas(), check_exact=True)
    totals = RunTotals()
    for e in entries:
        totals.add(e)
    assert totals.accounting_holds
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(
        str(e.output) for e in entries if e.output
    )
    assert hidden_files(out) == []


def test_batches_are_read_on_a_bounded_pool_of_named_threads(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    """`batch_read_threads` batches read at once, never more, on threads named after the
    pipeline's caller (their CUDA streams on a GPU); one reader reads on the read-ahead thread."""
    parts = write_parts(base_frame, tmp_path / "in", 6)
    want = score(make_job(bundle_dir, tmp_path / "one"), parts)
    for threads in (1, 2, 3):
        out = tmp_path / f"batched-{threads}"
        job = make_job(bundle_dir, out, batch_rows=1000, batch_read_threads=threads)
        assert job.batch_readers == threads
        engine = _Recording(load_engine(job, threads=1))
        engine.read_delay = 0.2
        entries = score_partitions(engine, job, parts)  # type: ignore[arg-type]
        assert_same_results(entries, out, want, tmp_path / "one")
        assert engine.most_reading == threads
        caller = threading.current_thread().name
        if threads == 1:
            assert engine.read_threads == {f"gpupipe-read-ahead[{caller}]"}
        else:
            assert engine.read_threads == {f"gpupipe-read[{caller}]_{i}" for i in range(threads)}


CODEC_NAMES = {"snappy": "SNAPPY", "lz4": "LZ4", "zstd": "ZSTD", "none": "UNCOMPRESSED"}


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
@pytest.mark.parametrize("batch_rows", [0, 10**9])  # a file at a time (streamed); batches
def test_output_compression_sets_the_codec_not_the_contents(
    codec: str, batch_rows: int, bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    parts = write_parts(base_frame, tmp_path / "in", 3)
    want = score(make_job(bundle_dir, tmp_path / "snappy", batch_rows=batch_rows), parts)
    out = tmp_path / codec
    job = make_job(bundle_dir, out, batch_rows=batch_rows, output_compression=codec)
    got = score(job, parts)
    assert_same_results(got, out, want, tmp_path / "snappy")
    for entry in got:
        meta = pq.read_metadata(out / str(entry.output))
        codecs = {meta.row_group(0).column(i).compression for i in range(meta.num_columns)}
        assert codecs == {CODEC_NAMES[codec]}
        before = pq.read_metadata(tmp_path / "snappy" / str(entry.output))
        assert before.row_group(0).column(0).compression == "SNAPPY"  # the default


def column_encodings(path: Path, column: str) -> set[str]:
    """Every encoding of `column`'s chunks in a parquet file, as its metadata lists them."""
    meta = pq.read_metadata(path)
    index = meta.schema.names.index(column)
    return {
        encoding
        for g in range(meta.num_row_groups)
        for encoding in meta.row_group(g).column(index).encodings
    }


def assert_id_encoding(out: Path, entries: list[ManifestEntry], id_encoding: str) -> None:
    """The id column of every predictions file DELTA_BINARY_PACKED (delta) or not (plain); no
    other column delta-encoded either way."""
    for entry in entries:
        path = out / str(entry.output)
        delta = "DELTA_BINARY_PACKED" in column_encodings(path, "transaction_id")
        assert delta == (id_encoding == "delta"), (path, column_encodings(path, "transaction_id"))
        for column in pq.read_schema(path).names:
            if column != "transaction_id":
                assert "DELTA_BINARY_PACKED" not in column_encodings(path, column), column


@pytest.mark.parametrize("batch_rows", [0, 10**9])  # a file at a time (streamed); batches
def test_int64_ids_are_written_delta_encoded_unless_plain_is_asked(
    batch_rows: int, bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    """Delta by default: same rows and scores as plain, in smaller files; plain on request."""
    parts = write_parts(base_frame, tmp_path / "in", 3)
    plain_out = tmp_path / "plain"
    plain_job = make_job(bundle_dir, plain_out, batch_rows=batch_rows, output_id_encoding="plain")
    plain = score(plain_job, parts)
    assert_id_encoding(plain_out, plain, "plain")
    out = tmp_path / "delta"
    got = score(make_job(bundle_dir, out, batch_rows=batch_rows), parts)
    assert_same_results(got, out, plain, plain_out)
    assert_id_encoding(out, got, "delta")
    for g, p in zip(got, plain, strict=True):
        assert (out / str(g.output)).stat().st_size < (plain_out / str(p.output)).stat().st_size


def test_output_format_delta_encodes_only_int64_ids() -> None:
    """The writer options of each writer: only an int64 id column is delta-encoded, and only
    when asked; the codec and the dictionary columns are the same either way."""
    delta, plain = OutputFormat("zstd", "delta"), OutputFormat("zstd", "plain")
    want = {"id": "DELTA_BINARY_PACKED"}
    assert delta.arrow_options("id", pa.int64())["column_encoding"] == want
    assert delta.cudf_options("id", np.dtype(np.int64)) == {
        "compression": "ZSTD", "column_encoding": want
    }  # fmt: skip
    for id_type, id_dtype in [(pa.int32(), np.int32), (pa.string(), object), (pa.float64(), float)]:
        assert "column_encoding" not in delta.arrow_options("id", id_type)
        assert delta.cudf_options("id", np.dtype(id_dtype)) == {"compression": "ZSTD"}
    assert "column_encoding" not in plain.arrow_options("id", pa.int64())
    assert plain.cudf_options("id", np.dtype(np.int64)) == {"compression": "ZSTD"}
    for fmt in (delta, plain):
        options = fmt.arrow_options("id", pa.int64())
        assert options["compression"] == "zstd"
        assert "id" not in options["use_dictionary"]
    assert OutputFormat("none").cudf_compression is None


class _FailingScores:
    """Delegates to a real engine but fails the second batch's scoring with a bug (not a data
    error), which ends the pipeline."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.batches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def score_batch(self, frame: Any, offsets: Any) -> Any:
        self.batches += 1
        if self.batches == 2:
            raise RuntimeError("a bug in scoring")
        return self.engine.score_batch(frame, offsets)


def test_a_failing_pipeline_stops_its_reading_threads(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    parts = write_parts(base_frame, tmp_path / "in", 6)
    job = make_job(bundle_dir, tmp_path / "out", batch_rows=1000, batch_read_threads=2)
    engine = _FailingScores(load_engine(job, threads=1))
    with pytest.raises(RuntimeError, match="a bug in scoring"):
        score_partitions(engine, job, parts)  # type: ignore[arg-type]
    caller = threading.current_thread().name
    left = [t.name for t in threading.enumerate() if t.name.endswith(f"[{caller}]")]
    left += [t.name for t in threading.enumerate() if f"[{caller}]_" in t.name]
    assert left == []  # the read-ahead thread and the pool of readers are gone
    assert hidden_files(tmp_path / "out") == []


def test_batch_readers_default_to_several_on_gpu_only(tmp_path: Path) -> None:
    assert make_job(tmp_path, tmp_path).batch_readers == 1
    assert make_job(tmp_path, tmp_path, device="gpu").batch_readers == GPU_BATCH_READ_THREADS
    assert make_job(tmp_path, tmp_path, device="gpu", batch_read_threads=1).batch_readers == 1


@pytest.mark.parametrize("read_threads", [1, 2])
@pytest.mark.parametrize(
    ("batch_rows", "files_per_read"), [(1500, [2, 2, 2]), (2500, [3, 3]), (10**9, [6])]
)
def test_batches_score_every_row_once_as_file_by_file(
    read_threads: int,
    batch_rows: int,
    files_per_read: list[int],
    bundle_dir: Path,
    base_frame: pd.DataFrame,
    tmp_path: Path,
) -> None:
    """Batches of 2, 3 and all 6 files of 1,000 rows, read one or two at once: one read and one
    write per batch, and per file the same predictions file and manifest entry as scoring one
    file at a time."""
    parts = write_parts(base_frame, tmp_path / "in", 6)
    want = score(make_job(bundle_dir, tmp_path / "one"), parts)
    out = tmp_path / "batched"
    job = make_job(bundle_dir, out, batch_rows=batch_rows, batch_read_threads=read_threads)
    entries, engine = score_batched(job, parts)
    assert_same_results(entries, out, want, tmp_path / "one")
    assert [e.status for e in entries] == ["scored"] * 6
    assert sum(e.rows_scored for e in entries) == len(base_frame)
    names = [Path(p.path).name for p in parts]
    reads = sorted(engine.of("read_many"))  # started in order; recorded as threads start them
    assert sorted(len(r) for r in reads) == sorted(files_per_read)
    assert [name for r in reads for name in r] == names  # each file once
    assert [len(w) for w in engine.of("write_batch")] == files_per_read
    assert engine.of("read") == [] and engine.of("read_chunks") == []


MIXED_KINDS = ["good", "unreadable", "good", "missing column", "duplicate ids", "good",
               "mistyped column", "all-null id", "empty", "good"]  # fmt: skip


def write_kinds(frame: pd.DataFrame, directory: Path, kinds: list[str]) -> list[InputPartition]:
    """Files <i>-<kind>.parquet of 750 consecutive rows each: good, empty or one kind of bad."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = (frame.iloc[i : i + 750] for i in range(0, len(frame), 750))
    parts = []
    for i, kind in enumerate(kinds):
        path = directory / f"{i}-{kind.replace(' ', '-')}.parquet"
        if kind == "good":
            next(rows).to_parquet(path, index=False)
        elif kind == "empty":
            frame.iloc[:0].to_parquet(path, index=False)
        else:
            _bad(kind, frame if kind == "unreadable" else next(rows), path)
        parts.append(partition_of(path))
    return parts


@pytest.mark.parametrize("read_threads", [1, 3])
def test_bad_files_in_a_batch_are_quarantined_as_file_by_file(
    read_threads: int, bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    """Every kind of bad file among good ones in one batch: exactly the bad files quarantined,
    with the reasons scoring one file at a time gives, and the good files of the batch scored."""
    parts = write_kinds(base_frame, tmp_path / "in", MIXED_KINDS)
    want = score(make_job(bundle_dir, tmp_path / "one"), parts)
    out = tmp_path / "batched"
    job = make_job(bundle_dir, out, batch_rows=10**9, batch_read_threads=read_threads)
    entries, engine = score_batched(job, parts)
    assert_same_results(entries, out, want, tmp_path / "one")
    status = {Path(e.input).name.split("-", 1)[1]: e.status for e in entries}
    bad = {"unreadable", "missing-column", "duplicate-ids", "mistyped-column", "all-null-id"}
    assert {k for k, v in status.items() if v == "quarantined"} == {f"{b}.parquet" for b in bad}
    assert sum(e.rows_scored for e in entries) == 4 * 750
    # the good files before the float ids of the all-null file were read with the duplicates;
    # the empty file is read on its own (and scored, with an empty output, as before)
    assert engine.of("read_many") == [  # the empty file below waits for the batches before it
        ["0-good.parquet", "2-good.parquet", "4-duplicate-ids.parquet", "5-good.parquet"],
        ["7-all-null-id.parquet"],
        ["9-good.parquet"],
    ]
    assert engine.of("read") == [["8-empty.parquet"]]
    assert [len(w) for w in engine.of("write_batch")] == [1]  # the last good file's batch


def test_ids_may_repeat_across_the_files_of_a_batch(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    frame = base_frame.iloc[:1000]
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        frame.to_parquet(tmp_path / "in" / f"{name}.parquet", index=False)
    parts = [partition_of(tmp_path / "in" / f"{name}.parquet") for name in ("a", "b")]
    want = score(make_job(bundle_dir, tmp_path / "one"), parts)
    out = tmp_path / "batched"
    entries, engine = score_batched(make_job(bundle_dir, out, batch_rows=10**9), parts)
    assert [e.status for e in entries] == ["scored", "scored"]
    assert engine.of("read_many") == [["a.parquet", "b.parquet"]]
    assert engine.of("write_batch") == [["1000", "1000"]]  # still one batch
    assert_same_results(entries, out, want, tmp_path / "one")


def test_integer_ids_with_nulls_are_read_file_by_file(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    """pandas reads integer ids with nulls as floats: in one frame with other files they would
    make those files' ids floats too, so such a batch is read again file by file."""
    parts = write_sized(base_frame, tmp_path / "in", [1000, 1000, 1000])
    with_nulls = pq.read_table(parts[1].path)
    ids = with_nulls.column("transaction_id").to_pylist()
    ids[0] = ids[5] = ids[9] = None  # missing ids are scored; they are not repeats of each other
    pq.write_table(
        with_nulls.set_column(0, "transaction_id", pa.array(ids, pa.int64())), parts[1].path
    )
    parts[1] = partition_of(Path(parts[1].path))
    want = score(make_job(bundle_dir, tmp_path / "one"), parts)
    out = tmp_path / "batched"
    entries, engine = score_batched(make_job(bundle_dir, out, batch_rows=10**9), parts)
    assert_same_results(entries, out, want, tmp_path / "one")
    assert [e.status for e in entries] == ["scored"] * 3
    assert engine.of("read_many") == [["part-0.parquet", "part-1.parquet", "part-2.parquet"]]
    assert engine.of("read") == [["part-0.parquet"], ["part-1.parquet"], ["part-2.parquet"]]
    ids_type = [pq.read_schema(out / str(e.output)).field("transaction_id").type for e in entries]
    assert ids_type == [pa.int64()] * 3  # integers, missing ones as nulls


def test_large_and_csv_files_among_batches_stream_in_order(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    parts = write_sized(base_frame, tmp_path / "in", [1000, 1000, 2000, 1000], row_group_size=500)
    csv = tmp_path / "in" / "part-4.csv"
    base_frame.iloc[5000:5500].to_csv(csv, index=False)
    parts.append(partition_of(csv))
    parts += write_sized(base_frame.iloc[5500:], tmp_path / "in2", [500])
    want = score(make_job(bundle_dir, tmp_path / "one", partition_rows=1500), parts)
    out = tmp_path / "batched"
    # two reading threads: each file read alone still waits for the batch before it
    job = make_job(bundle_dir, out, partition_rows=1500, batch_rows=10**9, batch_read_threads=2)
    entries, engine = score_batched(job, parts)
    assert_same_results(entries, out, want, tmp_path / "one")
    assert [e.rows_scored for e in entries] == [1000, 1000, 2000, 1000, 500, 500]
    reads = [call for call in engine.calls if call[0] != "write_batch"]
    assert reads == [
        ("read_many", ["part-0.parquet", "part-1.parquet"]),
        ("read", ["part-2.parquet"]),  # its ids, checked before streaming
        ("read_chunks", ["part-2.parquet"]),
        ("read_many", ["part-3.parquet"]),
        ("read", ["part-4.csv"]),
        ("read_many", ["part-0.parquet"]),  # in2/part-0
    ]
    large = out / str(entries[2].output)
    assert pq.ParquetFile(large).metadata.num_row_groups == 2


def test_batch_rerun_skips_committed_files_and_redoes_the_rest(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    parts = write_parts(base_frame, tmp_path / "in", 4)
    out = tmp_path / "out"
    job = make_job(bundle_dir, out, batch_rows=10**9)
    first, _ = score_batched(job, parts)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again, engine = score_batched(job, parts)
    assert again == first and engine.calls == []
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == mtimes
    # a crash after the rename of file 2 but before its manifest entry
    (out / MANIFEST_DIR / entry_file_name(parts[2].path)).unlink()
    redone, engine = score_batched(job, parts)
    assert engine.of("read_many") == [[Path(parts[2].path).name]]
    assert redone[:2] == first[:2] and redone[3] == first[3]
    assert redone[2].output == first[2].output
    got = outputs(out)
    assert got["transaction_id"].is_unique and len(got) == len(base_frame)


def test_a_file_whose_values_break_batch_scoring_is_quarantined_alone(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    """Timestamps stored as text pass the schema check; one file's unparsable text fails the
    batch's transform, which is then scored file by file."""
    frame = base_frame.iloc[:3000].copy()
    frame["timestamp"] = frame["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S")
    frame.loc[frame.index[1500], "timestamp"] = "yesterday"
    parts = write_sized(frame, tmp_path / "in", [1000, 1000, 1000])
    want = score(make_job(bundle_dir, tmp_path / "one"), parts)
    out = tmp_path / "batched"
    entries, engine = score_batched(make_job(bundle_dir, out, batch_rows=10**9), parts)
    assert_same_results(entries, out, want, tmp_path / "one")
    assert [e.status for e in entries] == ["scored", "quarantined", "scored"]
    assert "ValueError" in str(entries[1].reason)
    assert engine.of("read_many") == [[Path(p.path).name for p in parts]]
    assert engine.of("write_batch") == []  # the other two were written as single files


class _FailingWrites:
    """Delegates to a real engine but fails every batch write with `exc`."""

    def __init__(self, engine: Any, exc: BaseException) -> None:
        self.engine = engine
        self.exc = exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def write_batch(self, table: Any, offsets: Any, paths: list[Path], fmt: OutputFormat) -> None:
        pq.write_table(table.slice(0, 1), paths[0])  # a partial write, then the failure
        raise self.exc


def test_a_failed_batch_write_quarantines_or_fails_and_leaves_no_temp_files(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    parts = write_parts(base_frame, tmp_path / "in", 3)
    job = make_job(bundle_dir, tmp_path / "data-error", batch_rows=10**9)
    engine = _FailingWrites(load_engine(job, threads=1), ValueError("cannot encode"))
    entries = score_partitions(engine, job, parts)  # type: ignore[arg-type]
    assert [e.status for e in entries] == ["quarantined"] * 3
    assert all("ValueError: cannot encode" in str(e.reason) for e in entries)
    assert sum(e.rows_quarantined for e in entries) == len(base_frame)
    assert list((tmp_path / "data-error").glob("*.parquet")) == []
    assert hidden_files(tmp_path / "data-error") == []
    job = make_job(bundle_dir, tmp_path / "os-error", batch_rows=10**9)
    engine = _FailingWrites(load_engine(job, threads=1), OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        score_partitions(engine, job, parts)  # type: ignore[arg-type]
    assert hidden_files(tmp_path / "os-error") == []
    assert read_manifest(tmp_path / "os-error", [p.path for p in parts]) == {}


# ---------------------------------------------------------------- the device transform's logic


def test_device_transform_logic_matches_numpy_features_on_host(
    bundle: LoadedBundle, base_frame: pd.DataFrame
) -> None:
    """gpu_features run with pandas + NumPy must compute what numpy_features computes."""
    from tasks.gpu_features import DeviceTransform

    frame = base_frame.iloc[:1000].copy()
    frame.loc[frame.index[:10], "amount"] = np.nan
    frame.loc[frame.index[10:20], "channel"] = None
    frame.loc[frame.index[20:30], "channel"] = "telepathy"
    frame.loc[frame.index[30:40], "card_id"] = 10**12
    frame.loc[frame.index[40:50], "timestamp"] = pd.NaT
    frame.loc[frame.index[50:60], "mcc"] = 9999
    transform = DeviceTransform(bundle.spec_dict, bundle.lookups, np)
    got = transform.matrix(frame)
    want = bundle.features(frame_to_raw(frame, bundle.spec.raw_columns))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert transform.raw_columns == bundle.spec.raw_columns
    # string categories read dictionary-encoded (the GPU arrow reader) give the same matrix
    encoded = frame.astype({c: "category" for c in bundle.spec.raw_categorical})
    np.testing.assert_array_equal(transform.matrix(encoded), got)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
@pytest.mark.parametrize(("batch_rows", "files_per_read"), [(0, [3, 2]), (1500, [2, 1, 2])])
@pytest.mark.parametrize(("gpu_io", "gpu_streams"), GPU_IO_SETTINGS)
def test_gpu_engine_matches_cpu_engine(
    gpu_io: str,
    gpu_streams: bool,
    batch_rows: int,
    files_per_read: list[int],
    bundle_dir: Path,
    base_frame: pd.DataFrame,
    tmp_path: Path,
) -> None:
    """Files batched (0: GPU_BATCH_ROWS; 1500: up to two files) around one too large for a
    batch, streamed in chunks of 1,500 rows."""
    sizes = [1000, 1000, 1000, 2000, 500, 500]
    parts = write_sized(base_frame, tmp_path / "in", sizes, row_group_size=500)
    cpu = score(make_job(bundle_dir, tmp_path / "cpu"), parts)
    gpu_job = make_job(
        bundle_dir, tmp_path / "gpu", device="gpu", partition_rows=1500, gpu_io=gpu_io,
        gpu_streams=gpu_streams, batch_rows=batch_rows,
    )  # fmt: skip
    gpu, engine = score_batched(gpu_job, parts)
    assert [len(r) for r in engine.of("read_many")] == files_per_read
    assert [len(w) for w in engine.of("write_batch")] == files_per_read
    assert engine.of("read_chunks") == [["part-3.parquet"]]
    assert [e.rows_scored for e in gpu] == [e.rows_scored for e in cpu] == sizes
    assert sorted(p.name for p in (tmp_path / "gpu").glob("*.parquet")) == sorted(
        str(e.output) for e in gpu
    )
    assert hidden_files(tmp_path / "gpu") == []
    a, b = outputs(tmp_path / "cpu"), outputs(tmp_path / "gpu")
    np.testing.assert_array_equal(a["transaction_id"], b["transaction_id"])
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
    for ec, eg in zip(cpu, gpu, strict=True):
        assert (
            ec.score_counts == eg.score_counts
            or np.abs(np.subtract(ec.score_counts, eg.score_counts)).sum() <= 2
        )


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
@pytest.mark.parametrize(("gpu_io", "gpu_streams"), GPU_IO_SETTINGS)
def test_gpu_batches_quarantine_bad_files_as_the_cpu_does(
    gpu_io: str, gpu_streams: bool, bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> None:
    kinds = [k for k in MIXED_KINDS if k != "empty"]
    parts = write_kinds(base_frame, tmp_path / "in", kinds)
    want = score(make_job(bundle_dir, tmp_path / "cpu"), parts)
    job = make_job(
        bundle_dir, tmp_path / "gpu", device="gpu", gpu_io=gpu_io, gpu_streams=gpu_streams
    )
    got, engine = score_batched(job, parts)
    assert engine.of("read_many")[0] == [
        "0-good.parquet", "2-good.parquet", "4-duplicate-ids.parquet", "5-good.parquet"
    ]  # fmt: skip
    summary = [(e.status, e.rows_in, e.rows_scored, e.rows_quarantined) for e in got]
    assert summary == [(e.status, e.rows_in, e.rows_scored, e.rows_quarantined) for e in want]
    for g, w in zip(got, want, strict=True):  # the example duplicate id is printed per device
        assert str(g.reason).split(" (e.g.")[0] == str(w.reason).split(" (e.g.")[0]
    a, b = outputs(tmp_path / "cpu"), outputs(tmp_path / "gpu")
    np.testing.assert_array_equal(a["transaction_id"], b["transaction_id"])
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
    assert hidden_files(tmp_path / "gpu") == []


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
@pytest.mark.parametrize(("gpu_io", "gpu_streams"), GPU_IO_SETTINGS)
@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
def test_gpu_output_compression_sets_the_codec(
    codec: str,
    gpu_io: str,
    gpu_streams: bool,
    bundle_dir: Path,
    base_frame: pd.DataFrame,
    tmp_path: Path,
) -> None:
    """Each codec through each GPU writer (batches, and a file streamed in chunks): the codec
    in every column chunk, the rows and scores of the CPU's snappy files."""
    out = tmp_path / "gpu"
    job = make_job(
        bundle_dir, out, device="gpu", gpu_io=gpu_io, gpu_streams=gpu_streams,
        partition_rows=1500, output_compression=codec,
    )  # fmt: skip
    got = score_on_gpu_like_cpu(job, bundle_dir, base_frame, tmp_path)
    for entry in got:
        meta = pq.read_metadata(out / str(entry.output))
        codecs = {
            meta.row_group(g).column(i).compression
            for g in range(meta.num_row_groups)
            for i in range(meta.num_columns)
        }
        # libcudf stores a chunk uncompressed where the codec would not shrink it
        assert CODEC_NAMES[codec] in codecs and codecs <= {CODEC_NAMES[codec], "UNCOMPRESSED"}


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
@pytest.mark.parametrize(("gpu_io", "gpu_streams"), GPU_IO_SETTINGS)
@pytest.mark.parametrize("id_encoding", ["delta", "plain"])
def test_gpu_output_id_encoding(
    id_encoding: str,
    gpu_io: str,
    gpu_streams: bool,
    bundle_dir: Path,
    base_frame: pd.DataFrame,
    tmp_path: Path,
) -> None:
    """Each GPU writer (batches, and a file streamed in chunks) stores int64 ids as asked, with
    the rows and scores of the CPU's files."""
    out = tmp_path / "gpu"
    job = make_job(
        bundle_dir, out, device="gpu", gpu_io=gpu_io, gpu_streams=gpu_streams,
        partition_rows=1500, output_id_encoding=id_encoding,
    )  # fmt: skip
    got = score_on_gpu_like_cpu(job, bundle_dir, base_frame, tmp_path)
    assert_id_encoding(out, got, id_encoding)


def score_on_gpu_like_cpu(
    job: ScoringJob, bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path
) -> list[ManifestEntry]:
    """Three files (one larger than the jobs' 1,500 partition rows: streamed in chunks) scored
    by the GPU `job` and by the CPU with default settings: the same rows, ids and scores (atol
    1e-5). The GPU job's manifest entries."""
    parts = write_sized(base_frame, tmp_path / "in", [1000, 1000, 2000], row_group_size=500)
    want = score(make_job(bundle_dir, tmp_path / "cpu", partition_rows=1500), parts)
    got = score(job, parts)
    assert [e.rows_scored for e in got] == [e.rows_scored for e in want]
    a, b = outputs(tmp_path / "cpu"), outputs(Path(job.output_dir))
    np.testing.assert_array_equal(a["transaction_id"], b["transaction_id"])
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
    return got


# ---------------------------------------------------------------- cluster helpers


def test_cluster_address_and_worker_cache() -> None:
    from tasks import cluster
    from tasks.config import ClusterConfig

    assert cluster.cluster_address("local", ClusterConfig()) is None
    assert cluster.cluster_address("", ClusterConfig(address="tcp://cfg:8786")) == "tcp://cfg:8786"
    assert cluster.cluster_address(" tcp://h:8786 ", ClusterConfig()) == "tcp://h:8786"
    cluster.clear_cache()
    built: list[int] = []

    def factory(i: int) -> Any:
        built.append(i)
        return object()

    first = cluster.worker_cached(("k", 0), lambda: factory(0))
    assert cluster.worker_cached(("k", 0), lambda: factory(0)) is first
    for i in range(1, cluster.CACHE_SIZE + 1):
        cluster.worker_cached(("k", i), lambda i=i: factory(i))
    assert cluster.worker_cached(("k", 0), lambda: factory(0)) is not first  # evicted (LRU)
    assert built == [0, *range(1, cluster.CACHE_SIZE + 1), 0]
    assert cluster.cache_loads()[repr(("k", 0))] == 2
    cluster.clear_cache()


def test_local_cpu_workers_keep_glibc_malloc_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dask's MALLOC_TRIM_THRESHOLD_ (which disables glibc's adaptive mmap threshold and slowed
    the CPU transform) is not passed to the workers of a CPU cluster made for one run."""
    from tasks.cluster import dask_client
    from tasks.config import ClusterConfig

    # an earlier default LocalCluster in this process may have exported it to os.environ
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with dask_client(ClusterConfig(n_workers=1), resolve_backend("cpu")) as client:
        found = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        omp = client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
    assert list(found.values()) == [None]
    assert list(omp.values()) == ["1"]  # the other pre-spawn settings stay


def test_gpu_worker_pre_imports_exist_and_match_the_readme() -> None:
    """Every module a GPU worker pre-imports can be found, and the README's `dask cuda worker`
    line lists the same modules."""
    import importlib.util
    import re

    from tasks.cluster import GPU_WORKER_PRE_IMPORT

    ours = [m for m in GPU_WORKER_PRE_IMPORT if m.split(".")[0] in ("tasks", "kernels")]
    assert ours and all(importlib.util.find_spec(m) is not None for m in ours)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (listed,) = re.findall(r"--pre-import (\S+)", readme)
    assert tuple(listed.split(",")) == GPU_WORKER_PRE_IMPORT


def test_each_footer_is_read_once_when_files_are_read_ahead(
    bundle_dir: Path, base_frame: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files read ahead on pool threads: the size check and the schema checks share one footer
    read per file."""
    from collections import Counter

    from tasks import scoring

    parts = write_parts(base_frame, tmp_path / "in", 4)
    reads: Counter[str] = Counter()

    def counted(real: Any) -> Any:
        def counting(path: Path, *args: Any) -> Any:
            reads[Path(path).name] += 1
            return real(path, *args)

        return counting

    # every footer read in scoring goes through one of these two
    for name in ("read_footer", "count_rows"):
        monkeypatch.setattr(scoring, name, counted(getattr(scoring, name)))
    entries = score(make_job(bundle_dir, tmp_path / "out", io_threads=2), parts)
    assert [e.status for e in entries] == ["scored"] * 4
    assert sum(e.rows_scored for e in entries) == len(base_frame)
    assert reads == {f"part-{i}.parquet": 1 for i in range(4)}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([3, 1, 2], True),
        ([3, 1, 3], False),
        ([3.0, float("nan"), 2.0], False),  # NaN: missing, as isna says
        (["a", None, "b"], False),
        (["a", "b", "a"], False),
        ([], True),
    ],
)
def test_column_is_key(values: list[Any], expected: bool) -> None:
    from tasks.scoring import column_is_key

    assert column_is_key(pd.Series(values, dtype=None if values else "int64")) is expected
