"""What a fresh GPU worker spends before its first scored file: imports, CUDA start, loading the
bundle and the transform, and the first file (kernels compiled or loaded from disk caches).

    python bench/profile_gpu_worker_start.py --work /tmp/gpupipe-bench-scoring

Run it in a fresh process (that is the point); uses what bench/bench_scoring.py left in --work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench-scoring"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    steps: dict[str, float] = {}
    t = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        steps[name] = round(now - t, 3)
        t = now

    import cupy

    mark("import cupy")
    cupy.cuda.Device(0).synchronize()
    cupy.zeros(1)
    mark("CUDA context")
    import cudf  # noqa: F401

    mark("import cudf")
    import xgboost  # noqa: F401

    mark("import xgboost")
    import torch  # noqa: F401

    mark("import torch")
    from tasks.scoring import ScoringJob, load_engine, partition_of, score_partitions

    mark("import tasks.scoring")
    bundle = sorted(b.parent for b in args.work.glob("bundle-*/**/bundle.json"))[0]
    files = sorted(args.work.glob("input-*/part-*.parquet"))[:3]
    job = ScoringJob(
        bundle_dir=str(bundle),
        model_name="m",
        model_version=1,
        scorer="xgboost",
        device="gpu",
        output_dir="/tmp/gpupipe-worker-start",
        partition_rows=10**9,
    )
    engine = load_engine(job, threads=1)
    mark("load bundle + transform")
    for i, f in enumerate(files):
        score_partitions(
            engine,
            job.model_copy(update={"output_dir": f"{job.output_dir}/{i}"}),
            [partition_of(f)],
        )
        cupy.cuda.Device().synchronize()
        mark(f"file {i + 1}")
    steps["total"] = round(sum(steps.values()), 3)
    print(json.dumps(steps, indent=2))
    if args.out:
        args.out.write_text(json.dumps(steps, indent=2))


if __name__ == "__main__":
    main()
