"""One ETL code path for two kinds of table: a dask DataFrame (partitions, a cluster, many GPUs)
or one in-memory pandas/cuDF frame (the single-device path).

Each helper does the dask thing to a dask collection and the direct thing to a concrete frame, so
`tasks.etl` is written once and runs either way. On one GPU the direct way skips dask's graph
building, tokenizing and scheduling, which cost more than the cuDF work itself (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask
from dask.base import is_dask_collection

from tasks.config import EtlFrames
from tasks.gpu_features import is_cudf

PART_FILE = "part.0.parquet"  # the name dask gives the first partition's file
# The parquet encoding of integer ids in every file gpupipe writes (features, raw test split,
# predictions), for cuDF's and pyarrow's writers alike.
DELTA_ENCODING = "DELTA_BINARY_PACKED"


def is_lazy(value: Any) -> bool:
    """True for a dask collection (work still to be scheduled), False for concrete data."""
    return bool(is_dask_collection(value))


def computed(*values: Any) -> tuple[Any, ...]:
    """The values, computed together (one dask graph) where any of them is lazy."""
    if any(is_lazy(v) for v in values):
        return tuple(dask.compute(*values))
    return values


def compute(value: Any) -> Any:
    return value.compute() if is_lazy(value) else value


def persisted(frame: Any) -> Any:
    return frame.persist() if is_lazy(frame) else frame


def map_frame(frame: Any, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """fn applied to each partition (dask; its output schema is fn of the empty frame) or to the
    whole frame (in memory)."""
    if is_lazy(frame):
        return frame.map_partitions(fn, **kwargs, meta=fn(frame._meta, **kwargs))
    return fn(frame, **kwargs)


def write_parquet_dir(frame: Any, directory: Path, *, delta: Sequence[str] = ()) -> None:
    """The frame as parquet files in `directory` without its index: one file per partition
    (dask) or one file (in memory), named as dask names them so readers see one layout.

    Columns in `delta` (integer ids) are written DELTA_BINARY_PACKED: `delta_encoding`."""
    sample = frame._meta if is_lazy(frame) else frame
    options = delta_encoding(list(sample.columns), delta, cudf_writer=is_cudf(sample))
    if is_lazy(frame):
        frame.to_parquet(str(directory), write_index=False, **options)
        return
    directory.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(directory / PART_FILE, index=False, **options)


def delta_encoding(
    columns: Sequence[str], delta: Sequence[str], *, cudf_writer: bool
) -> dict[str, Any]:
    """Writer options that store the `delta` columns DELTA_BINARY_PACKED, for cuDF's writer or
    pyarrow's (which must also be told to leave them out of dictionary encoding).

    An increasing integer id, the usual case, then costs a few bits per row instead of about
    4 bytes (plain, snappy) and is not hashed for a dictionary it never gets (a unique column
    overflows the dictionary; pyarrow tries one anyway: 25% of the CPU write of a 700k-row
    feature file). Any integers round-trip exactly either way."""
    chosen = [c for c in delta if c in columns]
    if not chosen:
        return {}
    encoding = dict.fromkeys(chosen, DELTA_ENCODING)
    if cudf_writer:
        return {"column_encoding": encoding}
    return {"column_encoding": encoding, "use_dictionary": [c for c in columns if c not in chosen]}


def is_int64_dtype(dtype: Any) -> bool:
    """Whether a NumPy, pandas or cuDF column dtype is 64-bit signed integers (nullable ones
    included): the id type written delta-encoded, tested through every writer."""
    return getattr(dtype, "kind", None) == "i" and getattr(dtype, "itemsize", 0) == 8


# Peak device memory of the in-memory ETL over the raw columns' bytes: the raw table, its
# derived features, the model matrix and the per-split copies written out are alive together.
SINGLE_FRAME_MEMORY_FACTOR = 8


def use_single_frame(
    choice: EtlFrames,
    *,
    device: str,
    gpu_count: int,
    table_bytes: int,
    free_device_bytes: int,
) -> tuple[bool, str]:
    """Whether the ETL holds its table as one in-memory frame, and why.

    `auto` does on exactly one GPU when SINGLE_FRAME_MEMORY_FACTOR x the raw columns' bytes fit
    in the GPU's free memory: there dask's per-task overhead dominates. Otherwise dask's
    partitions: every CPU core, several GPUs, or a table larger than one GPU (partitions spill).
    """
    if choice != "auto":
        return choice == "single", f"etl_frames = {choice!r}"
    if device != "gpu":
        return False, "on CPU dask partitions use every core"
    if gpu_count != 1:
        return False, f"{gpu_count} GPUs visible: dask-cuDF partitions span them"
    need = SINGLE_FRAME_MEMORY_FACTOR * table_bytes
    if need > free_device_bytes:
        return False, (
            f"~{need / 2**30:.1f} GiB needed in memory, {free_device_bytes / 2**30:.1f} GiB free "
            "on the GPU: dask-cuDF partitions (they spill)"
        )
    return True, (
        f"one GPU with {free_device_bytes / 2**30:.1f} GiB free for ~{need / 2**30:.1f} GiB: "
        "one in-memory cuDF frame"
    )
