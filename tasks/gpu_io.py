"""Parquet decoded and encoded by libcudf on a CUDA stream of the calling thread's own.

A GPU scoring worker reads the next batch on one thread, transforms and predicts on another, and
writes finished batches on a third. Through `cudf.read_parquet` and `DataFrame.to_parquet` every
libcudf call goes to the legacy default stream, and XGBoost's per-thread stream synchronises with
that stream: the next batch's decompression, the previous batch's compression and this batch's
predict then queue behind each other, and the H100 was idle half of a scoring run
(bench/results/2026-11-23_h100_profile_gpu_timeline_20M.json). Here each reading or writing
thread gets a non-blocking stream, and hands its data over only after that stream is
synchronised, so nothing crosses streams while it is still being produced.

Memory: buffers that libcudf allocates here are freed on the stream they were allocated on. The
streams therefore live as long as the process (they are never destroyed while a buffer might
still name them), and a frame read here is released only after the consumer's work on it has
finished (`GpuEngine.score_batch` synchronises the default stream before it returns).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

_streams: dict[str, Any] = {}
_streams_lock = threading.Lock()


def thread_stream() -> Any:
    """This thread's non-blocking CUDA stream (an `rmm` Stream), made on first use and kept
    for the life of the process. Threads of the same name share one: thread names in the scoring
    pipeline are reused run after run, so the streams stay a handful."""
    from rmm.pylibrmm.stream import CudaStreamFlags, Stream

    name = threading.current_thread().name
    with _streams_lock:
        stream = _streams.get(name)
        if stream is None:
            stream = Stream(flags=CudaStreamFlags.NON_BLOCKING)
            _streams[name] = stream
    return stream


def read_parquet_on_stream(paths: Sequence[Path], columns: list[str]) -> Any:
    """`columns` of parquet `paths` (concatenated in order) as one cuDF frame with a
    RangeIndex, decoded on this thread's stream, which is synchronised before returning."""
    import cudf
    import pylibcudf as plc

    options = (
        plc.io.parquet.ParquetReaderOptions.builder(plc.io.SourceInfo([str(p) for p in paths]))
        .use_pandas_metadata(False)
        .build()
    )
    options.set_column_names(list(columns))
    stream = thread_stream()
    table = plc.io.parquet.read_parquet(options, stream=stream)
    stream.synchronize()
    return cudf.DataFrame.from_pylibcudf(table)


def is_key_on_stream(ids: Any) -> bool:
    """Whether a cuDF Series has no missing value and no value twice, checked on this thread's
    stream.

    The null count is known without a kernel. The repeats come from libcudf's hash-based
    distinct indices, whose count libcudf reads back on this stream; `Series.duplicated()` would
    launch its kernels on the legacy default stream and so wait behind scoring's work there.
    Float ids (rare) are checked by cuDF as before, where a NaN counts as missing.
    """
    if ids.null_count:
        return False
    if ids.dtype.kind == "f":
        from tasks.scoring import column_is_key  # the engines' check (loaded: it calls this)

        return column_is_key(ids)
    if len(ids) < 2:
        return True
    import pylibcudf as plc
    from cudf.core.column import access_columns

    column = ids._column
    stream = thread_stream()
    with access_columns(column, mode="read", scope="internal"):  # not spilled while read
        distinct = plc.stream_compaction.distinct_indices(
            plc.Table([column.plc_column]),
            plc.stream_compaction.DuplicateKeepOption.KEEP_ANY,
            plc.types.NullEquality.EQUAL,
            plc.types.NanEquality.ALL_EQUAL,
            stream=stream,
        )
        stream.synchronize()
    return bool(distinct.size() == len(ids))


def write_parquet_on_stream(
    frame: Any,
    offsets: Sequence[int],
    paths: Sequence[Path],
    compression: str,
    delta_columns: Sequence[str] = (),
) -> None:
    """Rows `offsets[i]:offsets[i+1]` of a cuDF `frame` to `paths[i]`, one call, encoded and
    compressed on this thread's stream; returns when every file is written. The
    `delta_columns` (integers) are stored DELTA_BINARY_PACKED.

    The frame's columns must be complete on the stream that made them (the caller synchronised
    it). No index and no pandas metadata are written; column names and types are the frame's.
    """
    if len(offsets) != len(paths) + 1 or any(b < a for a, b in pairwise(offsets)):
        raise ValueError(
            f"{len(paths)} output file(s) need {len(paths) + 1} non-decreasing row offsets, "
            f"got {list(offsets)}"
        )
    import pylibcudf as plc
    from cudf.core.column import access_columns

    codec = getattr(plc.io.types.CompressionType, compression.upper())
    columns = list(frame._columns)
    # as cuDF's own writer does: the columns cannot be spilled to host memory while libcudf
    # reads them
    with access_columns(*columns, mode="read", scope="internal"):
        table = plc.Table([c.plc_column for c in columns])
        metadata = plc.io.types.TableInputMetadata(table)
        for i, name in enumerate(frame._column_names):
            metadata.column_metadata[i].set_name(str(name))
            if name in delta_columns:
                metadata.column_metadata[i].set_encoding(
                    plc.io.types.ColumnEncoding.DELTA_BINARY_PACKED
                )
        options = (
            plc.io.parquet.ParquetWriterOptions.builder(
                plc.io.SinkInfo([str(p) for p in paths]), table
            )
            .metadata(metadata)
            .compression(codec)
            .utc_timestamps(False)  # as cuDF's to_parquet: timestamps stay naive
            .build()
        )
        options.set_partitions(
            [plc.io.types.PartitionInfo(int(a), int(b - a)) for a, b in pairwise(offsets)]
        )
        stream = thread_stream()
        plc.io.parquet.write_parquet(options, stream=stream)
        stream.synchronize()
