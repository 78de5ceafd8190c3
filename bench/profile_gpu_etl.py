"""Where the GPU ETL's time goes: stage timings of two runs per way of holding the table
(`etl_frames`: one cuDF frame or dask partitions), side by side, and a cProfile of the second run
of the first way, on generated data.

    python bench/profile_gpu_etl.py --rows 20000000 --out /tmp/etl_profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--warmup-rows", type=int, default=200_000)
    p.add_argument("--device", default="gpu")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench"))
    p.add_argument(
        "--frames", default="auto,dask", help="etl_frames values to time, comma-separated"
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--profile-first",
        action="store_true",
        help="profile the first full-size run (where one-off compiles show) instead of the second",
    )
    args = p.parse_args()

    from tasks.backend import resolve_backend
    from tasks.config import builtin_config
    from tasks.etl import run_etl
    from tasks.generate import generate_transactions

    backend = resolve_backend(args.device)
    report: dict[str, object] = {"rows": args.rows, "device": backend.device}
    frames = args.frames.split(",")
    # a small warm-up, then per way of holding the table a cold-ish and a warm run (profiled
    # for the first way): side by side in one process, on the same files
    runs = [("warmup", args.warmup_rows, frames[0], False)]
    for i, choice in enumerate(frames):
        runs += [
            (f"{choice}_1", args.rows, choice, i == 0 and args.profile_first),
            (f"{choice}_2", args.rows, choice, i == 0 and not args.profile_first),
        ]
    for label, rows, choice, profiled in runs:
        data = args.work / f"data-{rows}"
        generate_transactions(rows, data, seed=0, rows_per_file=min(rows, 1_000_000))
        home = args.work / f"profile-etl-{label}"
        shutil.rmtree(home, ignore_errors=True)
        cfg = builtin_config(data, home).model_copy(update={"etl_frames": choice})
        prof = cProfile.Profile() if profiled else None
        t = time.perf_counter()
        if prof:
            prof.enable()
        out = run_etl(cfg, backend, home / "etl")
        if prof:
            prof.disable()
        secs = time.perf_counter() - t
        stages = json.loads((out.root / "etl.json").read_text())["stage_seconds"]
        report[label] = {"rows": rows, "frames": choice, "seconds": secs, "stage_seconds": stages}
        print(f"{label}: {rows:,} rows in {secs:.2f} s; stages {stages}", flush=True)
        shutil.rmtree(home, ignore_errors=True)
        if prof:
            for key in ("cumulative", "tottime"):
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(45)
                text = buf.getvalue()
                print(text[-9000:])
                report[f"profile_{key}"] = text
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
