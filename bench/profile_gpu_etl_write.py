"""Where the GPU ETL's feature write goes: writer options, one call vs one per split, threads
(on the legacy default stream, or each on its own stream), and the bounds (device-to-host copy and a plain host file write of the same bytes).

A synthetic feature table shaped like the ETL's (20M rows: 18 float32 model inputs of low, mid
and high cardinality, an int64 id and an int8 target; splits 70/15/15) is written as the ETL
writes it, one variant after another in one process (median of --repeats).

    python bench/profile_gpu_etl_write.py --rows 20000000 --out /tmp/etl_write.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SPLITS = ("train", "valid", "test")


def feature_table(rows: int) -> tuple[Any, Any]:
    """(table, split codes) with the ETL's column kinds; rows ordered as read (splits mixed)."""
    import cudf
    import cupy

    rng = cupy.random.default_rng(0)
    data: dict[str, Any] = {}
    for j in range(6):  # raw numerics and z-scores: nearly all values distinct
        data[f"dense_{j}"] = rng.standard_normal(rows, dtype=cupy.float32)
    for j in range(8):  # entity statistics: one value per entity (100k entities)
        table = rng.standard_normal(100_000, dtype=cupy.float32)
        data[f"entity_{j}"] = table[rng.integers(0, 100_000, rows)]
    for j in range(4):  # encoded categories and time features: a few values
        data[f"code_{j}"] = rng.integers(0, 24, rows).astype(cupy.float32)
    data["id"] = cupy.arange(rows, dtype=cupy.int64)
    data["target"] = (rng.random(rows) < 0.01).astype(cupy.int8)
    split = cupy.searchsorted(cupy.asarray([0.7, 0.85]), rng.random(rows)).astype(cupy.int8)
    return cudf.DataFrame(data), split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench-etl-write"))
    p.add_argument("--shm", type=Path, default=Path("/dev/shm/gpupipe-bench-etl-write"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="only the ETL's way and the copy bound")
    p.add_argument("--only", default="", help="comma-separated parts of the variant labels to run")
    args = p.parse_args()

    import cupy
    import cupyx
    import numpy as np

    table, split = feature_table(args.rows)
    parts = {s: table[split == code] for code, s in enumerate(SPLITS)}
    order = cupy.argsort(split, kind="stable")
    by_split = table.take(order).reset_index(drop=True)
    counts = [int((split == code).sum()) for code in range(len(SPLITS))]
    offsets = [0, counts[0], counts[0] + counts[1], args.rows]

    def per_split(root: Path, **options: Any) -> None:
        for s, frame in parts.items():
            (root / s).mkdir(parents=True, exist_ok=True)
            frame.to_parquet(root / s / "part.0.parquet", index=False, **options)

    def threaded(root: Path, **options: Any) -> None:
        def one(item: tuple[str, Any]) -> None:
            (root / item[0]).mkdir(parents=True, exist_ok=True)
            item[1].to_parquet(root / item[0] / "part.0.parquet", index=False, **options)

        with ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(one, parts.items()))

    def one_call(root: Path) -> None:
        paths = []
        for s in SPLITS:
            (root / s).mkdir(parents=True, exist_ok=True)
            paths.append(str(root / s / "part.0.parquet"))
        by_split.to_parquet(paths, partition_offsets=offsets, index=False)

    def host_bounds(root: Path) -> None:
        host = {name: cupy.asnumpy(col.values) for name, col in table.items()}
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "raw.bin", "wb") as fh:
            for values in host.values():
                fh.write(np.ascontiguousarray(values).data)

    def copy_only(root: Path) -> None:
        _ = [cupy.asnumpy(col.values) for _, col in table.items()]

    pinned = {name: cupyx.empty_pinned(len(col), col.dtype) for name, col in table.items()}

    def copy_pinned(root: Path) -> None:  # into page-locked buffers allocated before the clock
        for name, col in table.items():
            col.values.get(out=pinned[name])

    low_cardinality = [f"code_{j}" for j in range(4)]
    split_floats = {
        name: "BYTE_STREAM_SPLIT" for name in table.columns if name.startswith(("dense", "entity"))
    }

    def host_write(
        root: Path, *, pinned: bool, dictionary: bool | list[str], cold_pool: bool = False
    ) -> None:
        """Each split in 1M-row files, one task per file on 16 threads: copy the rows' columns
        to host (pinned or pageable), then encode and write them with pyarrow."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if cold_pool:  # pay the page-locking of fresh pinned memory inside the clock
            cupy.get_default_pinned_memory_pool().free_all_blocks()
        rows_per_file = 1_000_000
        tasks = []
        for s, frame in parts.items():
            (root / s).mkdir(parents=True, exist_ok=True)
            for i, start in enumerate(range(0, len(frame), rows_per_file)):
                tasks.append((frame, root / s / f"part.{i:03d}.parquet", start))

        def one(task: tuple[Any, Path, int]) -> None:
            frame, path, start = task
            arrays = {}
            for name, col in frame.items():
                values = col.values[start : start + rows_per_file]
                if pinned:
                    host = cupyx.empty_pinned(values.shape, values.dtype)
                    values.get(out=host)
                else:
                    host = cupy.asnumpy(values)
                arrays[name] = host
            pq.write_table(pa.table(arrays), path, use_dictionary=dictionary)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, tasks))

    def own_streams(root: Path, threads: int) -> None:
        """The splits as files of about rows / threads rows, in row order, written from
        `threads` threads that each encode on their own CUDA stream
        (`tasks.gpu_io.write_parquet_on_stream`, as scoring's writers do): the files' encodes,
        device-to-host copies and file writes can overlap, where cuDF's `to_parquet` runs them
        one after another on the legacy default stream. (Tried in the ETL in the thirteenth
        session and left out: no faster.)"""
        from tasks.gpu_io import write_parquet_on_stream

        rows_per_file = -(-args.rows // threads)
        jobs = []
        for s, frame in parts.items():
            (root / s).mkdir(parents=True, exist_ok=True)
            for i, start in enumerate(range(0, len(frame), rows_per_file)):
                stop = min(start + rows_per_file, len(frame))
                jobs.append((frame, start, stop, root / s / f"part.{i}.parquet"))
        cupy.cuda.runtime.deviceSynchronize()  # the frames are complete before other streams

        def one(job: tuple[Any, int, int, Path]) -> None:
            frame, start, stop, path = job
            write_parquet_on_stream(frame, [start, stop], [path], "snappy")

        with ThreadPoolExecutor(threads, thread_name_prefix=f"etl-write-{threads}") as pool:
            list(pool.map(one, jobs))

    big_row_groups = {"row_group_size_rows": 5_000_000, "row_group_size_bytes": 1 << 30}
    big_pages = {"max_page_size_rows": 1_000_000, "max_page_size_bytes": 8 << 20}

    variants: list[tuple[str, Path, Callable[[Path], None]]] = [
        ("per split (as the ETL writes)", args.work, lambda r: per_split(r)),
        ("per split, uncompressed", args.work, lambda r: per_split(r, compression=None)),
        ("per split, no dictionary", args.work, lambda r: per_split(r, use_dictionary=False)),
        ("per split, no statistics", args.work, lambda r: per_split(r, statistics="NONE")),
        ("per split, zstd", args.work, lambda r: per_split(r, compression="ZSTD")),
        ("per split, lz4", args.work, lambda r: per_split(r, compression="LZ4")),
        (
            "per split, zstd + byte-stream-split floats",
            args.work,
            lambda r: per_split(r, compression="ZSTD", column_encoding=split_floats),
        ),
        (
            "per split, snappy + byte-stream-split floats",
            args.work,
            lambda r: per_split(r, column_encoding=split_floats),
        ),
        (
            "per split, id delta-encoded (the ETL since the fourteenth session)",
            args.work,
            lambda r: per_split(r, column_encoding={"id": "DELTA_BINARY_PACKED"}),
        ),
        (
            "splits in 3 threads, id delta-encoded",
            args.work,
            lambda r: threaded(r, column_encoding={"id": "DELTA_BINARY_PACKED"}),
        ),
        ("per split, to /dev/shm", args.shm, lambda r: per_split(r)),
        ("per split, 5M-row row groups", args.work, lambda r: per_split(r, **big_row_groups)),
        ("per split, 1M-row / 8 MiB pages", args.work, lambda r: per_split(r, **big_pages)),
        (
            "per split, both",
            args.work,
            lambda r: per_split(r, **big_row_groups, **big_pages),
        ),
        ("splits in 3 threads", args.work, threaded),
        (
            "host: pinned copy + pyarrow, 1M-row files on 16 threads",
            args.work,
            lambda r: host_write(r, pinned=True, dictionary=True),
        ),
        (
            "host: same, dictionary for low-cardinality columns only",
            args.work,
            lambda r: host_write(r, pinned=True, dictionary=low_cardinality),
        ),
        (
            "host: same, pinned pool emptied before each run",
            args.work,
            lambda r: host_write(r, pinned=True, dictionary=low_cardinality, cold_pool=True),
        ),
        (
            "host: pageable copy, dictionary for low-cardinality only",
            args.work,
            lambda r: host_write(r, pinned=False, dictionary=low_cardinality),
        ),
        ("one call, partition_offsets", args.work, one_call),
        ("own streams: files on 3 threads", args.work, lambda r: own_streams(r, 3)),
        ("own streams: files on 6 threads", args.work, lambda r: own_streams(r, 6)),
        ("own streams: files on 10 threads", args.work, lambda r: own_streams(r, 10)),
        ("bound: copy to host only", args.work, copy_only),
        ("bound: copy into pinned host buffers", args.work, copy_pinned),
        ("bound: copy + raw host file write", args.work, host_bounds),
    ]
    if args.quick:
        variants = [variants[0], variants[-3]]
    if args.only:
        wanted = args.only.split(",")
        variants = [v for v in variants if any(w in v[0] for w in wanted)]
    report: dict[str, Any] = {
        "rows": args.rows,
        "columns": len(table.columns),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("KVIKIO", "LIBCUDF"))},
        "variants": {},
    }
    for label, root, fn in variants:
        times = []
        try:
            for _ in range(args.repeats + 1):  # the first run is a warm-up
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
                cupy.cuda.runtime.deviceSynchronize()
                t = time.perf_counter()
                fn(root)
                cupy.cuda.runtime.deviceSynchronize()
                times.append(time.perf_counter() - t)
        except Exception as exc:  # a writer option this cuDF refuses: say so, go on
            report["variants"][label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{label}: {report['variants'][label]}", flush=True)
            continue
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        report["variants"][label] = {
            "seconds": round(statistics.median(times[1:]), 4),
            "bytes_per_row": round(size / args.rows, 2),
        }
        print(f"{label}: {report['variants'][label]}", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
