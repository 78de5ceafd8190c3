"""Benchmark the training pipeline's stages (rows/s per stage) on CPU and, where present, GPU.

Both devices run in the same process on the same generated data, so their ratio is measured
side by side. The CPU ETL runs on a dask LocalCluster with one single-threaded worker per core
(dask-pandas); the GPU ETL uses the cuDF backend.

    python bench/bench_pipeline.py --rows 1000000 --devices cpu --out bench.json
    python bench/bench_pipeline.py --rows 20000000 --devices cpu,gpu --cpu-workers 16 --out b.json

Writes a JSON report (hardware, date, rows, seconds and rows/s per stage and device) and prints a
table. A parity section compares the GPU and CPU features and model quality when both ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(Exception):
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["gpu"] = props["name"].decode()
        info["gpu_count"] = cupy.cuda.runtime.getDeviceCount()
    return info


@contextlib.contextmanager
def cpu_cluster(workers: int) -> Iterator[Any]:
    """A LocalCluster of single-threaded worker processes, kept up across runs so that its
    workers are warm when timed (a cluster started for the timed run had their first use,
    ~5 s of ~30 s for 20M rows on 16 cores, inside the CPU ETL). No client is made here."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster


def cpu_etl_client(cluster: Any) -> Any:
    """A client of `cluster` for one CPU ETL (the default scheduler while it is open), or no
    client. Training runs without one: with a client in scope `train_xgboost` would train on
    the cluster through xgboost.dask, which is not what the stage measures."""
    if cluster is None:
        return contextlib.nullcontext()
    from distributed import Client

    return Client(cluster)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_config(data_dir: Path, home: Path, args: argparse.Namespace) -> Any:
    """The built-in config with the benchmark's model settings: `args.trees` trees of
    `args.depth` (no early stopping), an MLP of `args.mlp_epochs` epochs on `args.mlp_rows`.
    INT8 calibration is off: it runs on the CPU (ONNX Runtime) after either device's training,
    so it would blur the MLP stage's GPU/CPU ratio."""
    from tasks.config import builtin_config

    return builtin_config(
        data_dir,
        home,
        **{
            "model.xgboost.n_estimators": args.trees,
            "model.xgboost.max_depth": args.depth,
            "model.xgboost.early_stopping_rounds": args.trees,
            "model.mlp.epochs": args.mlp_epochs,
            "model.mlp.max_train_rows": args.mlp_rows,
            "model.int8.enabled": False,
        },
    )


def run_device(
    device: str, data_dir: Path, work: Path, args: argparse.Namespace, cluster: Any = None
) -> dict[str, Any]:
    """One device's ETL and training stages, timed. A CPU ETL runs on `cluster`, which `main`
    keeps up for the warm-up and the timed run (its workers warm, as the GPU process is)."""
    from tasks.backend import resolve_backend
    from tasks.etl import load_transform, run_etl
    from tasks.train import train_mlp, train_xgboost

    backend = resolve_backend(device)
    home = work / device
    cfg = bench_config(data_dir, home, args)
    with cpu_etl_client(cluster if device == "cpu" else None):
        etl, t_etl = timed(run_etl, cfg, backend, home / "etl")
    spec, _ = load_transform(etl.transform_dir)
    fit_args = (etl, spec.feature_names, spec.target_column, cfg.model, backend)
    xgb, t_xgb = timed(train_xgboost, *fit_args, home / "xgb", 0)
    etl_stages = json.loads((etl.root / "etl.json").read_text()).get("stage_seconds", {})
    stages = {
        "etl": {"seconds": t_etl, "rows": args.rows, "etl_stage_seconds": etl_stages},
        "train_xgboost": {
            "seconds": t_xgb,
            "rows": etl.rows["train"],
            "fit_seconds": xgb.extra.get("fit_seconds"),
            "metrics": xgb.metrics,
        },
    }
    if args.mlp_epochs:
        mlp, t_mlp = timed(train_mlp, *fit_args, home / "mlp", 0)
        stages["train_mlp"] = {
            "seconds": t_mlp,
            "rows": min(etl.rows["train"], args.mlp_rows) * args.mlp_epochs,
            "fit_seconds": mlp.extra.get("fit_seconds"),
            "metrics": mlp.metrics,
        }
    for s in stages.values():
        s["rows_per_s"] = s["rows"] / s["seconds"]
    return {
        "backend": backend.device,
        "reason": backend.reason,
        "stages": stages,
        "etl_root": str(etl.root),
    }


def etl_rounds(data_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ETL alone, GPU then CPU in each round, on the same files: one warm-up run of each
    first (on the full data: GPU kernels compiled, the CPU cluster's workers imported), then
    `args.etl_rounds` timed rounds. The CPU cluster stays up for all of them."""
    import shutil

    from tasks.backend import resolve_backend
    from tasks.etl import run_etl

    devices = {d: resolve_backend(d) for d in args.devices.split(",")}
    rounds: list[dict[str, Any]] = []
    with cpu_cluster(args.cpu_workers) as cluster:
        for r in range(args.etl_rounds + 1):
            seconds: dict[str, Any] = {}
            for name, backend in devices.items():
                home = args.work / f"etl-rounds-{name}"
                shutil.rmtree(home, ignore_errors=True)  # time the ETL, not its reuse
                cfg = bench_config(data_dir, home, args)
                with cpu_etl_client(cluster if name == "cpu" else None):
                    etl, seconds[name] = timed(run_etl, cfg, backend, home / "etl")
                stages = json.loads((etl.root / "etl.json").read_text()).get("stage_seconds")
                seconds[f"{name}_stages"] = stages
            if "gpu" in devices and "cpu" in devices:
                seconds["gpu_over_cpu"] = seconds["cpu"] / seconds["gpu"]
            seconds["round"] = "warm-up" if r == 0 else r
            rounds.append(seconds)
            print(f"ETL round {seconds['round']}: {seconds}", flush=True)
    return rounds


def print_etl_rounds(rounds: list[dict[str, Any]]) -> None:
    timed_rounds = [r for r in rounds if r["round"] != "warm-up"]
    if not timed_rounds or "gpu_over_cpu" not in timed_rounds[0]:
        return
    gpu = [r["gpu"] for r in timed_rounds]
    cpu = [r["cpu"] for r in timed_rounds]
    print(
        f"ETL over {len(timed_rounds)} rounds: GPU {min(gpu):.2f}-{max(gpu):.2f} s, "
        f"CPU {min(cpu):.2f}-{max(cpu):.2f} s; ratio of means {np.mean(cpu) / np.mean(gpu):.1f}x, "
        f"per round {[round(r['gpu_over_cpu'], 1) for r in timed_rounds]}"
    )


def features_parity(cpu_root: str, gpu_root: str) -> dict[str, float]:
    """Max abs difference of the test-split feature matrices (rows aligned by id)."""
    a = pd.read_parquet(Path(cpu_root) / "features" / "test").set_index("transaction_id")
    b = pd.read_parquet(Path(gpu_root) / "features" / "test").set_index("transaction_id")
    common = a.index.intersection(b.index)
    cols = [c for c in a.columns if c != "is_fraud"]
    diff = np.abs(
        a.loc[common, cols].to_numpy(np.float64) - b.loc[common, cols].to_numpy(np.float64)
    )
    return {
        "rows_cpu": float(len(a)),
        "rows_gpu": float(len(b)),
        "rows_common": float(len(common)),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rows-per-file", type=int, default=1_000_000)
    p.add_argument("--devices", default="cpu")
    p.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--trees", type=int, default=200)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--mlp-epochs", type=int, default=1)
    p.add_argument("--mlp-rows", type=int, default=2_000_000)
    p.add_argument(
        "--warmup-rows",
        type=int,
        default=200_000,
        help="run each device once on this many rows first, untimed (compiles GPU kernels, "
        "starts CUDA, fills memory pools, as a long-running worker would have); 0 = cold",
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--etl-rounds",
        type=int,
        default=0,
        help="only the ETL: this many rounds of one run per device of --devices (the CPU's "
        "cluster kept between rounds), after one warm-up round; reports every round's ratio",
    )
    args = p.parse_args()

    from tasks.generate import generate_transactions

    data_dir = args.work / f"data-{args.rows}"
    _, t_gen = timed(
        generate_transactions, args.rows, data_dir, seed=0, rows_per_file=args.rows_per_file
    )
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "rows": args.rows,
        "files": len(list(data_dir.glob("*.parquet"))),
        "generate_seconds": t_gen,
        "config": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
        "devices": {},
    }
    if args.etl_rounds:
        report["etl_rounds"] = etl_rounds(data_dir, args)
        print_etl_rounds(report["etl_rounds"])
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))
        return
    if args.warmup_rows:
        # its own name: a `data-N` directory holds seed-0 data (profile_gpu_etl_steps.py reads those)
        warm_dir = args.work / f"warmup-data-{args.warmup_rows}"
        generate_transactions(
            args.warmup_rows, warm_dir, seed=1, rows_per_file=min(args.rows_per_file, 100_000)
        )
    # one CPU cluster for the warm-up and the timed runs: a cluster started for the timed run
    # had its workers' first use (~5 s of 30 s for 20M rows on 16 cores) inside the CPU ETL
    devices = args.devices.split(",")
    with (
        cpu_cluster(args.cpu_workers)
        if "cpu" in devices and args.cpu_workers > 1
        else contextlib.nullcontext()
    ) as cluster:
        for device in devices:
            if args.warmup_rows:
                run_device(device, warm_dir, args.work / "warmup", args, cluster)
            report["devices"][device] = run_device(device, data_dir, args.work, args, cluster)
    devs = report["devices"]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    if "cpu" in devs and "gpu" in devs:
        report["gpu_over_cpu"] = {
            stage: devs["cpu"]["stages"][stage]["seconds"] / devs["gpu"]["stages"][stage]["seconds"]
            for stage in devs["gpu"]["stages"]
            if stage in devs["cpu"]["stages"]
        }
        report["gpu_over_cpu_fit_only"] = {
            stage: devs["cpu"]["stages"][stage]["fit_seconds"]
            / devs["gpu"]["stages"][stage]["fit_seconds"]
            for stage in devs["gpu"]["stages"]
            if devs["gpu"]["stages"][stage].get("fit_seconds") and stage in devs["cpu"]["stages"]
        }
        report["features_parity"] = features_parity(
            devs["cpu"]["etl_root"], devs["gpu"]["etl_root"]
        )
    print(f"{'device':6} {'stage':14} {'seconds':>9} {'rows/s':>14}  metrics")
    for device, d in devs.items():
        for stage, s in d["stages"].items():
            m = s.get("metrics", {})
            extra = f"ROC AUC {m['roc_auc']:.4f}" if m else ""
            print(f"{device:6} {stage:14} {s['seconds']:9.2f} {s['rows_per_s']:14,.0f}  {extra}")
    for device, d in devs.items():
        print(device, "ETL stages (s):", d["stages"]["etl"].get("etl_stage_seconds"))
    if "gpu_over_cpu" in report:
        print("GPU speed-up:", {k: round(v, 1) for k, v in report["gpu_over_cpu"].items()})
        fit_only = report["gpu_over_cpu_fit_only"]
        print("GPU speed-up, model fit alone:", {k: round(v, 1) for k, v in fit_only.items()})
        print("features parity:", report["features_parity"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
