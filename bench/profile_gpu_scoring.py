"""Where the time goes when one GPU scores files: each step timed with a device sync, the parquet
read/write alternatives side by side, and the worker pipeline (`score_partitions`, no dask or
Prefect) with each I/O mode and number of files in flight.

    python bench/profile_gpu_scoring.py --work /tmp/gpupipe-bench-scoring --files 8

Uses the inputs and the champion bundle that bench/bench_scoring.py left in --work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def score_partitions_rate(job: Any, parts: list[Any], total_rows: int) -> float:
    """rows/s of the worker pipeline (`score_partitions`, no dask or Prefect) for `job` over
    `parts`, after an untimed first file (kernels, pools) whose output is then removed."""
    import cupy

    from tasks.scoring import load_engine, score_partitions

    sync = cupy.cuda.Device().synchronize
    engine = load_engine(job, threads=1)
    score_partitions(engine, job, parts[:1])
    shutil.rmtree(job.output_dir, ignore_errors=True)
    sync()
    t = time.perf_counter()
    entries = score_partitions(engine, job, parts)
    sync()
    secs = time.perf_counter() - t
    assert sum(e.rows_scored for e in entries) == total_rows, entries
    return total_rows / secs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench-scoring"))
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--threads", default="1,4,8")
    p.add_argument(
        "--batch-rows",
        default="1,0",
        help="scoring.batch_rows values for the pipeline: 1 = one file per batch, 0 = GPU default",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import cudf
    import cupy
    import pyarrow.parquet as pq

    from tasks.bundle import LoadedBundle
    from tasks.gpu_features import DeviceTransform, preprocess, time_feature_columns, timestamps_us
    from tasks.io import value_problems
    from tasks.scoring import (
        ScoringJob,
        host_prediction_table,
        partition_of,
        scoring_roles,
        segment_stats,
    )

    bundle_dirs = sorted(b.parent for b in args.work.glob("bundle-*/**/bundle.json"))
    files = sorted(args.work.glob("input-*/part-*.parquet"))[: args.files]
    bundle = LoadedBundle.load(bundle_dirs[0], "xgboost", device="cuda")
    spec = bundle.spec_dict
    cols = bundle.spec.raw_columns
    transform = DeviceTransform(spec, bundle.lookups, cupy)
    booster = bundle.scorer.booster  # type: ignore[attr-defined]
    roles = scoring_roles(bundle.spec)
    sync = cupy.cuda.Device().synchronize
    times: dict[str, list[float]] = defaultdict(list)
    tmp = Path("/tmp/gpupipe-profile")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def step(name: str, fn: Callable[..., Any], *a: Any, **k: Any) -> Any:
        sync()
        t = time.perf_counter()
        out = fn(*a, **k)
        sync()
        times[name].append(time.perf_counter() - t)
        return out

    def arrow_read(path: Path) -> Any:
        return cudf.DataFrame.from_arrow(pq.read_table(path, columns=cols))

    def device_output(ids: Any, probs: Any, labels: Any) -> Any:
        n = len(ids)
        return cudf.DataFrame(
            {
                "id": ids,
                "score": probs,
                "label": labels,
                "model_name": cudf.Series(["m"]).repeat(n).reset_index(drop=True),
                "model_version": cupy.full(n, 1, cupy.int64),
            }
        )

    def host_output(ids: Any, probs: Any, labels: Any) -> Any:
        return host_prediction_table("id", ids.to_arrow(), probs.get(), labels.get(), "m", 1)

    for i, f in enumerate([files[0], *files]):
        frame = step("read: cudf.read_parquet", cudf.read_parquet, str(f), columns=cols)
        step("read: pyarrow + from_arrow", arrow_read, f)
        step("read: pyarrow only (host)", pq.read_table, f, columns=cols)
        step("check ids (value_problems)", value_problems, frame, roles, f, unique_ids=True)
        step(
            "features: time",
            lambda fr: time_feature_columns(
                timestamps_us(fr[spec["timestamp_column"]]), spec["time_features"], cupy
            ),
            frame,
        )
        for entity, keys, stats in transform.entities:
            step(
                f"features: entity {entity['key']}",
                transform._entity_columns,
                frame,
                entity,
                keys,
                stats,
            )
        for j, feat in enumerate(spec["categorical"]):
            step(
                f"features: category {feat['name']}",
                transform.vocabularies[j].positions,
                frame[feat["name"]],
                cupy,
            )
        numeric, codes = step("features: all columns", transform.feature_columns, frame)
        matrix = step(
            "fused preprocess kernel",
            preprocess,
            numeric,
            codes,
            transform.kernel,
            transform.kernel_host,
            cupy,
        )
        probs = step(
            "predict", lambda m: cupy.asarray(booster.inplace_predict(m)).reshape(-1), matrix
        )
        labels = (probs >= bundle.threshold).astype(cupy.int8)
        step(
            "chunk statistics (drift, scores)",
            segment_stats,
            matrix,
            probs,
            labels,
            bundle.spec,
            [0, len(probs)],
        )
        ids = frame[bundle.spec.id_column].reset_index(drop=True)
        device_table = step("output: cuDF frame", device_output, ids, probs, labels)
        host_table = step("output: to host + Arrow table", host_output, ids, probs, labels)
        for comp in ("snappy", None):
            step(
                f"write: cuDF to_parquet {comp}",
                device_table.to_parquet,
                str(tmp / f"c-{comp}-{i}.parquet"),
                index=False,
                compression=comp,
            )
            step(
                f"write: pyarrow {comp}",
                pq.write_table,
                host_table,
                str(tmp / f"a-{comp}-{i}.parquet"),
                compression=comp or "none",
            )
        if i == 0:
            times.clear()  # the first file warms up kernels and pools
    rows = len(frame)
    steps = {k: {"median_ms": 1000 * sorted(v)[len(v) // 2], "n": len(v)} for k, v in times.items()}
    for k, v in steps.items():
        print(f"{k:40} {v['median_ms']:9.2f} ms")
    print(f"rows per file: {rows:,}")

    # Many files at once: aggregate read throughput of each reader with N threads.
    concurrent: dict[str, float] = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        for name, fn in (
            ("cudf.read_parquet", lambda f: cudf.read_parquet(str(f), columns=cols)),
            ("pyarrow + from_arrow", arrow_read),
        ):
            sync()
            t = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                frames = list(pool.map(fn, files))
            sync()
            secs = time.perf_counter() - t
            key = f"read {name} x{threads} threads"
            concurrent[key] = sum(len(fr) for fr in frames) / secs
            print(f"{key:40} {concurrent[key] / 1e6:8.1f} M rows/s")
            del frames

    # The worker pipeline itself: score_partitions, each I/O mode, number of files in flight (the
    # writer stripes in batch mode) and batch size.
    pipeline: dict[str, float] = {}
    parts = [partition_of(f) for f in files]
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    runs = [
        (io, int(threads), int(batch_rows))
        for io in ("cudf", "arrow")
        for threads in args.threads.split(",")
        for batch_rows in args.batch_rows.split(",")
    ]
    for io, threads, batch_rows in runs:
        out = tmp / f"pipe-{io}-{threads}-{batch_rows}"
        job = ScoringJob(
            bundle_dir=str(bundle_dirs[0]),
            model_name="m",
            model_version=1,
            scorer="xgboost",
            device="gpu",
            output_dir=str(out),
            partition_rows=10**9,
            io_threads=threads,
            gpu_io=io,  # type: ignore[arg-type]
            batch_rows=batch_rows,
        )
        key = f"score_partitions io={io} files_in_flight={threads} batch_rows={batch_rows}"
        pipeline[key] = score_partitions_rate(job, parts, total)
        print(f"{key:60} {pipeline[key] / 1e6:8.1f} M rows/s")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "rows_per_file": rows,
                    "files": len(files),
                    "steps": steps,
                    "concurrent_read_rows_per_s": concurrent,
                    "score_partitions_rows_per_s": pipeline,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
