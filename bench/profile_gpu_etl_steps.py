"""Where the in-memory GPU ETL's time goes, step by step: each step of `tasks.etl` is timed
between two device synchronisations, nested steps under their caller ("fit_entity/_flat").

The stage clock of `run_etl` measures without synchronising, so device work launched in one
stage can be paid in the next; this profiler pays it where it was launched. The synchronisations
remove some overlap, so its steps add up to a little more than an unprofiled run: both are
reported, from the same process and files.

    python bench/profile_gpu_etl_steps.py --rows 20000000 --runs 2 --out /tmp/etl_steps.json

`--trace FILE.json.gz` adds a last run under torch.profiler (CUPTI): its chrome trace, and per
ETL stage the wall time, the time the GPU was busy (union of kernels, copies and memsets), and
which host threads launched the device work; say where the GPU waits on the host.

`--cprofile` adds a last run under cProfile. Run it with CUDA_LAUNCH_BLOCKING=1 so that each
kernel's time is paid by the Python call that launched it. `--frames auto,dask` repeats the
runs for each way of holding the table (`etl_frames`), side by side in one process;
`--warmup-rows 0 --plain-runs 0 --runs 0 --cprofile` profiles a first run (one-off compiles).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import json
import pstats
import shutil
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# tasks.etl functions timed when called from the main thread (module globals, so _run_etl's own
# calls go through the wrappers)
STEPS = (
    "read_raw_frame",
    "time_cuts",
    "assign_split",
    "fit_entity",
    "_flat",
    "out_of_fold_rates",
    "fit_categorical",
    "derived_partition",
    "hash_sample",
    "compute",
    "computed",
    "fit_numeric",
    "matrix_partition",
    "_frame_matrix",
    "histograms",
    "save_transform",
    "write_parquet_dir",
    "raw_dtypes",
)


class StepTimer:
    """Inclusive seconds per call path, device synchronised at each step's start and end."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                return fn(*args, **kwargs)
            path = "/".join([*self._stack, name])
            self._stack.append(name)
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[path] += time.perf_counter() - start
                self.calls[path] += 1
                self._stack.pop()

        return timed


@contextmanager
def steps_timed(timer: StepTimer) -> Iterator[None]:
    import tasks.etl as etl

    originals = {name: getattr(etl, name) for name in STEPS if hasattr(etl, name)}
    for name, fn in originals.items():
        setattr(etl, name, timer.wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(etl, name, fn)


class StageTracer:
    """A run under torch.profiler with each ETL stage (the progress messages) as a named range."""

    def __init__(self) -> None:
        self.profiler: Any = None
        self._range: Any = None

    @contextmanager
    def profiling(self) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            self.profiler = prof
            try:
                yield
            finally:
                self.stage(None)

    def stage(self, message: str | None) -> None:
        from torch.profiler import record_function

        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if message is not None:
            self._range = record_function(f"stage: {message[:60]}")
            self._range.__enter__()

    def summary(self, path: Path) -> dict[str, Any]:
        """Export the chrome trace (gzip) and sum it per stage."""
        import gzip

        raw = path.with_suffix("") if path.suffix == ".gz" else path
        self.profiler.export_chrome_trace(str(raw))
        events = json.loads(raw.read_text())["traceEvents"]
        with gzip.open(path if path.suffix == ".gz" else f"{path}.gz", "wt") as fh:
            json.dump(events, fh)
        raw.unlink(missing_ok=True)
        return trace_by_stage(events)


DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) microsecond intervals, in seconds."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1e6


def trace_by_stage(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage range: wall, GPU busy (union), device time by category, the 8 longest kernel
    names by summed time, and the host threads whose runtime calls fall inside it."""
    stages = [
        (e["name"], e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("stage: ")
    ]
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES and "dur" in e]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" and "dur" in e]
    out: dict[str, Any] = {}
    for name, lo, hi in sorted(stages, key=lambda s: s[1]):
        inside = [e for e in device if lo <= e["ts"] < hi]
        by_cat: dict[str, float] = defaultdict(float)
        by_kernel: dict[str, float] = defaultdict(float)
        for e in inside:
            by_cat[e["cat"]] += e["dur"] / 1e3
            by_kernel[f"{e['cat']}: {str(e['name'])[:70]}"] += e["dur"] / 1e3
        calls: dict[str, float] = defaultdict(float)
        for e in runtime:
            if lo <= e["ts"] < hi:
                calls[f"tid {e.get('tid')}: {e['name']}"] += e["dur"] / 1e3
        out[name] = {
            "wall_ms": round((hi - lo) / 1e3, 2),
            "gpu_busy_ms": round(
                busy_seconds([(e["ts"], min(e["ts"] + e["dur"], hi)) for e in inside]) * 1e3, 2
            ),
            "device_ms_by_category": {k: round(v, 2) for k, v in by_cat.items()},
            "top_device_ms": dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])[:8]),
            "runtime_calls_ms": dict(sorted(calls.items(), key=lambda kv: -kv[1])[:8]),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--warmup-rows", type=int, default=3_000_000)
    p.add_argument("--runs", type=int, default=2, help="profiled runs after the plain ones")
    p.add_argument("--plain-runs", type=int, default=2)
    p.add_argument("--device", default="gpu")
    p.add_argument(
        "--frames", default="auto", help="etl_frames values to run in turn, comma-separated"
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cprofile", action="store_true", help="one more run, under cProfile")
    p.add_argument("--trace", type=Path, default=None, help="one more run, traced: chrome trace")
    p.add_argument(
        "--async-memory",
        action="store_true",
        help="RMM allocations through cudaMallocAsync (tasks.backend.use_async_device_memory)",
    )
    args = p.parse_args()

    from tasks.backend import resolve_backend
    from tasks.config import builtin_config
    from tasks.etl import run_etl
    from tasks.generate import generate_transactions

    backend = resolve_backend(args.device)
    if backend.device == "gpu":
        import cupy

        if args.async_memory:
            from tasks.backend import use_async_device_memory

            use_async_device_memory()

        sync: Callable[[], None] = cupy.cuda.runtime.deviceSynchronize
    else:

        def sync() -> None:
            return None

    report: dict[str, Any] = {
        "rows": args.rows,
        "device": backend.device,
        "async_memory": args.async_memory,
        "runs": [],
    }
    frames = args.frames.split(",")
    plan = [("warmup", args.warmup_rows, False, frames[0])] if args.warmup_rows else []
    for choice in frames:
        prefix = f"{choice}_" if len(frames) > 1 else ""
        plan += [
            (f"{prefix}plain_{i + 1}", args.rows, False, choice) for i in range(args.plain_runs)
        ]
        plan += [(f"{prefix}steps_{i + 1}", args.rows, True, choice) for i in range(args.runs)]
        if args.cprofile:
            plan.append((f"{prefix}cprofile", args.rows, False, choice))
        if args.trace:
            plan.append((f"{prefix}trace", args.rows, False, choice))
    for label, rows, profiled, choice in plan:
        data = args.work / f"data-{rows}"
        generate_transactions(rows, data, seed=0, rows_per_file=min(rows, 1_000_000))
        home = args.work / f"profile-etl-steps-{label}"
        shutil.rmtree(home, ignore_errors=True)
        cfg = builtin_config(data, home).model_copy(update={"etl_frames": choice})
        timer = StepTimer(sync)
        prof = cProfile.Profile() if label.endswith("cprofile") else None
        tracer = StageTracer() if label.endswith("trace") else None
        start = time.perf_counter()
        with (
            steps_timed(timer) if profiled else contextlib.nullcontext(),
            tracer.profiling() if tracer else contextlib.nullcontext(),
        ):
            if prof:
                prof.enable()
            out = run_etl(
                cfg, backend, home / "etl", progress=tracer.stage if tracer else lambda _: None
            )
            if prof:
                prof.disable()
        seconds = time.perf_counter() - start
        stages = json.loads((out.root / "etl.json").read_text())["stage_seconds"]
        run = {
            "label": label,
            "rows": rows,
            "frames": choice,
            "seconds": round(seconds, 4),
            "stages": stages,
        }
        if profiled:
            run["steps"] = {k: round(v, 4) for k, v in sorted(timer.seconds.items())}
            run["calls"] = dict(sorted(timer.calls.items()))
        if prof:
            for key in ("tottime", "cumulative"):
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(60)
                run[f"profile_{key}"] = buf.getvalue()
                print(buf.getvalue()[-12000:], flush=True)
        if tracer and args.trace:
            run["trace"] = tracer.summary(args.trace)
            print(json.dumps(run["trace"], indent=1), flush=True)
        report["runs"].append(run)
        print(f"{label}: {rows:,} rows in {seconds:.2f} s; stages {stages}", flush=True)
        for path, secs in sorted(timer.seconds.items()):
            print(f"  {path:60} {secs:8.4f} s  x{timer.calls[path]}", flush=True)
        shutil.rmtree(home, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
