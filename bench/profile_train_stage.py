"""Where a training stage's time goes beyond the model fit: reading the three feature splits,
the ONNX export, scoring the test split, metrics, the ONNX parity check and the bundle files.

    python bench/profile_train_stage.py --data DIR --device gpu --model mlp

Runs the ETL on DIR once (reused from --work if already there), then the stage (`train_mlp` or
`train_xgboost`, the bench_pipeline settings) `--repeats` times untimed and once under cProfile.
Reports the stage's wall time and the cumulative time of each of its steps.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# (module file suffix, function): the steps of a training stage, as named in tasks/
STEPS = [
    ("tasks/train.py", "read_split"),
    ("tasks/train.py", "fit_mlp"),
    ("tasks/train.py", "fit_xgboost"),
    ("tasks/train.py", "copy_transform"),
    ("tasks/train.py", "export_mlp_onnx"),
    ("tasks/train.py", "export_xgboost_onnx"),
    ("tasks/train.py", "mlp_predict"),
    ("tasks/train.py", "xgboost_predict"),
    ("tasks/metrics.py", "classification_metrics"),
    ("tasks/train.py", "onnx_predict"),
    ("tasks/train.py", "write_bundle_json"),
]


def step_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each STEPS function (summed over its calls)."""
    out: dict[str, float] = {}
    for (filename, _line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        for suffix, step in STEPS:
            if name == step and filename.endswith(suffix):
                out[step] = out.get(step, 0.0) + float(row[3])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="raw parquet files of the dataset")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--model", choices=["mlp", "xgboost"], default="mlp")
    p.add_argument("--trees", type=int, default=200)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--mlp-epochs", type=int, default=1)
    p.add_argument("--mlp-rows", type=int, default=2_000_000)
    p.add_argument("--repeats", type=int, default=2, help="untimed runs before the profile")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-profile-train"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from bench_pipeline import bench_config

    from tasks.backend import resolve_backend
    from tasks.etl import load_transform, run_etl
    from tasks.train import train_mlp, train_xgboost

    backend = resolve_backend(args.device)
    home = args.work / args.device
    cfg = bench_config(args.data, home, args)
    t0 = time.perf_counter()
    etl = run_etl(cfg, backend, home / "etl")
    print(f"ETL ({backend.device}): {time.perf_counter() - t0:.2f} s, rows {etl.rows}", flush=True)
    spec, _ = load_transform(etl.transform_dir)
    stage = train_mlp if args.model == "mlp" else train_xgboost
    stage_args = (etl, spec.feature_names, spec.target_column, cfg.model, backend)

    walls = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        stage(*stage_args, home / f"{args.model}-{i}", 0)
        walls.append(time.perf_counter() - t0)
        print(f"run {i}: {walls[-1]:.3f} s", flush=True)
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    model = stage(*stage_args, home / f"{args.model}-profiled", 0)
    profiler.disable()
    profiled = time.perf_counter() - t0
    stats = pstats.Stats(profiler)
    steps = step_seconds(stats)
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(45)
    print(f"profiled run: {profiled:.3f} s (fit {model.extra.get('fit_seconds', 0):.3f} s)")
    for name, secs in sorted(steps.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24} {secs:8.3f} s")
    if args.out:
        report: dict[str, Any] = {
            "device": backend.device,
            "model": args.model,
            "rows": etl.rows,
            "unprofiled_seconds": walls,
            "profiled_seconds": profiled,
            "fit_seconds": model.extra.get("fit_seconds"),
            "step_cumulative_seconds": steps,
            "profile_cumulative": text.getvalue(),
        }
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
