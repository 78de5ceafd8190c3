"""Batch scoring: raw input partitions -> one predictions parquet each, exactly once per input file
and model version, with a manifest, quarantine of bad partitions and run accounting.

An input partition is one input file. Its predictions file is named after the file's fingerprint
and the model version, and is written to a temporary name then renamed; its manifest entry is
written after the rename. So a task that dask re-executes after a worker died rewrites the same
file, and a crash between rename and manifest leaves a file that the next run redoes: no row is
lost or scored twice. A file larger than `partition_rows` is read, scored and written in chunks of
that many rows, so worker memory stays bounded.

Layout of the output directory:
    <stem>-<input fingerprint>-<model>-v<version>.parquet   id, score, label, model_name, model_version
    _manifest/<stem>-<path hash>.json                        one entry per input file
    _manifest/runs/<time>-<run id>.json, _manifest/last_run.json   run summaries
    _models/<model>/<version>/                               the bundle the workers load

Workers score a group of files in a three-stage pipeline (read ahead, score, write behind) so that
reading, predicting and writing overlap. On GPU the data stays on the device from the parquet read
to the prediction (cuDF -> `tasks.gpu_features` -> XGBoost on CuPy).

In batch mode (`ScoringJob.rows_per_batch`, on by default on GPU) consecutive whole files are read
with one engine call, scored as one frame and written with one engine call, each file still to its
own predictions file and manifest entry: on a GPU the fixed cost of each read, transform and write
call, not the rows, dominates for files of a million rows.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from tasks.bundle import LoadedBundle, OnnxScorer, ScorerKind, XGBoostScorer
from tasks.cluster import (
    thread_count,
    worker_cached,
    worker_count,
    worker_name,
    worker_threads,
)
from tasks.config import (
    OUTPUT_COMPRESSION,
    ClusterConfig,
    OutputCompression,
    OutputIdEncoding,
    PipelineConfig,
)
from tasks.drift import (
    Counts,
    array_module_of,
    drift_level,
    feature_psi,
    histogram_counts_segments,
    matrix_bin_counts_segments,
    merge_counts,
)
from tasks.frames import DELTA_ENCODING, is_int64_dtype
from tasks.io import (
    ColumnRoles,
    DataError,
    TableFormat,
    coerce_timestamps,
    count_rows,
    discover_files,
    dtype_problems,
    files_fingerprint,
    nested_tables_hint,
    peek_schema,
    read_footer,
    read_table,
    table_format,
    value_problems,
)
from tasks.numpy_features import DictionaryColumn, RawColumn, transform_raw
from tasks.spec import Histogram, TransformSpec

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"
RUNS_DIR = "runs"
LAST_RUN_FILE = "last_run.json"
MODELS_DIR = "_models"
LOCK_FILE = ".lock"
SCORE_COLUMN = "score"
LABEL_COLUMN = "label"
MODEL_NAME_COLUMN = "model_name"
MODEL_VERSION_COLUMN = "model_version"
# Score distribution in the run summary: ten equal bins over [0, 1].
SCORE_BIN_EDGES = [round(0.1 * i, 1) for i in range(1, 10)]
# Dask tasks per worker: enough for load balance and progress updates, few enough that 10,000 input
# files cost a few dozen task runs, not 10,000.
GROUPS_PER_WORKER = 8
READ_AHEAD = 1
WRITE_BEHIND = 2
GPU_IO_THREADS = 4
# Rows a GPU worker reads, scores and writes in one batch of whole files. Per 1M rows on an H100
# (bench/results/2026-11-23_h100_profile_batched_async.json): 104 ms one file at a time, 30 ms in
# batches of 8M rows, 20 ms of 20M. A batch in flight takes about 250 bytes per row of device
# memory (raw columns, features, matrix, predictions): some 4 GB at this size; lower it on GPUs
# with less than 24 GB (cuDF spills to host memory before it fails).
GPU_BATCH_ROWS = 16_000_000
# Batches a GPU worker's pipeline decodes at once, each on its reading thread's own CUDA stream.
# With one, the decode was a pipeline's longest chain (0.52 s of 0.90 s at 60M rows); with two,
# each thread decodes for ~0.2 s and the scoring chain (0.52 s) is the longest, so the pipeline
# alone measured the same (docs/benchmarks.md, tenth session). Kept for lighter models, whose
# scoring chain is shorter; it costs one more batch of raw columns in device memory.
GPU_BATCH_READ_THREADS = 2
# Input bytes per dask task on GPU workers, beyond one task per worker thread: each task fills and
# drains its own read -> score -> write pipeline (about a batch read plus a batch scored and
# written: some 0.3-0.4 s on an H100, seven times per 200M-row run with GROUPS_PER_WORKER-style
# grouping), so GPU tasks are few and large (with two batch readers: 4.25 -> 2.97 s for 200M rows
# on an H100, docs/benchmarks.md, tenth session); at ~1.5 GB/s of parquet per H100 a task is a
# few seconds of work, often enough for the progress artifact of a large run.
GPU_TASK_BYTES = 4 << 30
# Parquet dictionary encoding only where it pays: the few-valued columns. Ids are unique and
# scores nearly so; a dictionary for them is built, overflows, and is abandoned (about 40% of the
# CPU writer's time for nothing).
OUTPUT_DICTIONARY_COLUMNS = [LABEL_COLUMN, MODEL_NAME_COLUMN, MODEL_VERSION_COLUMN]


@dataclass(frozen=True)
class OutputFormat:
    """How the predictions files are encoded: the codec of every column, and whether an int64
    id column is stored DELTA_BINARY_PACKED (an increasing id then costs a few bits per row
    instead of 8 bytes, or about 4 after snappy, and the codec has little left to do: float
    scores barely compress) or plain."""

    compression: OutputCompression = OUTPUT_COMPRESSION
    id_encoding: OutputIdEncoding = "delta"

    def delta_columns(self, id_column: str, id_is_int64: bool) -> list[str]:
        """The columns to write delta-encoded: the id column, if it holds int64 and delta is on.
        (Other integer widths would work too; int64 is the type tested through every writer.)"""
        return [id_column] if self.id_encoding == "delta" and id_is_int64 else []

    @property
    def cudf_compression(self) -> str | None:
        """The codec as `cudf.DataFrame.to_parquet` names it (None: uncompressed)."""
        return None if self.compression == "none" else self.compression.upper()

    def arrow_options(self, id_column: str, id_type: Any) -> dict[str, Any]:
        """pyarrow's parquet writer options for a predictions file whose id column has Arrow
        type `id_type`, streamed or written whole."""
        import pyarrow as pa

        options: dict[str, Any] = {
            "compression": self.compression,
            "use_dictionary": OUTPUT_DICTIONARY_COLUMNS,
        }
        delta = self.delta_columns(id_column, pa.types.is_int64(id_type))
        if delta:
            options["column_encoding"] = dict.fromkeys(delta, DELTA_ENCODING)
        return options

    def cudf_options(self, id_column: str, id_dtype: Any) -> dict[str, Any]:
        """`cudf.DataFrame.to_parquet`'s options for a predictions frame whose id column has
        dtype `id_dtype`."""
        options: dict[str, Any] = {"compression": self.cudf_compression}
        delta = self.delta_columns(id_column, is_int64_dtype(id_dtype))
        if delta:
            options["column_encoding"] = dict.fromkeys(delta, DELTA_ENCODING)
        return options


_OUTPUT_NAME = re.compile(r"^.+-[0-9a-f]{16}-.+-v\d+\.parquet$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Exceptions that mean "this partition's data cannot be scored" (quarantine it) rather than a bug
# or an infrastructure failure (fail the task). pyarrow's errors subclass ValueError.
DATA_ERRORS: tuple[type[BaseException], ...] = (DataError, ValueError, TypeError, KeyError)

Status = Literal["scored", "quarantined"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputPartition(_Frozen):
    """One input file as planned: its resolved path, fingerprint (path, size, mtime) and size."""

    path: str
    fingerprint: str
    size: int


class ScoringJob(_Frozen):
    """Everything a worker needs to score partitions; plain values, so it pickles small."""

    bundle_dir: str
    model_name: str
    model_version: int
    scorer: ScorerKind
    device: Literal["cpu", "gpu"]
    output_dir: str
    partition_rows: int
    data_format: str = "auto"
    run_id: str = ""
    io_threads: int = 0
    gpu_io: Literal["cudf", "arrow"] = "cudf"
    gpu_streams: bool = True
    batch_rows: int = 0
    batch_read_threads: int = 0
    output_compression: OutputCompression = OUTPUT_COMPRESSION
    output_id_encoding: OutputIdEncoding = "delta"

    @property
    def output_format(self) -> OutputFormat:
        return OutputFormat(self.output_compression, self.output_id_encoding)

    @property
    def file_threads(self) -> int:
        """Files read (and written) at once on a worker: several on a GPU, whose transform and
        predict take a fraction of a file's parquet decode and encode; one per CPU worker."""
        if self.io_threads:
            return self.io_threads
        return GPU_IO_THREADS if self.device == "gpu" else 1

    @property
    def rows_per_batch(self) -> int:
        """Rows of whole files read, scored and written together; 0 = one file at a time. On by
        default on a GPU, where per-call costs dominate; a CPU's cost is per row, so off there."""
        if self.batch_rows:
            return self.batch_rows
        return GPU_BATCH_ROWS if self.device == "gpu" else 0

    @property
    def batch_readers(self) -> int:
        """Batches read at once in batch mode: `batch_read_threads`, else GPU_BATCH_READ_THREADS
        on a GPU (decodes overlap on the device); 1 on a CPU, whose read of a batch already
        decodes on all of the worker's threads."""
        if self.batch_read_threads:
            return self.batch_read_threads
        return GPU_BATCH_READ_THREADS if self.device == "gpu" else 1

    @property
    def files_in_flight(self) -> int:
        """Files a worker's pipeline holds at once: `file_threads`, or a batch's worth."""
        if self.rows_per_batch <= 0:
            return self.file_threads
        return max(self.file_threads, files_per_batch(self.rows_per_batch, self.partition_rows))


class ManifestEntry(_Frozen):
    """The record of one input file scored (or quarantined) by one model version."""

    input: str
    fingerprint: str
    model_name: str
    model_version: int
    status: Status
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    output: str | None = None
    reason: str | None = None
    seconds: float = 0.0
    finished_at: str = ""
    run_id: str = ""
    worker: str = ""
    positives: int = 0
    score_counts: list[int] = []
    drift_counts: dict[str, list[int]] = {}


class ScoringError(RuntimeError):
    """Scoring tasks failed for reasons other than bad data (the message names them)."""


class QuarantineExceeded(RuntimeError):
    """More rows were quarantined than the configured fraction allows."""


# ---------------------------------------------------------------- naming and planning (pure)


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "x"


def output_file_name(part: InputPartition, model_name: str, version: int) -> str:
    """Deterministic per (input fingerprint, model, version): a re-executed task rewrites the same
    file instead of adding a second one."""
    return (
        f"{_safe(Path(part.path).stem)}-{part.fingerprint}-{_safe(model_name)}-v{version}.parquet"
    )


def entry_file_name(input_path: str) -> str:
    """Manifest file of one input path (the same for every model version and file content)."""
    digest = hashlib.sha256(input_path.encode()).hexdigest()[:16]
    return f"{_safe(Path(input_path).stem)}-{digest}.json"


def is_current(
    entry: ManifestEntry | None, part: InputPartition, model_name: str, version: int
) -> bool:
    """Whether `entry` already covers this file content with this model version."""
    return (
        entry is not None
        and entry.input == part.path
        and entry.fingerprint == part.fingerprint
        and entry.model_name == model_name
        and entry.model_version == version
    )


def plan_partitions(
    parts: Sequence[InputPartition],
    entries: Mapping[str, ManifestEntry],
    model_name: str,
    version: int,
) -> tuple[list[InputPartition], list[ManifestEntry]]:
    """Split inputs into those to score and the manifest entries of those already done (scored
    or quarantined) for the same content and model version."""
    todo, done = [], []
    for part in parts:
        entry = entries.get(part.path)
        if entry is not None and is_current(entry, part, model_name, version):
            done.append(entry)
        else:
            todo.append(part)
    return todo, done


def files_per_batch(rows_per_batch: int, partition_rows: int) -> int:
    """Files in a batch, estimated before any file is opened: files of up to `partition_rows`
    rows join batches whole, so a batch holds at least this many of the largest such files."""
    return max(1, rows_per_batch // max(1, partition_rows))


def group_count(
    n_parts: int, n_workers: int, files_per_task: int = 0, files_in_flight: int = 1
) -> int:
    """Dask tasks for `n_parts` files: `files_per_task` each if set, else GROUPS_PER_WORKER per
    worker (never more tasks than files), with at least 2 x `files_in_flight` files per task so
    that a worker reading several files at once (or a batch of files: `ScoringJob.files_in_flight`)
    has a full pipeline, not a restart per task."""
    if n_parts <= 0:
        return 0
    if files_per_task > 0:
        return math.ceil(n_parts / files_per_task)
    workers = max(1, n_workers)
    groups = min(n_parts, workers * GROUPS_PER_WORKER)
    if files_in_flight > 1:  # but never fewer tasks than workers
        groups = min(groups, max(workers, math.ceil(n_parts / (2 * files_in_flight))))
    return groups


def gpu_group_count(n_parts: int, input_bytes: int, n_slots: int, files_per_task: int = 0) -> int:
    """Dask tasks for `n_parts` files of `input_bytes` on GPU workers with `n_slots` threads in
    all: `files_per_task` each if set, else one per thread, or as many per thread as keep each
    task under GPU_TASK_BYTES (a whole number per thread, so the last round of tasks keeps every
    GPU busy; never more tasks than files)."""
    if n_parts <= 0:
        return 0
    if files_per_task > 0:
        return math.ceil(n_parts / files_per_task)
    slots = max(1, n_slots)
    per_slot = max(1, math.ceil(input_bytes / (GPU_TASK_BYTES * slots)))
    return min(n_parts, slots * per_slot)


def task_count(
    job: ScoringJob,
    todo: Sequence[InputPartition],
    n_workers: int,
    n_threads: int,
    files_per_task: int = 0,
) -> int:
    """Dask tasks for a run: `gpu_group_count` on GPU workers, `group_count` on CPU ones."""
    if job.device == "gpu":
        return gpu_group_count(len(todo), sum(p.size for p in todo), n_threads, files_per_task)
    return group_count(len(todo), n_workers, files_per_task, job.files_in_flight)


def group_partitions(parts: Sequence[InputPartition], n_groups: int) -> list[list[InputPartition]]:
    """`min(n_groups, len(parts))` contiguous groups (in input order) of about equal total bytes.

    Greedy: each group takes files while at least half of the next one fits its share of the
    bytes still unassigned, and leaves at least one file for each group after it.
    """
    n_groups = max(0, min(n_groups, len(parts)))
    sizes = [max(p.size, 1) for p in parts]
    remaining = float(sum(sizes))
    groups: list[list[InputPartition]] = []
    start = 0
    for g in range(n_groups):
        left = n_groups - g
        if left == 1:
            groups.append(list(parts[start:]))
            break
        share = remaining / left
        last_stop = len(parts) - (left - 1)
        stop, taken = start + 1, float(sizes[start])
        while stop < last_stop and taken + sizes[stop] / 2 <= share:
            taken += sizes[stop]
            stop += 1
        groups.append(list(parts[start:stop]))
        remaining -= taken
        start = stop
    return groups


def scoring_roles(spec: TransformSpec) -> ColumnRoles:
    """Roles of the raw columns that the model's transform reads (the target is not needed)."""
    roles: dict[str, Any] = {spec.id_column: "id"}
    roles.update({c: "numeric" for c in spec.raw_numeric})
    roles.update({c: "categorical" for c in spec.raw_categorical})
    if spec.timestamp_column:
        roles[spec.timestamp_column] = "timestamp"
    for e in spec.entities:
        roles.setdefault(e.key, "key")
    return ColumnRoles(roles)


def scored_entry(
    part: InputPartition,
    job: ScoringJob,
    *,
    output: str,
    rows: int,
    positives: int,
    score_counts: Sequence[int] | npt.NDArray[Any],
    drift_counts: Mapping[str, Sequence[int] | npt.NDArray[Any]],
    seconds: float,
    worker: str = "",
) -> ManifestEntry:
    return ManifestEntry(
        input=part.path,
        fingerprint=part.fingerprint,
        model_name=job.model_name,
        model_version=job.model_version,
        status="scored",
        rows_in=rows,
        rows_scored=rows,
        rows_quarantined=0,
        output=output,
        seconds=round(seconds, 4),
        finished_at=_now(),
        run_id=job.run_id,
        worker=worker,
        positives=positives,
        score_counts=[int(c) for c in score_counts],
        drift_counts={k: [int(c) for c in v] for k, v in drift_counts.items()},
    )


def quarantine_entry(
    part: InputPartition,
    job: ScoringJob,
    reason: str,
    rows: int,
    seconds: float = 0.0,
    worker: str = "",
) -> ManifestEntry:
    """All rows of a bad partition are quarantined together, with the reason."""
    return ManifestEntry(
        input=part.path,
        fingerprint=part.fingerprint,
        model_name=job.model_name,
        model_version=job.model_version,
        status="quarantined",
        rows_in=rows,
        rows_scored=0,
        rows_quarantined=rows,
        reason=reason,
        seconds=round(seconds, 4),
        finished_at=_now(),
        run_id=job.run_id,
        worker=worker,
    )


def error_reason(path: str, exc: BaseException) -> str:
    if isinstance(exc, DataError):
        return str(exc)
    return f"{path}: cannot be scored: {type(exc).__name__}: {exc}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- accounting (pure)


@dataclass
class RunTotals:
    """Counts over the files processed in one run; `add` one manifest entry at a time."""

    files_scored: int = 0
    files_quarantined: int = 0
    rows_in: int = 0
    rows_scored: int = 0
    rows_quarantined: int = 0
    positives: int = 0
    score_counts: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.zeros(len(SCORE_BIN_EDGES) + 1, np.int64)
    )
    drift_counts: Counts = field(default_factory=dict)
    quarantined: list[dict[str, Any]] = field(default_factory=list)

    def add(self, entry: ManifestEntry) -> None:
        if entry.rows_in != entry.rows_scored + entry.rows_quarantined:
            raise ScoringError(
                f"{entry.input}: manifest entry does not add up: {entry.rows_in} rows in, "
                f"{entry.rows_scored} scored, {entry.rows_quarantined} quarantined"
            )
        self.rows_in += entry.rows_in
        self.rows_scored += entry.rows_scored
        self.rows_quarantined += entry.rows_quarantined
        if entry.status == "scored":
            self.files_scored += 1
            self.positives += entry.positives
            if entry.score_counts:
                self.score_counts = self.score_counts + np.asarray(entry.score_counts, np.int64)
            merge_counts(self.drift_counts, entry.drift_counts)
        else:
            self.files_quarantined += 1
            self.quarantined.append(
                {"input": entry.input, "rows": entry.rows_in, "reason": entry.reason}
            )

    @property
    def files(self) -> int:
        return self.files_scored + self.files_quarantined

    @property
    def accounting_holds(self) -> bool:
        return self.rows_in == self.rows_scored + self.rows_quarantined

    def to_json(self) -> dict[str, Any]:
        return {
            "files_scored": self.files_scored,
            "files_quarantined": self.files_quarantined,
            "rows_in": self.rows_in,
            "rows_scored": self.rows_scored,
            "rows_quarantined": self.rows_quarantined,
            "positives": self.positives,
            "score_counts": [int(c) for c in self.score_counts],
            "drift_counts": {k: [int(c) for c in v] for k, v in self.drift_counts.items()},
            "quarantined": list(self.quarantined),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunTotals:
        return cls(
            files_scored=int(d["files_scored"]),
            files_quarantined=int(d["files_quarantined"]),
            rows_in=int(d["rows_in"]),
            rows_scored=int(d["rows_scored"]),
            rows_quarantined=int(d["rows_quarantined"]),
            positives=int(d["positives"]),
            score_counts=np.asarray(d["score_counts"], np.int64),
            drift_counts={k: np.asarray(v, np.int64) for k, v in d["drift_counts"].items()},
            quarantined=list(d["quarantined"]),
        )


def quarantined_fraction(totals: RunTotals) -> float:
    """Quarantined rows / rows in; 1.0 when only unreadable files (rows unknown) were seen."""
    if totals.rows_in > 0:
        return totals.rows_quarantined / totals.rows_in
    return 1.0 if totals.files_quarantined else 0.0


def failure_reason(totals: RunTotals, max_fraction: float) -> str | None:
    """Why the run must end Failed, or None: broken accounting, or too much quarantined."""
    if not totals.accounting_holds:
        return (
            f"accounting does not hold: {totals.rows_in} rows in != {totals.rows_scored} scored "
            f"+ {totals.rows_quarantined} quarantined"
        )
    fraction = quarantined_fraction(totals)
    if fraction > max_fraction:
        return (
            f"{totals.rows_quarantined:,} of {totals.rows_in:,} rows ({fraction:.2%}) in "
            f"{totals.files_quarantined} file(s) were quarantined, more than the allowed "
            f"{max_fraction:.2%} (scoring.max_quarantined_fraction)"
        )
    return None


def run_summary(
    *,
    run_id: str,
    input_path: str,
    output_dir: str,
    model: Mapping[str, Any],
    scorer: str,
    device: str,
    workers: int,
    totals: RunTotals,
    files_total: int,
    tasks: int = 0,
    files_skipped: int,
    seconds_scoring: float,
    seconds_total: float,
    histograms: Mapping[str, Histogram],
    max_fraction: float,
) -> dict[str, Any]:
    """The run's summary as plain JSON: counts, throughput, score distribution, drift, failures."""
    psi = feature_psi(totals.drift_counts, histograms)
    failure = failure_reason(totals, max_fraction)
    scored = totals.rows_scored
    return {
        "run_id": run_id,
        "finished_at": _now(),
        "input": input_path,
        "output": output_dir,
        "model": dict(model),
        "scorer": scorer,
        "device": device,
        "workers": workers,
        "dask_tasks": tasks,
        "files": {
            "total": files_total,
            "scored": totals.files_scored,
            "quarantined": totals.files_quarantined,
            "skipped": files_skipped,
        },
        "rows": {
            "in": totals.rows_in,
            "scored": scored,
            "quarantined": totals.rows_quarantined,
        },
        "accounting_holds": totals.accounting_holds,
        "seconds_scoring": round(seconds_scoring, 3),
        "seconds_total": round(seconds_total, 3),
        "rows_per_second": round(totals.rows_in / seconds_scoring, 1) if seconds_scoring else 0.0,
        "positives": totals.positives,
        "positive_rate": totals.positives / scored if scored else None,
        "score_distribution": {
            "edges": [0.0, *SCORE_BIN_EDGES, 1.0],
            "counts": [int(c) for c in totals.score_counts],
        },
        "drift_psi": {k: (None if math.isnan(v) else round(v, 6)) for k, v in psi.items()},
        "quarantined_fraction": quarantined_fraction(totals),
        "max_quarantined_fraction": max_fraction,
        "quarantined": totals.quarantined,
        "failed": failure is not None,
        "failure": failure,
    }


def summary_table(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of the Prefect table artifact: one metric per row."""
    rows = summary["rows"]
    files = summary["files"]
    dist = summary["score_distribution"]
    table = [
        {"metric": "model", "value": f"{summary['model']['name']} v{summary['model']['version']}"},
        {"metric": "scorer / device", "value": f"{summary['scorer']} / {summary['device']}"},
        {"metric": "rows in", "value": rows["in"]},
        {"metric": "rows scored", "value": rows["scored"]},
        {"metric": "rows quarantined", "value": rows["quarantined"]},
        {"metric": "rows/s", "value": summary["rows_per_second"]},
        {"metric": "files scored", "value": files["scored"]},
        {"metric": "files quarantined", "value": files["quarantined"]},
        {"metric": "files skipped (already scored)", "value": files["skipped"]},
        {"metric": "positive rate", "value": summary["positive_rate"]},
    ]
    edges = dist["edges"]
    for i, count in enumerate(dist["counts"]):
        table.append({"metric": f"score [{edges[i]:.1f}, {edges[i + 1]:.1f})", "value": count})
    return table


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The run report: counts, drift per feature, quarantined files with their reasons."""
    rows = summary["rows"]
    lines = [
        f"# Batch scoring: {summary['model']['name']} v{summary['model']['version']}",
        "",
        f"- input `{summary['input']}` -> output `{summary['output']}`",
        f"- {rows['in']:,} rows in = {rows['scored']:,} scored + {rows['quarantined']:,} "
        f"quarantined; {summary['files']['skipped']} file(s) skipped as already scored",
        f"- {summary['rows_per_second']:,.0f} rows/s on {summary['workers']} worker(s) "
        f"({summary['scorer']}, {summary['device']})",
        f"- status: **{'FAILED: ' + summary['failure'] if summary['failed'] else 'ok'}**",
        "",
        "## Drift (population stability index vs training)",
        "",
        "| feature | PSI | reading |",
        "|---|---|---|",
    ]
    for name, psi in sorted(
        summary["drift_psi"].items(), key=lambda kv: -1.0 if kv[1] is None else -kv[1]
    ):
        value = math.nan if psi is None else psi
        lines.append(f"| {name} | {value:.4f} | {drift_level(value)} |")
    if summary["quarantined"]:
        lines += ["", "## Quarantined files", "", "| file | rows | reason |", "|---|---|---|"]
        for q in summary["quarantined"]:
            reason = str(q["reason"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{q['input']}` | {q['rows']:,} | {reason} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- configuration and inputs


def scoring_config(
    config_path: str | None, overrides: Mapping[str, Any] | None, home: str | None, input_path: str
) -> PipelineConfig:
    """The config a scoring run uses: the file given; else the built-in dataset's config written
    into `home` by a training run; else built-in defaults (for the registry and scoring keys)."""
    from tasks.config import builtin_config
    from tasks.pipeline import HomeLayout, config_with_overrides

    if config_path:
        return config_with_overrides(config_path, overrides)
    home_path = Path(home or ".gpupipe").expanduser().resolve()
    layout = HomeLayout(home_path)
    if layout.builtin_config.is_file():
        return config_with_overrides(str(layout.builtin_config), overrides)
    return builtin_config(input_path, home_path, **dict(overrides or {}))


def scoring_cluster_config(cfg: PipelineConfig, device: str) -> ClusterConfig:
    """The cluster settings of a scoring run on `device`: GPU workers that the run starts get
    `scoring.gpu_worker_threads` threads (tasks overlapping on the GPU), the rest is `cluster`."""
    if device != "gpu":
        return cfg.cluster
    return cfg.cluster.model_copy(update={"threads_per_worker": cfg.scoring.gpu_worker_threads})


def champion_uri(cfg: PipelineConfig) -> str:
    return f"models:/{cfg.model_name('xgboost')}@champion"


def partition_of(path: Path) -> InputPartition:
    path = path.resolve()
    return InputPartition(
        path=str(path), fingerprint=files_fingerprint([path]), size=path.stat().st_size
    )


def discover_partitions(
    source: str, output_dir: str | None = None, declared_format: str = "auto"
) -> list[InputPartition]:
    """Input files of a directory, glob or file, in sorted order; [] for an empty directory or a
    glob that matches nothing.

    Files under the output directory are never inputs: a glob that also matches earlier
    predictions skips them. A directory or file inside the output directory (or the output
    directory itself) is refused: all its files would be skipped without a word.
    """
    p = Path(source).expanduser()
    out = Path(output_dir).expanduser().resolve() if output_dir else None
    if out is not None and (p.is_dir() or p.is_file()):
        named = p.resolve()
        if named == out or out in named.parents:
            raise DataError(
                f"{source}: the input is inside the output directory {out}, whose files are "
                "never read as inputs (they would include the predictions); write the "
                "predictions to another directory"
            )
    if p.is_dir():
        candidates = [f for f in p.iterdir() if f.is_file() and _is_table(f, declared_format)]
    elif p.is_file():
        candidates = [p]
    elif any(ch in source for ch in "*?["):
        fixed = glob_root(p)
        if not fixed.is_dir():  # a typo, not an empty landing directory: say so
            raise DataError(f"{source}: no such directory {fixed}")
        candidates = [Path(f) for f in glob.glob(str(p)) if Path(f).is_file()]
    else:
        raise DataError(f"{source}: no such file or directory")
    candidates = [f for f in candidates if not f.name.startswith(("_", "."))]
    if not candidates:
        hint = nested_tables_hint(p)
        if hint:  # not empty: its tables are in subdirectories, which would be skipped silently
            raise DataError(f"{source}: no input files{hint}")
        return []
    files = discover_files(source, declared_format)
    if out is not None:
        files = [f for f in files if out not in f.parents]
    return [partition_of(f) for f in files]


def glob_root(pattern: Path) -> Path:
    """The directory a glob pattern searches from: its leading parts without wildcards."""
    fixed: list[str] = []
    for part in pattern.parts:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _is_table(path: Path, declared: str) -> bool:
    try:
        table_format(path, declared)
    except DataError:
        return False
    return True


# ---------------------------------------------------------------- manifest and output files


def manifest_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / MANIFEST_DIR


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_entry(output_dir: str | Path, input_path: str) -> ManifestEntry | None:
    """The manifest entry of one input, or None (missing, or unreadable: then it is redone)."""
    path = manifest_dir(output_dir) / entry_file_name(input_path)
    try:
        return ManifestEntry.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def read_manifest(output_dir: str | Path, paths: Iterable[str]) -> dict[str, ManifestEntry]:
    found = {}
    for path in paths:
        entry = read_entry(output_dir, path)
        if entry is not None:
            found[path] = entry
    return found


def write_entry(output_dir: str | Path, entry: ManifestEntry) -> None:
    write_json_atomic(manifest_dir(output_dir) / entry_file_name(entry.input), entry.model_dump())


def all_entries(output_dir: str | Path) -> list[ManifestEntry]:
    out: list[ManifestEntry] = []
    directory = manifest_dir(output_dir)
    if not directory.is_dir():
        return out
    for path in directory.glob("*.json"):
        try:
            out.append(ManifestEntry.model_validate_json(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def sweep_outputs(output_dir: str | Path) -> list[str]:
    """Delete predictions files that no manifest entry points at (superseded by a new model
    version or input content, or left by a crash) and temporary files of killed writers.

    Only call this while holding `output_lock`: it would delete a concurrent run's files.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    referenced = {e.output for e in all_entries(out) if e.output}
    removed = []
    for path in out.iterdir():
        stale_tmp = path.name.startswith(".") and ".parquet.tmp-" in path.name
        orphan = _OUTPUT_NAME.match(path.name) is not None and path.name not in referenced
        if path.is_file() and (stale_tmp or orphan):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    manifest = manifest_dir(out)
    if manifest.is_dir():
        for path in manifest.glob(".*.json.tmp-*"):  # manifest writes cut short by a crash
            path.unlink(missing_ok=True)
            removed.append(f"{MANIFEST_DIR}/{path.name}")
    return sorted(removed)


@contextlib.contextmanager
def output_lock(output_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on an output directory for one run (released if the process dies).

    Raises:
        RuntimeError: another run holds it.
    """
    import fcntl

    path = manifest_dir(output_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RuntimeError(
                f"{output_dir}: another batch scoring run is writing here (lock {path})"
            ) from exc
        try:
            yield path
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_run_summary(output_dir: str | Path, summary: Mapping[str, Any]) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = manifest_dir(output_dir) / RUNS_DIR / f"{stamp}-{_safe(str(summary['run_id']))}.json"
    write_json_atomic(path, summary)
    write_json_atomic(manifest_dir(output_dir) / LAST_RUN_FILE, summary)
    return path


# ---------------------------------------------------------------- engines (worker side)


@dataclass
class ChunkStats:
    """What one chunk (or one file of a batch) adds to its file's manifest entry."""

    rows: int
    positives: int
    score_counts: npt.NDArray[np.int64]
    drift_counts: Counts


@dataclass
class ScoredChunk:
    """One chunk's predictions (a pyarrow Table or cuDF frame) and its statistics."""

    table: Any
    stats: ChunkStats


@dataclass
class ScoredBatch:
    """Predictions of consecutive files scored as one frame: one table for all their rows, the
    statistics of each file (rows offsets[i]:offsets[i + 1] of the table)."""

    table: Any
    files: list[ChunkStats]


class Sink(Protocol):
    def write(self, table: Any) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Engine(Protocol):
    """Reads raw partitions, scores them and writes predictions on one device."""

    @property
    def spec(self) -> TransformSpec: ...

    def read(self, path: Path, fmt: TableFormat, columns: list[str], roles: ColumnRoles) -> Any: ...
    def read_chunks(
        self, path: Path, columns: list[str], rows: int, total: int
    ) -> Iterator[Any]: ...
    def read_many(self, paths: list[Path], columns: list[str]) -> Any:
        """All rows of several parquet files, in order, as one frame; DataError if any fails."""
        ...

    def is_key(self, ids: Any) -> bool:
        """Whether an id column of a `read_many` frame has no nulls and no value twice."""
        ...

    def score(self, frame: Any) -> ScoredChunk: ...
    def score_batch(self, frame: Any, offsets: Sequence[int]) -> ScoredBatch:
        """One transform and predict for a frame of several files (rows offsets[i]:offsets[i+1]
        are file i), with each file's statistics."""
        ...

    def open_sink(self, tmp_path: Path, fmt: OutputFormat) -> Sink: ...
    def write_batch(
        self, table: Any, offsets: Sequence[int], paths: list[Path], fmt: OutputFormat
    ) -> None:
        """Rows offsets[i]:offsets[i+1] of a `score_batch` table to paths[i], each a whole file."""
        ...


def read_csv_checked(path: Path, columns: list[str], roles: ColumnRoles) -> Any:
    """A CSV file with pandas, timestamps parsed, column types checked on the data itself."""
    frame = coerce_timestamps(read_table(path, columns, "csv"), roles, path)
    problems = dtype_problems(frame, roles, path)
    if problems:
        raise DataError("; ".join(problems))
    return frame


def _unreadable(path: Path, exc: BaseException) -> DataError:
    return DataError(f"{path}: unreadable parquet file: {type(exc).__name__}: {exc}")


def segment_stats(
    matrix: Any, probs: Any, labels: Any, spec: TransformSpec, offsets: Sequence[int]
) -> list[ChunkStats]:
    """Positives, score-bin counts and drift counts of each file of a batch: rows
    offsets[i]:offsets[i + 1]. On a GPU every file is counted on the device in two launches
    (features, scores) and the counts come back in two transfers.

    Raises:
        ScoringError: offsets that do not cover the rows exactly, in order (a bug, not data).
    """
    n = len(probs)
    covered = bool(offsets) and offsets[0] == 0 and offsets[-1] == n
    if not covered or any(b < a for a, b in pairwise(offsets)):
        raise ScoringError(f"batch offsets {list(offsets)[:5]}... do not cover its {n} rows")
    drift = histogram_counts_segments(matrix, spec.feature_names, spec.histograms, offsets)
    xp = array_module_of(probs)
    outcome = xp.stack([probs.astype(xp.float32), labels.astype(xp.float32)], axis=1)
    # labels binned at 1: the second bin counts the positives
    outcomes = matrix_bin_counts_segments(outcome, [SCORE_BIN_EDGES, [1.0]], offsets)
    return [
        ChunkStats(b - a, int(label_counts[1]), score_counts, counts)
        for (a, b), (score_counts, label_counts), counts in zip(
            pairwise(offsets), outcomes, drift, strict=True
        )
    ]


def column_is_key(ids: Any) -> bool:
    """Whether a pandas or cuDF column has no missing value (null, or NaN in a float column) and
    no value twice."""
    return not bool(ids.isna().any()) and not bool(ids.duplicated().any())


def _only_file(batch: ScoredBatch) -> ScoredChunk:
    (stats,) = batch.files
    return ScoredChunk(batch.table, stats)


def read_arrow_tables(paths: Sequence[Path], columns: list[str], dictionary: list[str]) -> Any:
    """Parquet files as one pyarrow Table, in order, the `dictionary` columns dictionary-encoded
    (one dictionary for all files, so they convert to one categorical or device dictionary).

    Raises:
        DataError: naming the file that cannot be read, or the files whose schemas do not match.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path in paths:
        try:
            tables.append(pq.read_table(path, columns=columns, read_dictionary=dictionary))
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise _unreadable(path, exc) from exc
    try:
        # permissive: an int column in one file and a float column in another become float, as
        # pandas makes them when the rows of both meet in one frame
        return pa.concat_tables(tables, promote_options="permissive").unify_dictionaries()
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise DataError(
            f"{paths[0]} and {len(paths) - 1} more: cannot be read as one table: {exc}"
        ) from exc


def write_arrow_segments(
    table: Any,
    offsets: Sequence[int],
    paths: Sequence[Path],
    fmt: OutputFormat,
    id_column: str,
) -> None:
    """Rows offsets[i]:offsets[i + 1] of a pyarrow Table to paths[i], as `ArrowSink` writes."""
    import pyarrow.parquet as pq

    options = fmt.arrow_options(id_column, table.schema.field(id_column).type)
    for (a, b), path in zip(pairwise(offsets), paths, strict=True):
        pq.write_table(table.slice(a, b - a), path, **options)


def dictionary_columns(spec: TransformSpec) -> list[str]:
    """Raw columns read only as categorical features: the CPU engine reads them from parquet
    dictionary-encoded (pandas categoricals), so their strings are never materialized per row
    and each distinct value is looked up once."""
    other = {spec.id_column, *spec.raw_numeric, *(e.key for e in spec.entities)}
    other.update(e.value for e in spec.entities)
    if spec.timestamp_column:
        other.add(spec.timestamp_column)
    return [c for c in spec.raw_categorical if c not in other]


def dictionary_columns_of(spec: TransformSpec, columns: Sequence[str]) -> list[str]:
    """The `dictionary_columns` among the columns being read."""
    return [c for c in dictionary_columns(spec) if c in columns]


def read_parquet_frame(path: Path, columns: list[str], dictionary: list[str]) -> Any:
    """A parquet file with pandas, the `dictionary` columns as categoricals; on failure the
    plain read's DataError (naming the missing column or the reason)."""
    import pandas as pd

    try:
        return pd.read_parquet(path, columns=columns, read_dictionary=dictionary)
    except Exception:
        return read_table(path, columns, "parquet")


def nullable_integers(values: Any) -> Any:
    """An Arrow integer column as a pandas nullable integer column (Int64, UInt64, ...): every
    value exact and missing ones as <NA>, where pandas' default float64 would round ids above
    2**53."""
    import pandas as pd

    # int64 -> Int64, uint64 -> UInt64 (pandas' masked dtypes convert from Arrow directly)
    dtype = pd.api.types.pandas_dtype(
        str(values.type).replace("uint", "UInt").replace("int", "Int")
    )
    return values.to_pandas(types_mapper={values.type: dtype}.get)


def exact_integer_ids(path: Path, id_col: str) -> Any | None:
    """The id column of a parquet file as a pandas nullable integer column when the file stores
    it as integers (read again: the frame's float64 copy has lost the digits of ids above
    2**53), else None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if not pa.types.is_integer(pq.read_schema(path).field(id_col).type):
            return None
        return nullable_integers(pq.read_table(path, columns=[id_col]).column(id_col))
    except (OSError, KeyError, pa.ArrowException) as exc:
        raise _unreadable(path, exc) from exc


def exact_csv_integer_ids(path: Path, id_col: str) -> Any | None:
    """The id column of a CSV file parsed as pandas nullable Int64 (exact above 2**53, where
    pandas' float64 for a column with missing values is not), or None when its text is not
    all integers."""
    import pandas as pd

    try:
        return pd.read_csv(path, usecols=[id_col], dtype={id_col: "Int64"})[id_col]
    except (ValueError, TypeError, OverflowError):
        return None


def raw_columns(frame: Any, columns: list[str]) -> dict[str, RawColumn]:
    """A pandas frame's columns for `numpy_features`: categoricals as `DictionaryColumn`
    (codes, categories), the others as NumPy arrays (missing strings stay None/NaN)."""
    import pandas as pd

    out: dict[str, RawColumn] = {}
    for c in columns:
        col = frame[c]
        if isinstance(col.dtype, pd.CategoricalDtype):
            out[c] = DictionaryColumn(col.cat.codes.to_numpy(), col.cat.categories.to_numpy())
        else:
            out[c] = col.to_numpy()
    return out


@dataclass
class CpuEngine:
    """pandas + NumPy transform (`numpy_features`, the training code) + in-process scorer."""

    bundle: LoadedBundle
    model_name: str
    model_version: int

    @property
    def spec(self) -> TransformSpec:
        return self.bundle.spec

    def read(self, path: Path, fmt: TableFormat, columns: list[str], roles: ColumnRoles) -> Any:
        if fmt == "csv":
            frame = read_csv_checked(path, columns, roles)
        else:
            frame = read_parquet_frame(path, columns, dictionary_columns_of(self.spec, columns))
        id_col = self.spec.id_column
        if id_col not in frame.columns or frame[id_col].dtype.kind != "f":
            return frame
        # integer ids with missing values, read as float64: read them again exactly
        if fmt != "csv":
            exact = exact_integer_ids(path, id_col)
        elif self.spec.raw_dtypes.get(id_col, "").lower().startswith(("int", "uint")):
            exact = exact_csv_integer_ids(path, id_col)  # CSV ids were integers in training
        else:
            exact = None
        if exact is not None:
            frame[id_col] = exact
        return frame

    def read_chunks(self, path: Path, columns: list[str], rows: int, total: int) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        id_col = self.spec.id_column
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=rows, columns=columns)
            for batch in batches:
                table = pa.Table.from_batches([batch])
                frame = table.to_pandas()
                if id_col in frame.columns and frame[id_col].dtype.kind == "f":
                    ids = table.column(id_col)
                    if pa.types.is_integer(ids.type):
                        frame[id_col] = nullable_integers(ids)
                yield frame
        except (OSError, pa.ArrowException) as exc:
            raise _unreadable(path, exc) from exc

    def read_many(self, paths: list[Path], columns: list[str]) -> Any:
        # one Arrow table, then one pandas conversion: categoricals of different files would
        # turn into object columns if concatenated as pandas frames
        dictionary = dictionary_columns_of(self.spec, columns)
        return read_arrow_tables(paths, columns, dictionary).to_pandas()

    def is_key(self, ids: Any) -> bool:
        return column_is_key(ids)

    def score(self, frame: Any) -> ScoredChunk:
        return _only_file(self.score_batch(frame, [0, len(frame)]))

    def score_batch(self, frame: Any, offsets: Sequence[int]) -> ScoredBatch:
        spec = self.spec
        if len(frame):
            raw = raw_columns(frame, spec.raw_columns)
            matrix = transform_raw(raw, self.bundle.spec_dict, self.bundle.lookups)
            probs = np.asarray(self.bundle.scorer.predict_proba(matrix), np.float32).reshape(-1)
        else:
            matrix = np.zeros((0, len(spec.feature_names)), np.float32)
            probs = np.zeros(0, np.float32)
        labels = (probs >= self.bundle.threshold).astype(np.int8)
        stats = segment_stats(matrix, probs, labels, spec, offsets)
        return ScoredBatch(self._table(frame[spec.id_column], probs, labels), stats)

    def _table(self, ids: Any, probs: Any, labels: Any) -> Any:
        import pyarrow as pa

        return host_prediction_table(
            self.spec.id_column,
            pa.Array.from_pandas(ids),
            probs,
            labels,
            self.model_name,
            self.model_version,
        )

    def open_sink(self, tmp_path: Path, fmt: OutputFormat) -> Sink:
        return ArrowSink(tmp_path, fmt, self.spec.id_column)

    def write_batch(
        self, table: Any, offsets: Sequence[int], paths: list[Path], fmt: OutputFormat
    ) -> None:
        write_arrow_segments(table, offsets, paths, fmt, self.spec.id_column)


class ArrowSink:
    """Streams chunks into one parquet file with pyarrow (one row group per chunk)."""

    def __init__(self, path: Path, fmt: OutputFormat, id_column: str) -> None:
        self.path = path
        self.fmt = fmt
        self.id_column = id_column
        self._writer: Any = None
        self._schema: Any = None

    def write(self, table: Any) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            self._schema = table.schema
            options = self.fmt.arrow_options(
                self.id_column, table.schema.field(self.id_column).type
            )
            self._writer = pq.ParquetWriter(self.path, table.schema, **options)
        elif table.schema != self._schema:
            # e.g. an id column read as int64 in one chunk and as float64 (nulls) in another
            table = table.cast(self._schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
        self.path.unlink(missing_ok=True)


@dataclass
class GpuEngine:
    """cuDF read -> `gpu_features.DeviceTransform` -> XGBoost on CuPy -> parquet write.

    The frame, the feature matrix and the predictions stay in device memory; only the per-chunk
    counts come back to the host, in one transfer. Parquet is decoded and encoded either by cuDF
    on the GPU (`io="cudf"`) or by pyarrow on the worker's CPU threads (`io="arrow"`), which then
    moves only the raw columns to the device and the ids, scores and labels back; with several
    files in flight the CPU threads decode while the GPU scores. An ONNX scorer runs on the host
    (ONNX Runtime's CPU provider), so with it the matrix makes one trip to host memory.
    """

    bundle: LoadedBundle
    transform: Any
    model_name: str
    model_version: int
    io: Literal["cudf", "arrow"] = "arrow"
    # cudf I/O of whole batches on the reading and writing threads' own CUDA streams
    # (tasks/gpu_io.py) rather than the legacy default stream that scoring uses
    streams: bool = True

    @property
    def spec(self) -> TransformSpec:
        return self.bundle.spec

    @property
    def _own_streams(self) -> bool:
        return self.io == "cudf" and self.streams

    def read(self, path: Path, fmt: TableFormat, columns: list[str], roles: ColumnRoles) -> Any:
        import cudf

        if fmt == "csv":
            return cudf.from_pandas(read_csv_checked(path, columns, roles))
        try:
            if self.io == "arrow":
                return cudf.DataFrame.from_arrow(self._read_arrow([path], columns))
            return cudf.read_parquet(str(path), columns=columns)
        except (MemoryError, KeyboardInterrupt, DataError):
            raise
        except Exception as exc:  # cuDF raises many types for corrupt files
            raise _unreadable(path, exc) from exc

    def read_many(self, paths: list[Path], columns: list[str]) -> Any:
        import cudf

        try:
            if self.io == "arrow":
                return cudf.DataFrame.from_arrow(self._read_arrow(paths, columns))
            if self._own_streams:
                from tasks.gpu_io import read_parquet_on_stream

                return read_parquet_on_stream(paths, columns)
            # one call: cuDF reads the files' pages in parallel, one kernel launch per column
            return cudf.read_parquet([str(p) for p in paths], columns=columns)
        except (MemoryError, KeyboardInterrupt, DataError):
            raise
        except Exception as exc:
            raise DataError(
                f"{paths[0]} and {len(paths) - 1} more: unreadable as one batch: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def is_key(self, ids: Any) -> bool:
        if self._own_streams:
            from tasks.gpu_io import is_key_on_stream

            return is_key_on_stream(ids)
        return column_is_key(ids)

    def _read_arrow(self, paths: list[Path], columns: list[str]) -> Any:
        """Parquet decoded on this thread's CPU, string categories kept dictionary-encoded (the
        transform then looks up each distinct value once, not each row)."""
        strings = dictionary_columns_of(self.spec, columns)
        return read_arrow_tables(paths, columns, strings)

    def read_chunks(self, path: Path, columns: list[str], rows: int, total: int) -> Iterator[Any]:
        import cudf

        if self.io == "arrow":
            import pyarrow as pa
            import pyarrow.parquet as pq

            strings = dictionary_columns_of(self.spec, columns)
            try:
                parquet = pq.ParquetFile(path, read_dictionary=strings)
                for batch in parquet.iter_batches(batch_size=rows, columns=columns):
                    table = pa.Table.from_batches([batch]).unify_dictionaries()
                    yield cudf.DataFrame.from_arrow(table)
            except (OSError, pa.ArrowException) as exc:
                raise _unreadable(path, exc) from exc
            return
        for start in range(0, total, rows):
            try:
                frame = cudf.read_parquet(
                    str(path), columns=columns, skip_rows=start, nrows=min(rows, total - start)
                )
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise _unreadable(path, exc) from exc
            yield frame

    def _predict(self, matrix: Any) -> Any:
        import cupy

        scorer = self.bundle.scorer
        if isinstance(scorer, XGBoostScorer):
            out = scorer.booster.inplace_predict(matrix)
            return cupy.asarray(out).reshape(-1).astype(cupy.float32, copy=False)
        return cupy.asarray(scorer.predict_proba(cupy.asnumpy(matrix)), cupy.float32)

    def score(self, frame: Any) -> ScoredChunk:
        return _only_file(self.score_batch(frame, [0, len(frame)]))

    def score_batch(self, frame: Any, offsets: Sequence[int]) -> ScoredBatch:
        import cupy

        spec = self.spec
        if len(frame):
            matrix = self.transform.matrix(frame)
            probs = self._predict(matrix)
        else:
            matrix = cupy.zeros((0, len(spec.feature_names)), cupy.float32)
            probs = cupy.zeros(0, cupy.float32)
        labels = (probs >= self.bundle.threshold).astype(cupy.int8)
        stats = segment_stats(matrix, probs, labels, spec, offsets)
        ids = frame[spec.id_column].reset_index(drop=True)
        if self.io == "arrow":
            from tasks.gpu_features import to_host_pinned

            table = host_prediction_table(
                spec.id_column,
                host_ids(ids),
                to_host_pinned(probs),
                to_host_pinned(labels),  # the labels the positives were counted from
                self.model_name,
                self.model_version,
            )
        else:
            table = self._device_table(ids, probs, labels)
            if self._own_streams:
                # the writer's stream must not encode the table before it is complete, and the
                # input frame (freed on the reader's stream) must not be freed while read
                cupy.cuda.Stream.null.synchronize()
        return ScoredBatch(table, stats)

    def _device_table(self, ids: Any, probs: Any, labels: Any) -> Any:
        import cudf
        import cupy

        n = len(probs)
        return cudf.DataFrame(
            {
                self.spec.id_column: ids,
                SCORE_COLUMN: probs,
                LABEL_COLUMN: labels,
                MODEL_NAME_COLUMN: cudf.Series([self.model_name]).repeat(n).reset_index(drop=True),
                MODEL_VERSION_COLUMN: cupy.full(n, self.model_version, cupy.int64),
            },
            nan_as_null=False,  # as the host table: no NaN scan and device wait per batch
        )

    def open_sink(self, tmp_path: Path, fmt: OutputFormat) -> Sink:
        if self.io == "arrow":
            return ArrowSink(tmp_path, fmt, self.spec.id_column)
        return CudfSink(tmp_path, fmt, self.spec.id_column)

    def write_batch(
        self, table: Any, offsets: Sequence[int], paths: list[Path], fmt: OutputFormat
    ) -> None:
        id_column = self.spec.id_column
        if self.io == "arrow":
            write_arrow_segments(table, offsets, paths, fmt, id_column)
            return
        if self._own_streams:
            from tasks.gpu_io import write_parquet_on_stream

            delta = fmt.delta_columns(id_column, is_int64_dtype(table[id_column].dtype))
            write_parquet_on_stream(table, offsets, paths, fmt.compression, delta)
            return
        # one call: cuDF encodes every file's pages together on the device
        table.to_parquet(
            [str(p) for p in paths],
            partition_offsets=list(offsets),
            index=False,
            **fmt.cudf_options(id_column, table[id_column].dtype),
        )


def host_ids(ids: Any) -> Any:
    """A cuDF id column as an Arrow array, through pinned memory when it has no nulls."""
    import pyarrow as pa

    from tasks.gpu_features import to_host_pinned

    if ids.null_count:
        return ids.to_arrow()
    return pa.array(to_host_pinned(ids.values))


def host_prediction_table(
    id_column: str, ids: Any, probs: Any, labels: Any, model_name: str, model_version: int
) -> Any:
    """The predictions file's columns as a pyarrow Table, from host arrays (ids: Arrow array)."""
    import pyarrow as pa

    n = len(probs)
    return pa.table(
        {
            id_column: ids,
            SCORE_COLUMN: pa.array(probs, pa.float32()),
            LABEL_COLUMN: pa.array(labels, pa.int8()),
            # one string repeated: dictionary-encoded, so neither Arrow nor the parquet writer
            # handles n strings (a plain string column made the write 5x slower)
            MODEL_NAME_COLUMN: pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, np.int32)), pa.array([model_name], pa.string())
            ),
            MODEL_VERSION_COLUMN: pa.array(np.full(n, model_version, np.int64)),
        }
    )


class CudfSink:
    """Keeps a file's chunks of predictions on the device and writes them once at close (the
    predictions are a few bytes per row, far smaller than the raw chunks)."""

    def __init__(self, path: Path, fmt: OutputFormat, id_column: str) -> None:
        self.path = path
        self.fmt = fmt
        self.id_column = id_column
        self._frames: list[Any] = []

    def write(self, table: Any) -> None:
        self._frames.append(table)

    def close(self) -> None:
        import cudf

        frames = self._frames
        frame = frames[0] if len(frames) == 1 else cudf.concat(frames, ignore_index=True)
        options = self.fmt.cudf_options(self.id_column, frame[self.id_column].dtype)
        frame.to_parquet(str(self.path), index=False, **options)
        self._frames = []

    def abort(self) -> None:
        self._frames = []
        self.path.unlink(missing_ok=True)


def load_engine(job: ScoringJob, threads: int) -> Engine:
    """Load a bundle for scoring on this worker (call through `worker_cached`)."""
    bundle_dir = Path(job.bundle_dir)
    if job.device == "gpu":
        import cupy

        from tasks.backend import use_async_device_memory
        from tasks.gpu_features import DeviceTransform

        # a worker whose RMM resource nobody chose (an existing scheduler's plain workers, or
        # in-process scoring): cudaMallocAsync rather than a cudaMalloc/cudaFree per column
        use_async_device_memory()

        bundle = LoadedBundle.load(bundle_dir, job.scorer, device="cuda")
        transform = DeviceTransform(bundle.spec_dict, bundle.lookups, cupy)
        return GpuEngine(
            bundle, transform, job.model_name, job.model_version, job.gpu_io, job.gpu_streams
        )
    bundle = LoadedBundle.load(bundle_dir, job.scorer, device="cpu")
    # one worker per core: each model uses its worker's threads, not every core of the machine
    if isinstance(bundle.scorer, XGBoostScorer):
        bundle.scorer.booster.set_param({"nthread": threads})
    elif isinstance(bundle.scorer, OnnxScorer):
        meta = bundle.meta
        bundle.scorer = OnnxScorer.load(
            bundle_dir / meta["onnx_file"], meta["onnx_input"], meta["onnx_output"], threads
        )
    return CpuEngine(bundle, job.model_name, job.model_version)


def cached_engine(job: ScoringJob) -> Engine:
    """This worker's engine for the job's bundle, scorer and device, loaded on first use."""
    threads = worker_threads()
    key = ("engine", job.bundle_dir, job.scorer, job.device, job.gpu_io, job.gpu_streams, threads)
    return worker_cached(key, lambda: load_engine(job, threads))


# ---------------------------------------------------------------- the worker pipeline


@dataclass
class _Chunk:
    part: InputPartition
    frame: Any
    rows_in: int
    last: bool
    started: float


@dataclass
class _Bad:
    part: InputPartition
    reason: str
    rows: int
    started: float


@dataclass
class _Done:
    entry: ManifestEntry


@dataclass
class _Batch:
    """Consecutive whole files read as one frame that passed their checks: file i is rows
    offsets[i]:offsets[i + 1]."""

    parts: list[InputPartition]
    frame: Any
    offsets: list[int]
    started: float


_Item = _Chunk | _Bad | _Done | _Batch


def _rows_or_zero(path: Path, fmt: str) -> int:
    try:
        return count_rows(path, fmt)
    except (DataError, OSError, ValueError):
        return 0  # unreadable: the row count is unknown


def _checked_schema(
    path: Path, declared: str, roles: ColumnRoles
) -> tuple[TableFormat, Any, int, str | None]:
    """A file's format, its schema (an empty frame), its row count and why it cannot be scored,
    or None: the checks that read no data. A parquet file's footer is read once for all of
    them; a CSV file's rows are counted (a scan) only when it is quarantined here."""
    fmt: TableFormat = "parquet"
    rows = 0
    try:
        fmt = table_format(path, declared)
        if fmt == "parquet":
            footer = read_footer(path)
            schema, rows = footer.schema, footer.rows
        else:
            schema = peek_schema(path, fmt)
    except DataError as exc:
        return fmt, None, rows if fmt == "parquet" else _rows_or_zero(path, fmt), str(exc)
    problems = dtype_problems(schema, roles, path)
    if problems and fmt != "parquet":
        rows = _rows_or_zero(path, fmt)
    return fmt, schema, rows, "; ".join(problems) if problems else None


def _done(job: ScoringJob, part: InputPartition) -> _Done | None:
    """The file's manifest entry if an earlier attempt of this task committed it (on a worker
    that died afterwards)."""
    existing = read_entry(job.output_dir, part.path)
    if existing is not None and is_current(existing, part, job.model_name, job.model_version):
        return _Done(existing)
    return None


def read_partition(
    engine: Engine,
    job: ScoringJob,
    part: InputPartition,
    roles: ColumnRoles,
    checked: tuple[TableFormat, Any, int, str | None] | None = None,
) -> Iterator[_Chunk | _Bad]:
    """Check one input file and yield its chunks, or one `_Bad` with the quarantine reason.
    `checked`: the file's `_checked_schema`, when the caller has already read its footer.

    A `_Bad` can follow chunks already yielded (a read error midway): the file is then
    quarantined as a whole and its partial output discarded.
    """
    started = time.perf_counter()
    path = Path(part.path)
    fmt, _, rows, problem = checked or _checked_schema(path, job.data_format, roles)
    if problem is not None:
        yield _Bad(part, problem, rows, started)
        return
    columns = roles.columns
    total = rows if fmt == "parquet" else None
    try:
        if total is None or total <= job.partition_rows:
            frame = engine.read(path, fmt, columns, roles)
            problems = value_problems(frame, roles, path, unique_ids=True) if len(frame) else []
            if problems:
                yield _Bad(part, "; ".join(problems), len(frame), started)
            else:
                yield _Chunk(part, frame, len(frame), True, started)
            return
        # Too big to hold at once: check the ids of the whole file first, then stream chunks.
        id_col = roles.of("id")[0]
        ids = engine.read(path, fmt, [id_col], ColumnRoles({id_col: "id"}))
        problems = value_problems(ids, roles, path, unique_ids=True)
        del ids
        if problems:
            yield _Bad(part, "; ".join(problems), total, started)
            return
        previous = None
        for frame in engine.read_chunks(path, columns, job.partition_rows, total):
            if previous is not None:
                yield _Chunk(part, previous, total, False, started)
            previous = frame
        if previous is not None:
            yield _Chunk(part, previous, total, True, started)
    except DataError as exc:
        # a CSV file's rows are counted only now (a scan), so they are accounted as quarantined
        rows_in = total if total is not None else _rows_or_zero(path, fmt)
        yield _Bad(part, str(exc), rows_in, started)


def _read_items(
    engine: Engine, job: ScoringJob, parts: Sequence[InputPartition], roles: ColumnRoles
) -> Iterator[_Item]:
    for part in parts:
        done = _done(job, part)
        if done is not None:
            yield done
            continue
        yield from read_partition(engine, job, part, roles)


def _read_whole_file(
    engine: Engine, job: ScoringJob, part: InputPartition, roles: ColumnRoles
) -> list[_Item] | None:
    """All of one file's items, read on a pool thread; None for a file larger than one chunk,
    which the consumer streams itself so that memory stays bounded. The footer is read once,
    for the size check and the schema checks together."""
    done = _done(job, part)
    if done is not None:
        return [done]
    checked = _checked_schema(Path(part.path), job.data_format, roles)
    fmt, _, rows, problem = checked
    if problem is None and fmt == "parquet" and rows > job.partition_rows:
        return None
    return list(read_partition(engine, job, part, roles, checked))


def read_items_parallel(
    engine: Engine,
    job: ScoringJob,
    parts: Sequence[InputPartition],
    roles: ColumnRoles,
    threads: int,
) -> Iterator[_Item]:
    """`_read_items` with up to `threads` files read at once, items still yielded in input
    order. Files larger than one chunk are streamed in order, not read ahead whole."""
    if threads <= 1:
        yield from _read_items(engine, job, parts, roles)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gpupipe-read")
    pending: deque[tuple[InputPartition, Future[list[_Item] | None]]] = deque()
    upcoming = iter(parts)

    def submit_next() -> None:
        part = next(upcoming, None)
        if part is not None:
            pending.append((part, pool.submit(_read_whole_file, engine, job, part, roles)))

    try:
        for _ in range(threads):
            submit_next()
        while pending:
            part, future = pending.popleft()
            items = future.result()
            submit_next()
            if items is None:
                yield from _read_items(engine, job, [part], roles)
            else:
                yield from items
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Member:
    """A file planned into a batch: its row count (footer) and the dtype its ids declare."""

    part: InputPartition
    rows: int
    id_dtype: Any


def _batch_member(
    job: ScoringJob, part: InputPartition, roles: ColumnRoles, started: float
) -> _Member | _Bad | None:
    """The file as a batch member; its `_Bad` when a check that reads no data fails; None for a
    file that `read_partition` reads on its own (CSV, empty, larger than one chunk)."""
    path = Path(part.path)
    fmt, schema, rows, problem = _checked_schema(path, job.data_format, roles)
    if problem is not None:
        return _Bad(part, problem, rows, started)
    if fmt != "parquet":
        return None
    if not 0 < rows <= job.partition_rows:
        return None
    return _Member(part, rows, schema[roles.of("id")[0]].dtype)


def _ids_widened(read: Any, declared: Any) -> bool:
    """Whether integer ids came out as floats: pandas reads an integer column that holds nulls
    as float64 (unless the file's pandas metadata says Int64), so one file's null ids would give
    every file of its batch float ids and lose the digits of ids above 2**53. Such a batch is
    read again file by file, where `CpuEngine.read` reads them exactly (`exact_integer_ids`).
    cuDF keeps nullable integers."""
    return getattr(declared, "kind", None) in ("i", "u") and getattr(read, "kind", None) == "f"


def _read_batch(
    engine: Engine, job: ScoringJob, members: Sequence[_Member], roles: ColumnRoles
) -> Iterator[_Item]:
    """Read a batch's files with one engine call and check each file's ids: one `_Batch`, or,
    when a file fails, its `_Bad` and a `_Chunk` for each other file (in order).

    A batch that cannot be read as one (a corrupt page, schemas that do not combine) or whose ids
    changed type is read again file by file, so that each file is scored or quarantined exactly
    as it would be on its own.
    """
    started = time.perf_counter()
    parts = [m.part for m in members]
    offsets = list(accumulate((m.rows for m in members), initial=0))
    id_col = roles.of("id")[0]
    frame = None
    try:
        frame = engine.read_many([Path(p.path) for p in parts], roles.columns)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        log.info("%d file(s) from %s read one by one: %s", len(parts), parts[0].path, exc)
    if (
        frame is None
        or len(frame) != offsets[-1]
        or _ids_widened(frame[id_col].dtype, members[0].id_dtype)
    ):
        frame = None  # not held while the files are read again
        for part in parts:
            yield from read_partition(engine, job, part, roles)
        return
    if engine.is_key(frame[id_col]):
        yield _Batch(parts, frame, offsets, started)
        return
    # Missing or repeated ids somewhere: check each file's own (ids may repeat across files).
    pieces = [frame.iloc[a:b] for a, b in pairwise(offsets)]
    problems = [
        value_problems(piece, roles, Path(part.path), unique_ids=True)
        for part, piece in zip(parts, pieces, strict=True)
    ]
    if not any(problems):
        yield _Batch(parts, frame, offsets, started)
        return
    for member, piece, found in zip(members, pieces, problems, strict=True):
        if found:
            yield _Bad(member.part, "; ".join(found), member.rows, started)
        else:
            yield _Chunk(member.part, piece, member.rows, True, started)


@dataclass
class _Planned:
    """A batch of consecutive whole files to read as one (`_read_batch`)."""

    members: list[_Member]


@dataclass
class _Alone:
    """A file that `read_partition` reads on its own, in order (CSV, empty, larger than a chunk)."""

    part: InputPartition


def plan_batches(
    job: ScoringJob, parts: Sequence[InputPartition], roles: ColumnRoles
) -> Iterator[_Done | _Bad | _Planned | _Alone]:
    """What `read_items_batched` does with each of `parts`, from footers and the manifest only:
    files already done, or found bad without reading data, come at once (ahead of the batch being
    planned); batches hold parquet files of 1 to `partition_rows` rows whose ids declare one type,
    about `job.rows_per_batch` rows each; a file read alone comes after the batch before it."""
    batch: list[_Member] = []
    rows = 0
    for part in parts:
        done = _done(job, part)
        if done is not None:
            yield done
            continue
        member = _batch_member(job, part, roles, time.perf_counter())
        if isinstance(member, _Bad):
            yield member
            continue
        if batch and (member is None or member.id_dtype != batch[0].id_dtype):
            yield _Planned(batch)
            batch, rows = [], 0
        if member is None:
            yield _Alone(part)
            continue
        batch.append(member)
        rows += member.rows
        if rows >= job.rows_per_batch:
            yield _Planned(batch)
            batch, rows = [], 0
    if batch:
        yield _Planned(batch)


def read_items_batched(
    engine: Engine,
    job: ScoringJob,
    parts: Sequence[InputPartition],
    roles: ColumnRoles,
    threads: int = 1,
    owner: str = "",
) -> Iterator[_Item]:
    """The items of `parts`, consecutive whole files read together about `job.rows_per_batch`
    rows at a time (`plan_batches`), up to `threads` batches read at once on a pool of threads
    named after `owner` (each thread decodes on its own CUDA stream: tasks/gpu_io.py); items come
    in plan order, and a file read alone waits for the batches before it, so its rows stream in
    order with at most one batch (or chunk) of memory per reading thread.
    """
    planned = plan_batches(job, parts, roles)
    if threads <= 1:
        for step in planned:
            if isinstance(step, _Planned):
                yield from _read_batch(engine, job, step.members, roles)
            elif isinstance(step, _Alone):
                yield from read_partition(engine, job, step.part, roles)
            else:
                yield step
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"gpupipe-read[{owner}]")
    reading: deque[Future[list[_Item]]] = deque()

    def read_batch(members: list[_Member]) -> list[_Item]:
        return list(_read_batch(engine, job, members, roles))

    try:
        for step in planned:
            if isinstance(step, _Planned):
                if len(reading) >= threads:
                    yield from reading.popleft().result()
                reading.append(pool.submit(read_batch, step.members))
            elif isinstance(step, _Alone):
                while reading:
                    yield from reading.popleft().result()
                yield from read_partition(engine, job, step.part, roles)
            else:
                yield step
        while reading:
            yield from reading.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()


class _ReadAhead:
    """Runs an iterator in a background thread, `depth` items ahead of the consumer; its
    exceptions are re-raised in the consumer."""

    def __init__(self, items: Iterator[Any], depth: int, name: str) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._items = items
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:
            self._put(_Raised(exc))
        finally:
            # a generator stopped early runs its cleanup here, on this thread, now (a pool of
            # reading threads shuts down), not whenever it is garbage-collected
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=30)


@dataclass
class _Raised:
    exc: BaseException


class _FileWriter:
    """Writes one input file's predictions and manifest entry on its writer thread (`stripe`, a
    single-thread executor, so the file's chunks and commit run in order). In batch mode the
    engine writes the whole file to `tmp` itself (`add_written`) and this commits it."""

    def __init__(
        self,
        engine: Engine,
        job: ScoringJob,
        part: InputPartition,
        started: float,
        worker: str,
        stripe: ThreadPoolExecutor,
    ) -> None:
        self.engine = engine
        self.stripe = stripe
        self.worker = worker
        self.job = job
        self.part = part
        self.started = started
        self.out_dir = Path(job.output_dir)
        self.name = output_file_name(part, job.model_name, job.model_version)
        self.tmp = self.out_dir / f".{self.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.sink: Sink | None = None
        self.rows = 0
        self.positives = 0
        self.score_counts = np.zeros(len(SCORE_BIN_EDGES) + 1, np.int64)
        self.drift: Counts = {}
        self.write_error: str | None = None
        self.failed = False  # set by the scoring thread once a quarantine is queued

    def write(self, chunk: ScoredChunk) -> None:
        if self.write_error is not None:
            return
        try:
            if self.sink is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self.sink = self.engine.open_sink(self.tmp, self.job.output_format)
            self.sink.write(chunk.table)
        except DATA_ERRORS as exc:
            self.write_error = error_reason(self.part.path, exc)
            self.abort()
            return
        self.add_written(chunk.stats)

    def add_written(self, stats: ChunkStats) -> None:
        """Count predictions now in `tmp`: written by this writer's sink, or by the engine."""
        self.rows += stats.rows
        self.positives += stats.positives
        self.score_counts += stats.score_counts
        merge_counts(self.drift, stats.drift_counts)

    def commit(self, rows_in: int) -> ManifestEntry:
        if self.write_error is not None:
            return self.quarantine(self.write_error, rows_in)
        if self.rows != rows_in:
            self.abort()
            raise ScoringError(
                f"{self.part.path}: {self.rows} rows scored but {rows_in} rows read; not committing"
            )
        if self.sink is not None:  # None when the engine wrote `tmp` whole (batch mode)
            self.sink.close()
        final = self.out_dir / self.name
        os.replace(self.tmp, final)
        entry = scored_entry(
            self.part,
            self.job,
            output=self.name,
            rows=self.rows,
            positives=self.positives,
            score_counts=self.score_counts,
            drift_counts=self.drift,
            seconds=time.perf_counter() - self.started,
            worker=self.worker,
        )
        self._record(entry)
        return entry

    def quarantine(self, reason: str, rows: int) -> ManifestEntry:
        self.abort()
        entry = quarantine_entry(
            self.part, self.job, reason, rows, time.perf_counter() - self.started, self.worker
        )
        self._record(entry)
        return entry

    def _record(self, entry: ManifestEntry) -> None:
        """Manifest entry after the output file; then drop the file the entry used to point at."""
        previous = read_entry(self.out_dir, self.part.path)
        write_entry(self.out_dir, entry)
        if previous is not None and previous.output and previous.output != entry.output:
            (self.out_dir / previous.output).unlink(missing_ok=True)

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None
        self.tmp.unlink(missing_ok=True)


def commit_batch(
    writers: Sequence[_FileWriter], scored: ScoredBatch, offsets: Sequence[int]
) -> list[ManifestEntry]:
    """On a writer stripe: a batch's predictions files with one engine call, then each file's
    commit (rename, manifest entry) in order.

    A write that fails on the data quarantines every file of the batch (which file's rows broke
    it is unknown); any other failure removes the batch's temporary files and is raised.
    """
    engine = writers[0].engine
    try:
        try:
            writers[0].out_dir.mkdir(parents=True, exist_ok=True)
            fmt = writers[0].job.output_format
            engine.write_batch(scored.table, offsets, [w.tmp for w in writers], fmt)
        except DATA_ERRORS as exc:
            return [
                w.quarantine(error_reason(w.part.path, exc), stats.rows)
                for w, stats in zip(writers, scored.files, strict=True)
            ]
        entries = []
        for w, stats, (a, b) in zip(writers, scored.files, pairwise(offsets), strict=True):
            w.add_written(stats)
            entries.append(w.commit(b - a))
        return entries
    except BaseException:
        for w in writers:
            w.abort()  # idempotent: a committed file's temp name is already gone
        raise


def score_partitions(
    engine: Engine, job: ScoringJob, parts: Sequence[InputPartition], worker: str = ""
) -> list[ManifestEntry]:
    """Score input files in order with reading, scoring and writing overlapped; one manifest
    entry per file, in input order. With `job.rows_per_batch` set, whole files are read, scored
    and written in batches (a file that breaks its batch's scoring is then scored on its own)."""
    roles = scoring_roles(engine.spec)
    threads = job.file_threads
    # threads are named after the calling thread: two pipelines at once in one process (a dask
    # worker with several threads) keep apart the CUDA streams that tasks/gpu_io.py gives per
    # thread name
    owner = threading.current_thread().name
    if job.rows_per_batch > 0:
        # a multi-file read is parallel inside the engine; `batch_readers` batches at once
        items = read_items_batched(engine, job, parts, roles, job.batch_readers, owner)
    else:
        items = read_items_parallel(engine, job, parts, roles, threads)
    reader = _ReadAhead(items, READ_AHEAD, f"gpupipe-read-ahead[{owner}]")
    # one single-thread writer per stripe: a file's chunks and commit stay in order on its stripe
    stripes = [
        ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gpupipe-write-{i}[{owner}]")
        for i in range(threads)
    ]
    pending: deque[Future[ManifestEntry | list[ManifestEntry] | None]] = deque()
    open_files: dict[str, _FileWriter] = {}
    files_opened = 0
    results: list[ManifestEntry] = []

    def collect(limit: int) -> None:
        while len(pending) > limit:
            done = pending.popleft().result()
            if isinstance(done, ManifestEntry):
                results.append(done)
            elif done:
                results.extend(done)

    def next_stripe() -> ThreadPoolExecutor:
        nonlocal files_opened
        files_opened += 1
        return stripes[(files_opened - 1) % len(stripes)]

    def handle(item: _Chunk | _Bad) -> None:
        path = item.part.path
        fw = open_files.get(path)
        if fw is None:
            fw = _FileWriter(engine, job, item.part, item.started, worker, next_stripe())
            open_files[path] = fw
        if isinstance(item, _Bad):
            del open_files[path]
            if not fw.failed:
                pending.append(fw.stripe.submit(fw.quarantine, item.reason, item.rows))
            return
        if fw.failed:
            if item.last:
                del open_files[path]
            return
        try:
            scored = engine.score(item.frame)
        except DATA_ERRORS as exc:
            fw.failed = True
            pending.append(fw.stripe.submit(fw.quarantine, error_reason(path, exc), item.rows_in))
            if item.last:
                del open_files[path]
            return
        pending.append(fw.stripe.submit(fw.write, scored))
        if item.last:
            del open_files[path]
            pending.append(fw.stripe.submit(fw.commit, item.rows_in))

    def handle_batch(item: _Batch) -> None:
        try:
            scored = engine.score_batch(item.frame, item.offsets)
        except DATA_ERRORS:
            # some file's values break scoring: score file by file, quarantining only that one
            for part, (a, b) in zip(item.parts, pairwise(item.offsets), strict=True):
                handle(_Chunk(part, item.frame.iloc[a:b], b - a, True, item.started))
            return
        stripe = next_stripe()
        writers = [_FileWriter(engine, job, p, item.started, worker, stripe) for p in item.parts]
        pending.append(stripe.submit(commit_batch, writers, scored, item.offsets))

    try:
        for item in reader:
            if isinstance(item, _Done):
                results.append(item.entry)
            elif isinstance(item, _Batch):
                handle_batch(item)
            else:
                handle(item)
            collect(WRITE_BEHIND * threads)
        collect(0)
    except BaseException:
        reader.close()
        for stripe in stripes:
            stripe.shutdown(wait=True, cancel_futures=True)
        for fw in open_files.values():
            fw.abort()
        raise
    reader.close()
    for stripe in stripes:
        stripe.shutdown(wait=True)
    order = {p.path: i for i, p in enumerate(parts)}
    return sorted(results, key=lambda e: order[e.input])


def score_group(job: ScoringJob, parts: Sequence[InputPartition]) -> list[dict[str, Any]]:
    """The dask task: score a group of input files on this worker; manifest entries as JSON."""
    engine = cached_engine(job)
    # the worker's name is only known on this thread, not on the reader and writer threads
    entries = score_partitions(engine, job, parts, worker=worker_name())
    return [e.model_dump() for e in entries]


# ---------------------------------------------------------------- the driver


ProgressCallback = Callable[[RunTotals, int, int], None]


@dataclass
class ProgressThrottle:
    """When a run's progress is worth publishing: the first and the last update, and between
    them at most one per `interval_s` (0: every one).

    Publishing a Prefect artifact update is an API round trip (about 30 ms against the embedded
    server) made on the thread that collects finished dask tasks, so a run of many small tasks
    spent its time publishing (docs/benchmarks.md, eleventh session).
    """

    interval_s: float
    last_s: float | None = None

    def due(self, done: int, total: int, now_s: float) -> bool:
        if done < total and self.last_s is not None and now_s - self.last_s < self.interval_s:
            return False
        self.last_s = now_s
        return True


@dataclass
class ClusterRun:
    totals: RunTotals
    workers: int
    tasks: int
    seconds_scoring: float


def run_on_cluster(
    client: Any,
    job: ScoringJob,
    todo: Sequence[InputPartition],
    *,
    files_per_task: int = 0,
    on_progress: ProgressCallback | None = None,
) -> ClusterRun:
    """Submit groups of input files to the cluster and account for each entry as it completes.

    Every group runs to completion even if another fails (its files are then committed and a
    retry skips them); failures are raised together at the end.
    """
    from distributed import as_completed

    workers = worker_count(client)
    n_groups = task_count(job, todo, workers, thread_count(client), files_per_task)
    groups = group_partitions(todo, n_groups)
    log.info(
        "scoring %d file(s) in %d dask task(s) on %d worker(s)", len(todo), len(groups), workers
    )
    started = time.perf_counter()
    futures = [
        client.submit(score_group, job, group, key=f"score-{job.run_id}-{i}-{uuid.uuid4().hex[:6]}")
        for i, group in enumerate(groups)
    ]
    totals = RunTotals()
    errors: list[BaseException] = []
    files_done = 0
    for future in as_completed(futures):
        try:
            entries = future.result()
        except Exception as exc:
            errors.append(exc)
            continue
        finally:
            future.release()
        for raw in entries:
            totals.add(ManifestEntry.model_validate(raw))
        files_done += len(entries)
        if on_progress is not None:
            on_progress(totals, files_done, len(todo))
    seconds = time.perf_counter() - started
    if errors:
        raise ScoringError(
            f"{len(errors)} of {len(groups)} scoring task(s) failed; first: "
            f"{type(errors[0]).__name__}: {errors[0]}"
        ) from errors[0]
    return ClusterRun(totals, workers, len(groups), seconds)
