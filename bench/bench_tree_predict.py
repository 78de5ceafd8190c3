"""Benchmark the tree-inference kernel (kernels/tree_predict.py) against XGBoost's own GPU
predictor (`Booster.inplace_predict` on a CuPy matrix), same model, same device data, one run.

    python bench/bench_tree_predict.py --rows 20000000 --out bench_tree_predict.json
    python bench/bench_tree_predict.py --quick                 # small, seconds (still needs a GPU)

The model: XGBoost binary:logistic, `--trees` trees of depth `--depth` (hist on the GPU), fit on
synthetic rows with missing values. Reports rows/s of each predictor (median of `--reps` timed
calls after a warm-up, device-synchronised), kernel/XGBoost, the kernel's time for every tile in
its autotune list, and the largest |difference| between the two predictors over all rows: for
the matrix row-major (as XGBoost and the scoring transform have it) and, with the same values,
feature-major (each feature's values adjacent: a warp's lanes that split on one feature then
load one cache line, where row-major costs a line per lane).
Exits 0 with a message when no GPU is present.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000_000, help="rows scored per call")
    p.add_argument("--features", type=int, default=33)
    p.add_argument("--trees", type=int, default=200)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--train-rows", type=int, default=500_000)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="1M rows, 50 trees")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.trees, args.train_rows, args.reps = 1_000_000, 50, 100_000, 3
    return args


def synthetic_rows(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """float32 (n, k) normal values, 2% missing."""
    x = rng.normal(size=(n, k)).astype(np.float32)
    x[rng.random((n, k)) < 0.02] = np.nan
    return x


def median_seconds(fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_layout(
    x: Any,
    want: Any,
    xgboost_predict: Callable[[Any], Any],
    kernel_predict: Callable[..., Any],
    reps: int,
    sync: Callable[[], None],
) -> dict[str, Any]:
    """One layout of the matrix: XGBoost's time, the kernel's (autotuned and every tile of its
    autotune list) and the kernel's largest |difference| from `want` (XGBoost's row-major
    scores)."""
    import cupy

    from kernels.tree_predict import AUTOTUNE_CONFIGS, best_config

    got = cupy.from_dlpack(kernel_predict(x))
    max_diff = float(cupy.abs(got - want).max())
    try:  # XGBoost reads strided CuPy arrays through __cuda_array_interface__, or refuses them
        xgb_s: float | None = median_seconds(lambda: xgboost_predict(x), reps, sync)
    except (ValueError, TypeError, RuntimeError) as exc:  # xgboost.core.XGBoostError is one
        print(f"XGBoost on this layout: {exc}")
        xgb_s = None
    tuned_s = median_seconds(lambda: kernel_predict(x), reps, sync)
    tiles = {
        f"BLOCK={b},warps={nw}": median_seconds(
            lambda b=b, nw=nw: kernel_predict(x, block=b, num_warps=nw), reps, sync
        )
        for b, nw in AUTOTUNE_CONFIGS
    }
    best_tile = min(tiles, key=tiles.__getitem__)
    return {
        "max_abs_diff_vs_xgboost": max_diff,
        "xgboost_seconds": xgb_s,
        "kernel_autotuned_seconds": tuned_s,
        "autotuned_tile": best_config(),
        "kernel_seconds_by_tile": tiles,
        "best_tile": best_tile,
        "xgboost_over_kernel_time": xgb_s / tiles[best_tile] if xgb_s else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import cupy
        import torch
        import xgboost as xgb
    except ImportError as exc:
        print(f"skipped: {exc}")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    from kernels.tree_predict import forest_to_device, tree_predict
    from tasks.xgboost_onnx import complete_forest

    rng = np.random.default_rng(args.seed)
    train = synthetic_rows(rng, args.train_rows, args.features)
    w = rng.normal(size=args.features)
    margin = np.nan_to_num(train) @ w + np.sin(3 * np.nan_to_num(train[:, 0]))
    label = (margin + rng.normal(size=margin.size) > 0).astype(np.float32)
    t = time.perf_counter()
    booster = xgb.train(
        {
            "objective": "binary:logistic",
            "tree_method": "hist",
            "device": "cuda",
            "max_depth": args.depth,
            "eta": 0.1,
        },
        xgb.DMatrix(train, label=label),
        num_boost_round=args.trees,
    )
    fit_s = time.perf_counter() - t
    forest = complete_forest(booster, args.features)
    device_forest = forest_to_device(forest, "cuda")
    x = cupy.asarray(synthetic_rows(rng, args.rows, args.features))
    sync = cupy.cuda.Device().synchronize

    def xgboost_predict(matrix: Any) -> Any:
        return booster.inplace_predict(matrix)

    def kernel_predict(matrix: Any, **tile: Any) -> Any:
        return tree_predict(matrix, device_forest, **tile)

    want = cupy.asarray(xgboost_predict(x)).reshape(-1)
    layouts = {
        "row_major": time_layout(x, want, xgboost_predict, kernel_predict, args.reps, sync),
        # same values, each feature's column contiguous: an (n, k) view with strides (1, n)
        "feature_major": time_layout(
            cupy.asfortranarray(x), want, xgboost_predict, kernel_predict, args.reps, sync
        ),
    }
    row = layouts["row_major"]
    max_diff = max(layout["max_abs_diff_vs_xgboost"] for layout in layouts.values())
    xgb_s, tuned_s, tiles = (
        row["xgboost_seconds"],
        row["kernel_autotuned_seconds"],
        row["kernel_seconds_by_tile"],
    )
    best_tile = row["best_tile"]
    report = {
        "gpu": torch.cuda.get_device_name(),
        "host": platform.node(),
        "xgboost": xgb.__version__,
        "rows": args.rows,
        "features": args.features,
        "trees": args.trees,
        "depth": args.depth,
        "packed_depth": forest.depth,
        "fit_seconds": fit_s,
        "max_abs_diff_vs_xgboost": max_diff,
        "xgboost_seconds": xgb_s,
        "xgboost_rows_per_s": args.rows / xgb_s,
        "kernel_autotuned_seconds": tuned_s,
        "kernel_autotuned_rows_per_s": args.rows / tuned_s,
        "autotuned_tile": row["autotuned_tile"],
        "kernel_seconds_by_tile": tiles,
        "best_tile": best_tile,
        "kernel_best_tile_rows_per_s": args.rows / tiles[best_tile],
        "xgboost_over_kernel_time": xgb_s / tiles[best_tile],
        "layouts": layouts,
    }
    print(
        f"{args.rows:,} rows, {args.trees} trees depth {args.depth}: XGBoost "
        f"{args.rows / xgb_s / 1e6:.1f}M rows/s, kernel {args.rows / tiles[best_tile] / 1e6:.1f}M "
        f"rows/s ({best_tile}; autotuned {args.rows / tuned_s / 1e6:.1f}M), "
        f"{xgb_s / tiles[best_tile]:.2f}x; max |diff| {max_diff:.2e}"
    )
    for name, layout in layouts.items():
        best = layout["kernel_seconds_by_tile"][layout["best_tile"]]
        xgb_seconds = layout["xgboost_seconds"]
        xgb_text = f"{xgb_seconds * 1e3:.2f} ms" if xgb_seconds else "refused"
        print(
            f"{name}: XGBoost {xgb_text}, kernel "
            f"{best * 1e3:.2f} ms ({layout['best_tile']}; autotuned "
            f"{layout['kernel_autotuned_seconds'] * 1e3:.2f} ms), XGBoost / kernel "
            f"{layout['xgboost_over_kernel_time']}"
        )
        for tile, secs in layout["kernel_seconds_by_tile"].items():
            print(f"  {tile}: {secs * 1e3:.2f} ms")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
