"""Benchmark the scoring transform's lookup and statistics kernels on device-resident data.

    python bench/bench_transform_kernels.py --rows 16000000 --out bench_transform_kernels.json
    python bench/bench_transform_kernels.py --only bin_counts   # e.g. under another commit's tree

- string_match: a cuDF strings column of `--rows` values drawn from a vocabulary of 4 and of 8
  keys (plus 2% unseen values and 1% nulls), looked up two ways in the same run: cuDF's
  `Index.get_indexer` (what `KeyIndex` did before kernels/string_match.py) and `KeyIndex.positions`
  (the string-match kernel). Results are checked equal.
- bin_counts: the drift counts (`kernels.bin_counts.at_least_counts`) of an (n, 33) float32
  matrix with 9 edges per column in 16 segments, the shape scoring counts per batch.

Each time is the median of `--reps` device-synchronised calls after a warm-up. Exits 0 with a
message when no GPU is present.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# run as a script, this file's directory is first on sys.path: the same timing as the tree kernel's
from bench_tree_predict import median_seconds

VOCABULARIES = {
    4: ["atm", "mobile", "pos", "web"],
    8: ["BR", "CA", "DE", "FR", "GB", "IN", "JP", "US"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16_000_000)
    p.add_argument("--features", type=int, default=33)
    p.add_argument("--edges", type=int, default=9)
    p.add_argument("--segments", type=int, default=16)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["string_match", "bin_counts"])
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def string_match_report(args: argparse.Namespace, sync: Callable[[], None]) -> dict[str, Any]:
    import cudf
    import cupy

    from tasks.gpu_features import KeyIndex

    rng = np.random.default_rng(args.seed)
    out: dict[str, Any] = {}
    for size, vocab in VOCABULARIES.items():
        pool = np.array([*vocab, "unseen", None], dtype=object)
        weights = np.r_[np.full(size, 0.97 / size), 0.02, 0.01]
        values = cudf.Series(pool[rng.choice(pool.size, args.rows, p=weights)], dtype="str")
        index = KeyIndex.build(np.array(sorted(vocab)), cupy)
        keys = sorted(vocab)

        def general(values: Any = values, keys: list[str] = keys) -> Any:
            pos = cupy.asarray(cudf.Index(keys).get_indexer(values))
            return cupy.where(values.notna().values, pos, -1)

        def kernel(values: Any = values, index: KeyIndex = index) -> Any:
            return index.positions(values, cupy)

        equal = bool((general() == kernel()).all())
        general_s = median_seconds(general, args.reps, sync)
        kernel_s = median_seconds(kernel, args.reps, sync)
        per_1m = 1e3 / (args.rows / 1e6)
        out[f"{size}_keys"] = {
            "kernel_used": index.packed_strings is not None,
            "equal": equal,
            "get_indexer_ms_per_1m": general_s * per_1m,
            "kernel_ms_per_1m": kernel_s * per_1m,
            "speedup": general_s / kernel_s,
            "launch_only_ms_per_1m_by_tile": launch_only_times(index, values, args, sync),
        }
        print(f"string_match {size} keys: {out[f'{size}_keys']}")
    return out


STRING_TILES = [(128, 4), (256, 4), (512, 4), (1024, 4), (256, 8), (1024, 8), (64, 2)]
BIN_COUNT_TILES = [
    {},
    {"sub_rows": 4},
    {"sub_rows": 16},
    {"col_block": 8},
    {"col_block": 16},
    {"col_block": 16, "sub_rows": 16},
    {"col_block": 8, "sub_rows": 32},
    {"rows_per_program": 512},
    {"rows_per_program": 8192},
    {"num_warps": 8},
    {"num_warps": 2},
]


def launch_only_times(
    index: Any, values: Any, args: argparse.Namespace, sync: Callable[[], None]
) -> dict[str, float]:
    """The string-match kernel alone on the column's buffers (no null mask, no casts), by tile."""
    from cudf.core.column import access_columns

    from kernels.string_match import string_positions
    from tasks.gpu_features import strings_column_buffers

    column = values._column
    times = {}
    with access_columns(column, mode="read", scope="internal"):
        offsets, chars, base = strings_column_buffers(column.plc_column)
        for block_n, warps in STRING_TILES:

            def launch(block_n: int = block_n, warps: int = warps) -> Any:
                return string_positions(
                    offsets,
                    chars,
                    index.packed_strings,
                    index.string_lengths,
                    len(values),
                    base,
                    block_n,
                    warps,
                )

            seconds = median_seconds(launch, args.reps, sync)
            times[f"BLOCK_N={block_n},warps={warps}"] = 1e3 * seconds / (args.rows / 1e6)
    return times


def bin_counts_report(args: argparse.Namespace, sync: Callable[[], None]) -> dict[str, Any]:
    import cupy

    from kernels.bin_counts import at_least_counts

    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.rows, args.features)).astype(np.float32)
    x[rng.random(x.shape) < 0.02] = np.nan
    matrix = cupy.asarray(x)
    edges = [sorted(rng.normal(size=args.edges).tolist()) for _ in range(args.features)]
    offsets = np.linspace(0, args.rows, args.segments + 1).astype(np.int64).tolist()
    seconds = median_seconds(lambda: at_least_counts(matrix, edges, offsets), args.reps, sync)
    by_tile = {}
    if not args.only:  # another commit's kernel may take no tile argument
        for tile in BIN_COUNT_TILES:
            t = median_seconds(
                lambda t=tile: at_least_counts(matrix, edges, offsets, t), args.reps, sync
            )
            by_tile[json.dumps(tile)] = 1e3 * t / (args.rows / 1e6)
    head = at_least_counts(matrix[: 1 << 20], edges)  # checked against NumPy on 1M rows
    from kernels.reference import at_least_counts_reference

    report = {
        "shape": [args.rows, args.features],
        "edges": args.edges,
        "segments": args.segments,
        "ms_per_1m": 1e3 * seconds / (args.rows / 1e6),
        "read_gbs": x.nbytes / seconds / 1e9,
        "ms_per_1m_by_tile": by_tile,
        "equal_to_reference_1m_rows": bool(
            (head == at_least_counts_reference(x[: 1 << 20], edges)).all()
        ),
    }
    print(f"bin_counts: {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import cupy
        import torch
    except ImportError as exc:
        print(f"skipped: {exc}")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    sync = cupy.cuda.Device().synchronize
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": args.rows,
        "code": str(Path(__file__).resolve().parent.parent),
    }
    if args.only in (None, "string_match"):
        report["string_match"] = string_match_report(args, sync)
    if args.only in (None, "bin_counts"):
        report["bin_counts"] = bin_counts_report(args, sync)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
