"""Histogram counts of every column of a matrix in one pass (Triton): for each column j and each
of its edges e, the number of rows with x >= edges[j][e], and the number of NaN rows.

Bin counts follow from these on the host (`tasks.drift`): with searchsorted(side="right") binning
and NaN in the last bin, bin 0 = n - nan - at_least[0], bin i = at_least[i-1] - at_least[i], and
the last bin = at_least[-1] + nan. Each program walks ROWS_PER_PROGRAM rows of a block of
columns in [SUB_ROWS x COL_BLOCK] tiles, compares each value with all of its column's edges at
once and counts per lane in registers; at its end it reduces the counters and adds one partial
sum per (column, edge) with an atomic. So a chunk of drift
statistics is one launch, not a searchsorted and an atomic-heavy bincount per column.
Comparisons are in float64, as NumPy's are.

With row offsets the same launch counts each segment of rows (each file of a scoring batch) on
its own: a second grid axis picks the segment, and the host receives every segment's counts in
one transfer (one synchronisation per batch rather than one per file).
Semantics are those of `kernels.reference.at_least_counts_reference`, the oracle for the tests.

Like `kernels.fused_preprocess`, nothing from torch or triton is imported until first use.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kernels.fused_preprocess import (
    _interpret,
    _to_torch,
    is_available,
    jit_with_combine,
    triton_cdiv,
)

tl: Any = None  # bound to triton.language by _build, as in kernels.fused_preprocess
# Bound by _build to `_add` jitted for the current mode. triton's own tl.sum is built for the mode
# triton found when first imported, which the interpreter cannot call if that was compiled mode.
_column_add: Any = None

# Each program counts ROWS_PER_PROGRAM rows of one segment and COL_BLOCK columns, SUB_ROWS rows
# at a time, into per-lane registers ([SUB_ROWS, COL_BLOCK, E_PAD] counters), and reduces and
# adds them to the output once at its end. Measured on an H100 for (16M x 33) float32, 9 edges,
# 16 segments (bench/bench_transform_kernels.py, bench/results/2026-12-06_h100_bench_transform_
# kernels_16M_*.json): 0.32 ms per 1M rows with 16-column blocks, against 1.26 ms with all 64
# padded columns in one program (registers spill) and 1.22 ms for the first layout (one
# [256 x K_PAD] tile per program, a cross-warp reduction and an atomic per edge per tile).
SUB_ROWS = 8
ROWS_PER_PROGRAM = 2048
COL_BLOCK = 16  # columns per program (a third grid axis); 0: all of them
NUM_WARPS = 4
_KERNELS: dict[str, Any] = {}
_LOCK = threading.Lock()

__all__ = ["at_least_counts", "is_available"]


def _add(a, b):
    return a + b


def _at_least_kernel(
    x_ptr,
    edges_ptr,
    n_edges_ptr,
    offsets_ptr,
    out_ptr,
    k,
    stride_row,
    stride_col,
    K_BLOCK: tl.constexpr,
    MAX_EDGES: tl.constexpr,
    E_PAD: tl.constexpr,
    SUB_ROWS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0)
    segment = tl.program_id(1)
    start = tl.load(offsets_ptr + segment)
    end = tl.load(offsets_ptr + segment + 1)
    first = start + pid.to(tl.int64) * ROWS_PER_PROGRAM
    cols = tl.program_id(2) * K_BLOCK + tl.arange(0, K_BLOCK)
    col_ok = cols < k
    slots = tl.arange(0, E_PAD)
    n_edges = tl.load(n_edges_ptr + cols, mask=col_ok, other=0)
    # slots past a column's own edges hold +inf; past MAX_EDGES they are never added
    edges = tl.load(
        edges_ptr + cols[:, None] * MAX_EDGES + slots[None, :],
        mask=col_ok[:, None] & (slots < MAX_EDGES)[None, :],
        other=float("inf"),
    )
    at_least = tl.zeros([SUB_ROWS, K_BLOCK, E_PAD], tl.int32)
    nan = tl.zeros([SUB_ROWS, K_BLOCK], tl.int32)
    # A while loop over this program's sub-tiles, stopping at the segment's end (the
    # interpreter cannot take a scalar loop bound: see kernels.tree_predict)
    row0 = first
    last = tl.minimum(end, first + ROWS_PER_PROGRAM)
    while row0 < last:
        rows = row0 + tl.arange(0, SUB_ROWS)
        mask = (rows < last)[:, None] & col_ok[None, :]
        x = tl.load(
            x_ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0
        ).to(tl.float64)
        nan += ((x != x) & mask).to(tl.int32)
        hit = (x[:, :, None] >= edges[None, :, :]) & mask[:, :, None]
        at_least += hit.to(tl.int32)
        row0 += SUB_ROWS
    width = MAX_EDGES + 1
    out_ptr += segment * k * width
    nan_rows = tl.reduce(nan, 0, _column_add)
    tl.atomic_add(out_ptr + cols * width + MAX_EDGES, nan_rows, mask=col_ok & (first < end))
    counted = tl.reduce(at_least, 0, _column_add)
    used = col_ok[:, None] & (slots[None, :] < n_edges[:, None]) & (first < end)
    tl.atomic_add(out_ptr + cols[:, None] * width + slots[None, :], counted, mask=used)


def _build(interpret: bool) -> Any:
    global tl, _column_add
    # one compiled kernel for every matrix size: Triton otherwise specialises integer arguments
    # on divisibility by 16, so a matrix of another row count can compile the kernel again.
    # stride_col stays specialised: it is 1 for a row-major matrix, which keeps the loads
    # coalesced
    tl, _column_add, kernel = jit_with_combine(
        _KERNELS, interpret, _add, _at_least_kernel, ["k", "stride_row"]
    )
    return kernel


def padded_edges(edges_per_column: Sequence[Sequence[float]]) -> np.ndarray:
    """(k, max edges) float64, each column's edges then +inf (slots past a column's own edges
    are not counted)."""
    width = max((len(e) for e in edges_per_column), default=0)
    out = np.full((len(edges_per_column), max(width, 1)), np.inf, np.float64)
    for j, edges in enumerate(edges_per_column):
        out[j, : len(edges)] = np.asarray(edges, np.float64)
    return out[:, :width] if width else out[:, :0]


def at_least_counts(
    matrix: Any,
    edges_per_column: Sequence[Sequence[float]],
    offsets: Sequence[int] | None = None,
    tile: Mapping[str, int] | None = None,
) -> np.ndarray:
    """(k, max edges + 1) int64 on the host: [rows >= each edge..., NaN rows] per column; with
    `offsets`, (segments, k, max edges + 1): the same for each segment of rows
    offsets[s]:offsets[s + 1], counted in one launch and copied to the host in one transfer.

    Args:
        matrix: (n, k) float array: CuPy/torch on a GPU (any strides), or CPU torch/NumPy with
            TRITON_INTERPRET=1. Rows must number below 2**31 (int32 counters).
        edges_per_column: k ascending edge lists (may be empty).
        offsets: ascending row offsets from 0 to n (None: the whole matrix, unsegmented).
        tile: for benchmarks, any of sub_rows, rows_per_program, col_block (0: all columns)
            and num_warps in place of the module's defaults.
    """
    import torch

    x = _to_torch(matrix)
    if x.dim() != 2 or x.shape[1] != len(edges_per_column):
        raise ValueError(f"need an (n, {len(edges_per_column)}) matrix, got {tuple(x.shape)}")
    n, k = int(x.shape[0]), int(x.shape[1])
    if n >= 2**31:
        raise ValueError(f"{n} rows: counts are int32, split the matrix into chunks")
    bounds = np.asarray([0, n] if offsets is None else list(offsets), np.int64)
    sizes = np.diff(bounds)
    if bounds.size < 2 or bounds[0] != 0 or bounds[-1] != n or (sizes < 0).any():
        raise ValueError(f"offsets must rise from 0 to {n} rows, got {bounds.tolist()[:6]}")
    interpret = _interpret()
    device = x.device if not interpret else torch.device("cpu")
    if interpret and x.device.type != "cpu":
        x = x.cpu()
    edges = padded_edges(edges_per_column)
    max_edges = edges.shape[1]
    segments = sizes.size
    out = torch.zeros((segments, k, max_edges + 1), dtype=torch.int32, device=device)
    longest = int(sizes.max())
    if longest and k:
        edges_t = torch.as_tensor(
            edges if max_edges else np.zeros((k, 1)), dtype=torch.float64, device=device
        )
        n_edges = torch.as_tensor(
            [len(e) for e in edges_per_column], dtype=torch.int32, device=device
        )
        bounds_t = torch.as_tensor(bounds, device=device)
        kernel = _build(interpret)
        args = (x, edges_t, n_edges, bounds_t, out, k, int(x.stride(0)), int(x.stride(1)))
        chosen = {
            "sub_rows": SUB_ROWS,
            "rows_per_program": ROWS_PER_PROGRAM,
            "col_block": COL_BLOCK,
            "num_warps": NUM_WARPS,
            **(tile or {}),
        }
        k_pad = 1 << max(k - 1, 0).bit_length()
        k_block = min(chosen["col_block"] or k_pad, k_pad)
        meta = {
            "K_BLOCK": k_block,
            "MAX_EDGES": max_edges,
            "E_PAD": 1 << max(max_edges - 1, 0).bit_length(),
            "SUB_ROWS": chosen["sub_rows"],
            "ROWS_PER_PROGRAM": chosen["rows_per_program"],
        }
        grid = (
            triton_cdiv(longest, chosen["rows_per_program"]),
            segments,
            triton_cdiv(k, k_block),
        )
        with _LOCK:
            # programs past a shorter segment's end load nothing and add zeros
            launch = kernel[grid]
            if device.type == "cuda":
                with torch.cuda.device(device):
                    launch(*args, **meta, num_warps=chosen["num_warps"])
            else:
                launch(*args, **meta, num_warps=chosen["num_warps"])
    counts = out.cpu().numpy().astype(np.int64)
    return counts[0] if offsets is None else counts
