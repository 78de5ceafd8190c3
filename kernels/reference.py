"""NumPy references for the kernels in this package: the oracles that tests compare against.

Also the CPU implementation used by gpupipe when no GPU is present.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from kernels.tree_predict import CompleteForest

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


def tree_predict_reference(x: npt.ArrayLike, forest: CompleteForest) -> F32:
    """Oracle of `kernels.tree_predict.tree_predict`: P(class 1) of each row, float32 (n,).

    XGBoost's rules: in each tree a row goes left when x[feature] < threshold (float32), a NaN
    goes the node's default way, +-inf compare as numbers; the trees' leaf values are summed in
    float32 in tree order from 0.0, then the base margin (as float32) is added, then
    1 / (1 + exp(-margin)). x (n, n_features) of any real dtype is read as float32, as XGBoost
    reads it. Vectorised over rows; loops over trees and levels.
    """
    m = np.asarray(x)
    if m.ndim != 2 or m.shape[1] != forest.n_features:
        raise ValueError(f"x must be (n, {forest.n_features}), got {m.shape}")
    flat = np.ascontiguousarray(m, dtype=np.float32).reshape(-1)
    n = m.shape[0]
    row_start = np.arange(n, dtype=np.int64) * forest.n_features
    n_internal = (1 << forest.depth) - 1
    acc = np.zeros(n, np.float32)
    for t in range(forest.n_trees):
        features = forest.feature[t]
        thresholds = forest.threshold[t]
        default_left = forest.default_left[t] != 0
        node = np.zeros(n, np.int64)
        for _ in range(forest.depth):
            value = flat[row_start + features[node]]
            left = np.where(np.isnan(value), default_left[node], value < thresholds[node])
            node = 2 * node + np.where(left, 1, 2)
        acc += forest.leaf[t, node - n_internal]
    margin = acc + np.float32(forest.base_margin)
    with np.errstate(over="ignore"):  # exp(-margin) = inf for margin < -88: probability 0
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-margin))).astype(np.float32)


def string_positions_reference(
    offsets: npt.ArrayLike, chars: npt.ArrayLike, keys: Sequence[str], n: int, row_base: int = 0
) -> I32:
    """Position of each of `n` Arrow-layout strings among `keys`, -1 where none is equal.

    Row i is the UTF-8 bytes chars[offsets[row_base + i]:offsets[row_base + i + 1]]; keys are
    compared as their UTF-8 bytes (the first equal key wins).
    """
    bounds = np.asarray(offsets, np.int64)[row_base : row_base + n + 1]
    data = np.asarray(chars, np.uint8).tobytes()
    where: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        where.setdefault(key.encode("utf-8"), i)
    return np.asarray([where.get(data[a:b], -1) for a, b in pairwise(bounds.tolist())], np.int32)
