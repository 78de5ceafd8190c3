"""Where one GPU scoring process spends its time: the CUDA activity of the worker pipeline.

    python bench/profile_gpu_timeline.py --work /tmp/gpupipe-bench-scoring --rows 20000000

Runs `tasks.scoring.score_partitions` (batch mode, as a GPU dask worker runs it) over the scoring
bench's files: once to warm up, once timed, once under torch.profiler. torch.profiler records, via
CUPTI, every kernel and copy of the process (cuDF's, XGBoost's, CuPy's, Triton's), not only
torch's. The host side is timed by wrapping the engine's read, score and write calls, per thread.

Reported: wall time; GPU busy time as the union of kernel intervals, of copy intervals, and of
both; the top kernels and copies by total time; the streams used; each step's host time per
thread. A GPU busy nearly all the wall time means the pipeline is bound by GPU work; a GPU idle
much of it means host work (parquet bytes, disk, Python) or waiting is the bound.
Nothing here needs nsys, which the lent machine does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

Interval = tuple[float, float]


def union_seconds(intervals: Iterable[Interval]) -> float:
    """Total length covered by possibly overlapping [start, end) intervals (same unit)."""
    total = 0.0
    end = float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def gpu_activity(trace: dict[str, Any]) -> dict[str, Any]:
    """Summarise a Chrome trace from torch.profiler: device kernels and copies (microseconds)."""
    kernels: list[Interval] = []
    copies: list[Interval] = []
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_copy: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0.0])
    streams: dict[str, float] = defaultdict(float)
    for ev in trace.get("traceEvents", []):
        cat = ev.get("cat", "")
        if ev.get("ph") != "X" or cat not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        start, dur = float(ev["ts"]), float(ev.get("dur", 0.0))
        args = ev.get("args", {})
        streams[str(args.get("stream", "?"))] += dur
        if cat == "kernel":
            kernels.append((start, start + dur))
            k = by_kernel[ev.get("name", "?")[:120]]
            k[0] += dur
            k[1] += 1
        else:
            copies.append((start, start + dur))
            c = by_copy[ev.get("name", cat)[:60]]
            c[0] += dur
            c[1] += 1
            c[2] += float(args.get("bytes", 0))
    everything = kernels + copies
    span = (
        (max(b for _, b in everything) - min(a for a, _ in everything)) / 1e6 if everything else 0
    )
    top_kernels = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "gpu_first_to_last_s": span,
        "kernel_busy_s": union_seconds(kernels) / 1e6,
        "copy_busy_s": union_seconds(copies) / 1e6,
        "any_busy_s": union_seconds(everything) / 1e6,
        "kernel_sum_s": sum(b - a for a, b in kernels) / 1e6,
        "kernels": len(kernels),
        "copies": len(copies),
        "top_kernels": [
            {"name": n, "seconds": v[0] / 1e6, "count": int(v[1])} for n, v in top_kernels
        ],
        "copies_by_kind": {
            n: {
                "seconds": v[0] / 1e6,
                "count": int(v[1]),
                "GB": v[2] / 1e9,
                "GB_per_s": (v[2] / 1e9 / (v[0] / 1e6) if v[0] else 0.0),
            }
            for n, v in sorted(by_copy.items(), key=lambda kv: -kv[1][0])
        },
        "seconds_by_stream": {
            s: v / 1e6 for s, v in sorted(streams.items(), key=lambda kv: -kv[1])
        },
    }


class StepClock:
    """Host time of wrapped calls, per (thread name, step)."""

    def __init__(self) -> None:
        self.spans: dict[tuple[str, str], list[Interval]] = defaultdict(list)
        self._lock = threading.Lock()

    def wrap(
        self, step: str, fn: Callable[..., Any], sync: Callable[[], None] | None = None
    ) -> Callable[..., Any]:
        """fn timed under `step`; with `sync`, the device is synchronised before the clock stops
        (the step's span then includes the GPU work it queued, and what was queued before it)."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if sync is not None:
                    sync()
                with self._lock:
                    self.spans[(threading.current_thread().name, step)].append(
                        (t, time.perf_counter())
                    )

        return timed

    def report(self, wall: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            f"{thread} / {step}": {
                "calls": len(s),
                "seconds": sum(b - a for a, b in s),
                "share_of_wall": sum(b - a for a, b in s) / wall,
            }
            for (thread, step), s in sorted(self.spans.items())
        }
        by_step: dict[str, list[Interval]] = defaultdict(list)
        for (_, step), s in self.spans.items():
            by_step[step].extend(s)
        steps = sorted(by_step)
        # time two steps ran at once: A + B - (A or B)
        for i, a in enumerate(steps):
            for b in steps[i + 1 :]:
                both = (
                    union_seconds(by_step[a])
                    + union_seconds(by_step[b])
                    - union_seconds(by_step[a] + by_step[b])
                )
                out[f"overlap {a} + {b}"] = {"seconds": both, "share_of_wall": both / wall}
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench-scoring"))
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--batch-rows", type=int, default=0, help="0 = the GPU default")
    p.add_argument("--output-root", type=Path, default=Path("/tmp/gpupipe-profile-timeline"))
    p.add_argument("--trace", type=Path, default=None, help="also keep the Chrome trace here")
    p.add_argument("--no-trace", action="store_true", help="time only (no torch.profiler run)")
    p.add_argument("--prepare-only", action="store_true", help="make the inputs and bundle, exit")
    p.add_argument(
        "--sync-substeps",
        action="store_true",
        help="synchronise the device at the end of each sub-step of scoring (transform, predict, "
        "statistics, output table): each span then holds its own GPU work",
    )
    p.add_argument(
        "--no-gpu-streams",
        action="store_true",
        help="scoring.gpu_streams = false: batches decoded and encoded on the default stream",
    )
    p.add_argument(
        "--transform-steps",
        action="store_true",
        help="also time the transform's parts: feature columns (time features, entity and key "
        "lookups, string lookups) and the fused kernel, each on the host unless --sync-substeps",
    )
    p.add_argument(
        "--read-threads",
        type=int,
        default=0,
        help="scoring.batch_read_threads: batches decoded at once (0 = the GPU default)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from profile_gpu_batched import prepare

    files, bundle = prepare(args.work, args.rows, args.files)
    if args.prepare_only:
        return

    import cupy

    from tasks.scoring import ScoringJob, load_engine, partition_of, score_partitions

    parts = [partition_of(f) for f in files]
    import pyarrow.parquet as pq

    rows_per_file = max(int(pq.read_metadata(f).num_rows) for f in files)

    def job(tag: str) -> ScoringJob:
        return ScoringJob(
            bundle_dir=str(bundle),
            model_name="bench-xgboost",
            model_version=1,
            scorer="xgboost",
            device="gpu",
            output_dir=str(args.output_root / tag),
            partition_rows=rows_per_file,
            batch_rows=args.batch_rows,
            gpu_streams=not args.no_gpu_streams,
            **({"batch_read_threads": args.read_threads} if args.read_threads else {}),
        )

    shutil.rmtree(args.output_root, ignore_errors=True)
    engine = load_engine(job("warm"), threads=1)
    clock = StepClock()
    sync = cupy.cuda.Device().synchronize
    for step in ("read_many", "is_key", "score_batch", "write_batch"):
        if hasattr(engine, step):  # is_key: not in trees before the ninth session (A/B runs)
            setattr(engine, step, clock.wrap(step, getattr(engine, step)))
    # score_batch's sub-steps, and the commit after each batch write
    import tasks.scoring as scoring

    sub_sync = sync if args.sync_substeps else None
    transform = engine.transform  # type: ignore[attr-defined]
    transform.matrix = clock.wrap("  transform", transform.matrix, sub_sync)
    engine._predict = clock.wrap("  predict", engine._predict, sub_sync)  # type: ignore[attr-defined]
    engine._device_table = clock.wrap(  # type: ignore[attr-defined]
        "  output table",
        engine._device_table,
        sub_sync,  # type: ignore[attr-defined]
    )
    scoring.segment_stats = clock.wrap("  statistics", scoring.segment_stats, sub_sync)
    if args.transform_steps:
        import tasks.gpu_features as gf

        transform.feature_columns = clock.wrap(
            "    feature columns", transform.feature_columns, sub_sync
        )
        gf.preprocess = clock.wrap("    fused kernel", gf.preprocess, sub_sync)
        gf.time_feature_columns = clock.wrap(
            "      time features", gf.time_feature_columns, sub_sync
        )
        gf.DeviceTransform._entity_columns = clock.wrap(  # type: ignore[method-assign]
            "      entity columns", gf.DeviceTransform._entity_columns, sub_sync
        )
        gf.KeyIndex._numeric_positions = clock.wrap(  # type: ignore[method-assign]
            "        numeric key lookup", gf.KeyIndex._numeric_positions, sub_sync
        )
        gf.KeyIndex._string_positions = clock.wrap(  # type: ignore[method-assign]
            "        string key lookup", gf.KeyIndex._string_positions, sub_sync
        )
    scoring.commit_batch = clock.wrap("commit_batch (write + manifest)", scoring.commit_batch)

    def timed_run(tag: str) -> float:
        sync()
        t = time.perf_counter()
        entries = score_partitions(engine, job(tag), parts)
        sync()
        secs = time.perf_counter() - t
        assert sum(e.rows_scored for e in entries) == args.rows, "rows lost"
        return secs

    timed_run("warm")
    clock.spans.clear()
    wall = timed_run("timed")
    report: dict[str, Any] = {
        "rows": args.rows,
        "files": len(files),
        "sync_substeps": args.sync_substeps,
        "gpu_streams": not args.no_gpu_streams,
        "read_threads": args.read_threads or "default",
        "env": {k: v for k, v in os.environ.items() if k.startswith(("CUDF_", "CUPY_", "KVIKIO"))},
        "output_root": str(args.output_root),
        "timed": {"seconds": wall, "rows_per_s": args.rows / wall, "steps": clock.report(wall)},
    }
    print(f"timed: {wall:.3f} s, {args.rows / wall / 1e6:.1f}M rows/s", flush=True)
    for k, v in report["timed"]["steps"].items():
        print(
            f"  {k}: {v['seconds']:.3f} s ({v.get('calls', '-')} calls, {v['share_of_wall']:.0%})"
        )

    if not args.no_trace:
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.init()
        clock.spans.clear()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            traced = timed_run("traced")
        path = args.trace or (args.output_root / "trace.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        activity = gpu_activity(json.loads(path.read_text()))
        report["traced"] = {
            "seconds": traced,
            "rows_per_s": args.rows / traced,
            "steps": clock.report(traced),
            "gpu": activity,
        }
        print(
            f"traced: {traced:.3f} s; GPU kernels busy {activity['kernel_busy_s']:.3f} s, "
            f"copies {activity['copy_busy_s']:.3f} s, either {activity['any_busy_s']:.3f} s",
            flush=True,
        )
        for k in activity["top_kernels"][:12]:
            print(f"  {k['seconds']:.4f} s x{k['count']:5d}  {k['name'][:90]}")
        for n, c in activity["copies_by_kind"].items():
            print(f"  {n}: {c['seconds']:.4f} s, {c['count']} copies, {c['GB']:.2f} GB")
        print(f"  streams: {activity['seconds_by_stream']}")
    shutil.rmtree(args.output_root, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
