"""CUDA activity of the GPU ETL's feature write (torch.profiler / CUPTI): the synthetic 20M-row
feature table of profile_gpu_etl_write.py written per split by cuDF, after a warm-up write; the
kernels, memory copies and host calls summed by name, and the wall time, so the write's
0.6-0.7 s can be split into device work, copies and the rest.

    python bench/trace_gpu_etl_write.py --rows 20000000 --out /tmp/trace.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_gpu_etl_write import SPLITS, feature_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench-etl-trace"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import cupy
    from torch.profiler import ProfilerActivity, profile

    table, split = feature_table(args.rows)
    parts = {s: table[split == code] for code, s in enumerate(SPLITS)}

    def write() -> float:
        shutil.rmtree(args.work, ignore_errors=True)
        cupy.cuda.runtime.deviceSynchronize()
        t = time.perf_counter()
        for s, frame in parts.items():
            (args.work / s).mkdir(parents=True, exist_ok=True)
            frame.to_parquet(args.work / s / "part.0.parquet", index=False)
        cupy.cuda.runtime.deviceSynchronize()
        return time.perf_counter() - t

    warm = [write(), write()]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        traced = write()
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"us": 0.0, "n": 0})
    for e in prof.events():
        kind = str(e.device_type).rsplit(".", 1)[-1]
        us = e.device_time_total if kind == "CUDA" else e.cpu_time_total
        key = f"{kind}: {e.name[:90]}"
        totals[key]["us"] += float(us)
        totals[key]["n"] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1]["us"])[:40]
    report = {
        "rows": args.rows,
        "untraced_seconds": [round(w, 4) for w in warm],
        "traced_seconds": round(traced, 4),
        "top": [{"name": k, "ms": round(v["us"] / 1000, 2), "n": int(v["n"])} for k, v in ranked],
    }
    for row in report["top"]:
        print(f"{row['ms']:9.2f} ms {row['n']:6d}  {row['name']}")
    print("untraced", report["untraced_seconds"], "traced", report["traced_seconds"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
