"""Whole files in batches on one GPU: how the per-row cost of each scoring step falls as more
files go through one cuDF read, one transform, one predict and one multi-file write, and what a
three-thread pipeline (read | score | write) over such batches reaches.

    python bench/profile_gpu_batched.py --work /tmp/gpupipe-bench-scoring --batches 1,2,4,8,20

Prepares (or reuses) the inputs and champion bundle of bench/bench_scoring.py in --work.
`--spill` turns on cuDF spilling and `--rmm-pool SIZE` an RMM pool, as a dask-cuda worker
would have them, to see what each costs.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def prepare(work: Path, rows: int, files: int, device: str = "gpu") -> tuple[list[Path], Path]:
    import bench_scoring

    args = bench_scoring.parse_args(
        ["--device", device, "--rows", str(rows), "--files", str(files), "--work", str(work)]
    )
    paths = bench_scoring.make_inputs(work, rows, files, args.unique_rows, args.seed)
    _, bundle = bench_scoring.build_champion(args, work)
    return paths, bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench-scoring"))
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--batches", default="1,2,4,8,20", help="files per batch to try")
    p.add_argument("--pipelined", default="1,4,8", help="files per batch, three-thread pipeline")
    p.add_argument(
        "--pipeline",
        default="cudf:0,arrow:0,cudf:8000000,cudf:20000000,arrow:8000000",
        help="score_partitions runs, io:batch_rows (empty: none)",
    )
    p.add_argument("--spill", action="store_true", help="cuDF spilling on (as dask-cuda sets)")
    p.add_argument("--rmm-pool", default="", help="RMM pool size, e.g. 40GB (off by default)")
    p.add_argument("--rmm-async", action="store_true", help="RMM on cudaMallocAsync")
    p.add_argument("--compression", default=None, help="output compression (default: gpupipe's)")
    p.add_argument("--tmp", type=Path, default=Path("/tmp/gpupipe-profile-batched"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    files, bundle_dir = prepare(args.work, args.rows, args.files)
    if args.rmm_pool:
        import rmm

        rmm.reinitialize(pool_allocator=True, initial_pool_size=args.rmm_pool)
    if args.rmm_async:
        import rmm

        rmm.mr.set_current_device_resource(rmm.mr.CudaAsyncMemoryResource())
    import cudf
    import cupy

    if args.spill:
        cudf.set_option("spill", True)

    from tasks.bundle import LoadedBundle
    from tasks.gpu_features import DeviceTransform
    from tasks.scoring import OUTPUT_COMPRESSION, segment_stats

    bundle = LoadedBundle.load(bundle_dir, "xgboost", device="cuda")
    spec = bundle.spec
    cols = spec.raw_columns
    transform = DeviceTransform(bundle.spec_dict, bundle.lookups, cupy)
    booster = bundle.scorer.booster  # type: ignore[attr-defined]
    sync = cupy.cuda.Device().synchronize
    tmp = args.tmp
    compression = args.compression or OUTPUT_COMPRESSION
    if compression.lower() == "none":
        compression = None
    total_rows = 0

    def output_frame(ids: Any, probs: Any, labels: Any) -> Any:
        n = len(ids)
        name = cudf.Series(["bench-xgboost"]).repeat(n).reset_index(drop=True)
        return cudf.DataFrame(
            {
                spec.id_column: ids.reset_index(drop=True),
                "score": probs,
                "label": labels,
                "model_name": name,
                "model_version": cupy.full(n, 1, cupy.int64),
            }
        )

    def read(batch: list[Path]) -> tuple[Any, list[int]]:
        frame = cudf.read_parquet([str(f) for f in batch], columns=cols)
        return frame, []

    def per_file_stats(matrix: Any, probs: Any, labels: Any, offsets: list[int]) -> list[Any]:
        return segment_stats(matrix, probs, labels, spec, offsets)

    def score(frame: Any, offsets: list[int]) -> Any:
        matrix = transform.matrix(frame)
        probs = cupy.asarray(booster.inplace_predict(matrix)).reshape(-1).astype(cupy.float32)
        labels = (probs >= bundle.threshold).astype(cupy.int8)
        per_file_stats(matrix, probs, labels, offsets)
        return output_frame(frame[spec.id_column], probs, labels)

    def write(table: Any, offsets: list[int], paths: list[str]) -> None:
        table.to_parquet(paths, partition_offsets=offsets, index=False, compression=compression)

    import pyarrow.parquet as pq

    counts = {f: pq.ParquetFile(f).metadata.num_rows for f in files}
    total_rows = sum(counts.values())

    def offsets_of(batch: list[Path]) -> list[int]:
        out = [0]
        for f in batch:
            out.append(out[-1] + counts[f])
        return out

    def batches_of(size: int) -> list[list[Path]]:
        return [files[i : i + size] for i in range(0, len(files), size)]

    def out_paths(batch: list[Path], tag: str) -> list[str]:
        d = tmp / tag
        d.mkdir(parents=True, exist_ok=True)
        return [str(d / f.name) for f in batch]

    # warm-up: kernels, pools, the parquet reader and writer
    shutil.rmtree(tmp, ignore_errors=True)
    frame, _ = read(files[:1])
    off = offsets_of(files[:1])
    write(score(frame, off), off, out_paths(files[:1], "warm"))
    del frame
    sync()

    steps: dict[str, dict[str, float]] = {}
    for size in [int(b) for b in args.batches.split(",")]:
        times: dict[str, float] = defaultdict(float)

        def step(name: str, fn: Callable[..., Any], *a: Any, _t: Any = times) -> Any:
            sync()
            t = time.perf_counter()
            out = fn(*a)
            sync()
            _t[name] += time.perf_counter() - t
            return out

        for batch in batches_of(size):
            off = offsets_of(batch)
            frame, _ = step("read (cudf, one call)", read, batch)
            matrix = step("transform (features + kernel)", transform.matrix, frame)
            probs = step(
                "predict",
                lambda m: cupy.asarray(booster.inplace_predict(m)).reshape(-1),
                matrix,
            ).astype(cupy.float32)
            labels = (probs >= bundle.threshold).astype(cupy.int8)
            step("statistics per file", per_file_stats, matrix, probs, labels, off)
            table = step("output frame", output_frame, frame[spec.id_column], probs, labels)
            step("write (cudf, one call)", write, table, off, out_paths(batch, f"seq-{size}"))
        total = sum(times.values())
        row = {k: round(1000 * v / (total_rows / 1e6), 3) for k, v in times.items()}
        row["total_ms_per_1M_rows"] = round(1000 * total / (total_rows / 1e6), 3)
        row["rows_per_s_sequential"] = total_rows / total
        steps[f"{size} file(s) per batch"] = row
        print(f"{size:3d} files/batch: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))

    pipelined: dict[str, float] = {}
    for size in [int(b) for b in args.pipelined.split(",")]:
        read_q: queue.Queue[Any] = queue.Queue(maxsize=1)
        write_q: queue.Queue[Any] = queue.Queue(maxsize=2)
        batches = batches_of(size)

        def reader(bs: list[list[Path]] = batches, q: queue.Queue[Any] = read_q) -> None:
            for batch in bs:
                q.put((batch, read(batch)[0]))
            q.put(None)

        def writer(q: queue.Queue[Any] = write_q, tag: str = f"pipe-{size}") -> None:
            while (item := q.get()) is not None:
                batch, table = item
                write(table, offsets_of(batch), out_paths(batch, tag))

        sync()
        t = time.perf_counter()
        threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
        for th in threads:
            th.start()
        while (item := read_q.get()) is not None:
            batch, frame = item
            write_q.put((batch, score(frame, offsets_of(batch))))
        write_q.put(None)
        for th in threads:
            th.join()
        sync()
        secs = time.perf_counter() - t
        pipelined[f"{size} file(s) per batch"] = total_rows / secs
        print(f"pipelined {size:3d} files/batch: {total_rows / secs / 1e6:8.1f} M rows/s")

    # The worker pipeline itself (score_partitions: manifest, quarantine checks, atomic outputs)
    from profile_gpu_scoring import score_partitions_rate

    from tasks.scoring import ScoringJob, partition_of

    worker: dict[str, float] = {}
    parts = [partition_of(f) for f in files]
    for item in filter(None, args.pipeline.split(",")):
        io, batch_rows = item.split(":")
        out = tmp / f"score-partitions-{io}-{batch_rows}"
        job = ScoringJob(
            bundle_dir=str(bundle_dir),
            model_name="bench-xgboost",
            model_version=1,
            scorer="xgboost",
            device="gpu",
            output_dir=str(out),
            partition_rows=max(counts.values()),
            gpu_io=io,  # type: ignore[arg-type]
            batch_rows=int(batch_rows),
        )
        rate = score_partitions_rate(job, parts, total_rows)
        worker[f"io={io} batch_rows={batch_rows}"] = rate
        print(f"score_partitions io={io} batch_rows={batch_rows}: {rate / 1e6:.1f} M rows/s")

    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "rows": total_rows,
                    "files": len(files),
                    "spill": args.spill,
                    "rmm_pool": args.rmm_pool,
                    "rmm_async": args.rmm_async,
                    "kvikio_nthreads": os.environ.get("KVIKIO_NTHREADS", ""),
                    "ms_per_1M_rows_by_batch": steps,
                    "pipelined_rows_per_s": pipelined,
                    "score_partitions_rows_per_s": worker,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
