"""MLP fit alone, side by side in one process: the GPU with steps replayed from a CUDA graph, the
GPU with the same steps launched eagerly, and the CPU (torch on all cores).

Synthetic data shaped like the pipeline's feature matrix (float32, 18 features, ~1% positives);
each variant fits once on a small warm-up set, then --repeats times on --rows rows (median and
min reported). Needs only torch and NumPy, so it runs on the lent GPU machine without staging.

    python bench/profile_mlp_fit.py --rows 2000000 --epochs 1 --out /tmp/mlp_fit.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FEATURES = 18


def synthetic_split(rows: int, seed: int) -> Any:
    """Features and a target from a noisy logistic model of a few of them."""
    import numpy as np

    from tasks.train import SplitData

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES), dtype=np.float32)
    logit = -5.0 + 1.5 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] * x[:, 3]
    y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return SplitData(x, y)


def on_device(split: Any, device: str) -> Any:
    import torch

    from tasks.train import SplitData

    if device == "cpu":
        return split
    return SplitData(
        torch.as_tensor(split.features, device=device),
        torch.as_tensor(split.target, device=device),
    )


def time_fit(train: Any, valid: Any, cfg: Any, device: str, graph: bool) -> float:
    import torch

    from tasks.backend import Backend
    from tasks.train import fit_mlp

    backend = Backend("gpu" if device == "cuda" else "cpu", "bench")
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fit_mlp(train, valid, cfg, backend, seed=0, cuda_graph=graph)  # ends with .cpu(): synced
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--hidden", default="64,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import torch

    from tasks.config import MLPConfig

    cfg = MLPConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        hidden=[int(h) for h in args.hidden.split(",")],
        max_train_rows=args.rows,
    )
    train, valid = synthetic_split(args.rows, 0), synthetic_split(args.rows // 10, 1)
    small = cfg.model_copy(update={"max_train_rows": 50_000})
    variants = [("cpu", "cpu", False)]
    if torch.cuda.is_available():
        variants = [("cuda_graph", "cuda", True), ("cuda_eager", "cuda", False), *variants]
    results: dict[str, Any] = {}
    for name, device, graph in variants:
        t, v = on_device(train, device), on_device(valid, device)
        time_fit(t, v, small, device, graph)  # warm-up: CUDA context, cuBLAS, allocator
        seconds = [time_fit(t, v, cfg, device, graph) for _ in range(args.repeats)]
        median = statistics.median(seconds)
        results[name] = {
            "seconds": seconds,
            "median_s": median,
            "min_s": min(seconds),
            "rows_per_s": args.rows * args.epochs / median,
        }
        print(f"{name:>11}: median {median:.3f} s  ({results[name]['rows_per_s']:,.0f} rows/s)")
    cpu = results["cpu"]["median_s"]
    ratios = {f"{name}_vs_cpu": cpu / r["median_s"] for name, r in results.items() if name != "cpu"}
    for key, value in ratios.items():
        print(f"{key}: {value:.1f}x")
    report = {
        "bench": "profile_mlp_fit",
        "rows": args.rows,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "hidden": cfg.hidden,
        "features": FEATURES,
        "steps_per_epoch": -(-args.rows // args.batch_size),
        "torch": torch.__version__,
        "torch_cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "machine": platform.machine(),
        "results": results,
        "ratios": ratios,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
