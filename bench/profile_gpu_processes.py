"""Several scoring processes on one GPU: does a second (third, fourth) process overlap one
process's host work (file reads, parquet encode, disk writes) with another's GPU work?

    python bench/profile_gpu_processes.py --work /tmp/gpupipe-bench-scoring --processes 1,2,3,4

For each count K, K spawned processes each load the bundle, score one file untimed (kernel
caches, memory pool), then all start together on a barrier and run the worker pipeline
(`tasks.scoring.score_partitions`, batch mode as a dask worker runs it) over every K-th input
file, twice. The second pass is timed (the first fills the kernels' per-size caches); rows/s is
all rows over the span from the first start to the last finish. No dask or Prefect: this
measures the GPU-sharing effect alone. Inputs and bundle are bench/bench_scoring.py's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PASSES = 2


def score_share(
    index: int,
    processes: int,
    device: str,
    files: list[str],
    bundle_dir: str,
    out_root: str,
    barrier: Any,
    results: Any,
) -> None:
    """One process's share: files[index::processes], scored PASSES times after a warm-up."""
    from tasks.cluster import cpu_count
    from tasks.scoring import ScoringJob, load_engine, partition_of, score_partitions

    mine = [partition_of(Path(f)) for f in files[index::processes]]
    rows_per_file = _rows(files[0])

    def job(tag: str) -> ScoringJob:
        return ScoringJob(
            bundle_dir=bundle_dir,
            model_name="bench-xgboost",
            model_version=1,
            scorer="xgboost",
            device=device,  # type: ignore[arg-type]
            output_dir=str(Path(out_root) / f"k{processes}-{tag}"),
            partition_rows=rows_per_file,
        )

    engine = load_engine(job("warm"), threads=max(1, cpu_count() // processes))
    score_partitions(engine, job(f"warm-{index}"), mine[:1])
    passes = []
    for n in range(PASSES):
        barrier.wait()
        t0 = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
        entries = score_partitions(engine, job(f"pass{n}"), mine)
        t1 = time.monotonic()
        passes.append((t0, t1, sum(e.rows_scored for e in entries)))
    results.put((index, passes))


def _rows(path: str) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)


def run(
    processes: int, device: str, files: list[Path], bundle: Path, out_root: Path
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    shutil.rmtree(out_root, ignore_errors=True)
    procs = [
        ctx.Process(
            target=score_share,
            args=(
                i,
                processes,
                device,
                [str(f) for f in files],
                str(bundle),
                str(out_root),
                barrier,
                results,
            ),
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    report: dict[str, Any] = {"processes": processes}
    for n in range(PASSES):
        starts = [passes[n][0] for _, passes in got]
        ends = [passes[n][1] for _, passes in got]
        rows = sum(passes[n][2] for _, passes in got)
        span = max(ends) - min(starts)
        report[f"pass{n}"] = {
            "rows": rows,
            "seconds": span,
            "rows_per_s": rows / span,
            "per_process_seconds": sorted(e - s for s, e in zip(starts, ends, strict=True)),
        }
    shutil.rmtree(out_root, ignore_errors=True)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench-scoring"))
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--processes", default="1,2,3,4")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="cpu: a smoke test")
    p.add_argument("--tmp", type=Path, default=Path("/tmp/gpupipe-profile-processes"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from profile_gpu_batched import prepare

    files, bundle = prepare(args.work, args.rows, args.files, args.device)
    reports = []
    for k in (int(x) for x in args.processes.split(",")):
        t0 = time.perf_counter()
        r = run(k, args.device, files, bundle, args.tmp)
        r["wall_seconds_with_startup"] = time.perf_counter() - t0
        reports.append(r)
        last = r[f"pass{PASSES - 1}"]
        print(
            f"{k} process(es): {last['seconds']:.3f} s, {last['rows_per_s'] / 1e6:.1f}M rows/s "
            f"(pass 0: {r['pass0']['rows_per_s'] / 1e6:.1f}M)",
            flush=True,
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "rows": args.rows,
                    "files": args.files,
                    "cores": os.cpu_count(),
                    "timed_pass": PASSES - 1,
                    "by_processes": reports,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
