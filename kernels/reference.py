"""NumPy references for the kernels in this package: the oracles that tests compare against.

Also the CPU implementation used by gpupipe when no GPU is present.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


def fused_preprocess_reference(
    numeric: F32,
    codes: I32,
    fill: F32,
    lo: F32,
    hi: F32,
    mean: F32,
    inv_std: F32,
    enc_table: F32,
    enc_offsets: I32,
    enc_sizes: I32,
    unseen: F32,
    out_dtype: type[np.floating] = np.float32,
) -> npt.NDArray[np.floating]:
    """Turn feature-major columns into the model's row-major input in one pass.

    Numeric feature j (row j of `numeric`, shape (k, n)): NaN -> fill[j], then clip to
    [lo[j], hi[j]] (so +-inf land on the bounds), then (x - mean[j]) * inv_std[j].
    Categorical feature i (row i of `codes`, shape (c, n)): a code in [0, enc_sizes[i]) reads
    enc_table[enc_offsets[i] + code]; -1 or any out-of-range code reads unseen[i].

    Returns:
        Array of shape (n, k + c) in `out_dtype`, C-contiguous: numeric features first.
    """
    k, n = numeric.shape if numeric.ndim == 2 else (0, codes.shape[1])
    c = codes.shape[0] if codes.ndim == 2 else 0
    out = np.empty((n, k + c), dtype=out_dtype)
    if k:
        x = numeric.astype(np.float32, copy=False)
        x = np.where(np.isnan(x), fill[:, None], x)
        x = np.clip(x, lo[:, None], hi[:, None])
        out[:, :k] = ((x - mean[:, None]) * inv_std[:, None]).T
    for i in range(c):
        col = codes[i]
        valid = (col >= 0) & (col < enc_sizes[i])
        idx = np.where(valid, col, 0) + enc_offsets[i]
        vals = enc_table[idx] if enc_table.size else np.zeros(n, np.float32)
        out[:, k + i] = np.where(valid, vals, unseen[i])
    return out


def at_least_counts_reference(
    matrix: npt.NDArray[Any], edges_per_column: Sequence[Sequence[float]]
) -> npt.NDArray[np.int64]:
    """Oracle of `kernels.bin_counts.at_least_counts`: (k, max edges + 1) int64, per column the
    rows >= each of its edges (compared in float64), unused edge slots 0, then the NaN rows."""
    x = np.asarray(matrix, np.float64)
    width = max((len(e) for e in edges_per_column), default=0)
    out = np.zeros((len(edges_per_column), width + 1), np.int64)
    for j, edges in enumerate(edges_per_column):
        col = x[:, j]
        for e, edge in enumerate(edges):
            out[j, e] = np.count_nonzero(col >= np.float64(edge))
        out[j, width] = np.count_nonzero(np.isnan(col))
    return out
