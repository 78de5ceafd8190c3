"""What a batch-scoring flow run costs besides scoring: many small files on a running CPU
cluster whose workers already hold the model, so the flow's fixed and per-file costs (Prefect,
MLflow, manifest, fingerprints, summary) dominate. Times `--runs` flow runs, the flow's own
scoring phase in each, and one more run under cProfile (the driver process only).

    python bench/profile_flow_overhead.py --files 200 --rows-per-file 1000 --out /tmp/o.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from flows.cli import cli_prefect_settings

    with cli_prefect_settings():  # the flow runs here as `gpupipe score` runs it
        profile_flow_runs()


def profile_flow_runs() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--rows-per-file", type=int, default=1000)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(".gpupipe/bench-flow-overhead"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import bench_scoring as bs

    from tasks.backend import resolve_backend
    from tasks.cluster import dask_client
    from tasks.config import load_config
    from tasks.scoring import scoring_cluster_config

    rows = args.files * args.rows_per_file
    scoring_args = bs.parse_args(
        [
            f"--rows={rows}",
            f"--files={args.files}",
            "--trees=20",
            "--depth=6",
            "--train-rows=50000",
            f"--workers={args.workers}",
            f"--work={args.work}",
        ]
    )
    scoring_args.partition_rows = args.rows_per_file
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    files = bs.make_inputs(work, rows, args.files, scoring_args.unique_rows, 0)
    config, _ = bs.build_champion(scoring_args, work)
    bs.warm_prefect()
    cfg = load_config(config, bs.flow_overrides(scoring_args))
    runs: list[dict[str, Any]] = []
    with dask_client(scoring_cluster_config(cfg, "cpu"), resolve_backend("cpu")) as client:
        address = client.scheduler.address
        inputs = files[0].parent
        secs, _ = bs.run_flow(scoring_args, config, inputs, work / "out-first", address)
        print(f"first run (model load) {secs:.2f}s")
        for i in range(args.runs):
            secs, summary = bs.run_flow(scoring_args, config, inputs, work / f"out-{i}", address)
            runs.append(
                {
                    "seconds": round(secs, 4),
                    "seconds_scoring": summary["seconds_scoring"],
                    "rows_scored": summary["rows"]["scored"],
                }
            )
            print(f"run {i}: {secs:.2f}s, scoring phase {summary['seconds_scoring']:.2f}s")
        profiler = cProfile.Profile()
        t = time.perf_counter()
        profiler.enable()
        bs.run_flow(scoring_args, config, inputs, work / "out-profiled", address)
        profiler.disable()
        profiled = time.perf_counter() - t
    text: dict[str, str] = {}
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(70)
        text[key] = buf.getvalue()
    print(text["cumulative"][:9000])
    report = {
        "files": args.files,
        "rows_per_file": args.rows_per_file,
        "runs": runs,
        "profiled_seconds": round(profiled, 4),
        "profile": text,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
