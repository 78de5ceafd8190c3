"""Per-column statistics that the ETL fits: quantiles, imputation and scaling of many columns.

Two ways to the same numbers. On the host NumPy partitions each column (O(n) per quantile). On a
GPU one sort of all the columns at once and a gather of the order statistics replace a sort and a
device-to-host wait per statistic and column: 31 columns took 0.11 s one by one on an H100.
Both use NumPy's default ("linear") quantile, so they agree within float64 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tasks.drift import array_module_of
from tasks.gpu_features import to_host

# columns of `imputation_statistics`' result
FILL, LO, HI, MEAN, STD = range(5)


def sorted_finite(rows: Any) -> tuple[Any, Any]:
    """Each row of a (k, n) float array sorted ascending, its non-finite values (NaN, +-inf)
    moved past the finite ones as +inf, and each row's count of finite values."""
    xp = array_module_of(rows)
    finite = xp.isfinite(rows)
    return xp.sort(xp.where(finite, rows, xp.inf), axis=1), finite.sum(axis=1)


def sorted_quantiles(ordered: Any, counts: Any, probs: Sequence[float]) -> Any:
    """Linear-interpolation quantiles (NumPy's default) of the first counts[i] values of each
    sorted row: a (k, len(probs)) float64 array, NaN for rows without values."""
    xp = array_module_of(ordered)
    k, n = ordered.shape
    q = xp.asarray(np.asarray(probs, np.float64))
    last = xp.maximum(counts.astype(xp.int64) - 1, 0)[:, None]
    virtual = last.astype(xp.float64) * q[None, :]
    below = xp.minimum(xp.floor(virtual).astype(xp.int64), last)
    above = xp.minimum(below + 1, last)
    gamma = virtual - below
    if n == 0:
        return xp.full((k, len(probs)), np.nan)
    empty = (counts == 0)[:, None]  # rows of +inf only: read as 0, answered NaN
    a = xp.where(empty, 0.0, xp.take_along_axis(ordered, below, axis=1).astype(xp.float64))
    b = xp.where(empty, 0.0, xp.take_along_axis(ordered, above, axis=1).astype(xp.float64))
    diff = b - a
    # NumPy's lerp: from the nearer end, so the result stays within [a, b]
    values = xp.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    return xp.where(empty, np.nan, values)


def imputation_statistics(
    rows: Any, clip_q: tuple[float, float], *, by_sorting: bool = False
) -> npt.NDArray[np.float64]:
    """Fill (median of the finite values), clip bounds (quantiles clip_q of the finite values),
    then mean and population std after filling NaN and clipping, of each row of a (k, n) float64
    array: a (k, 5) NumPy array indexed by FILL, LO, HI, MEAN, STD.

    A row with no finite value gets fill = lo = hi = 0. CuPy rows are sorted together, NumPy rows
    partitioned one by one unless `by_sorting` (see the module docstring).
    """
    xp = array_module_of(rows)
    k, n = rows.shape
    if xp is np and not by_sorting:
        bounds = np.array([_row_bounds(row, clip_q) for row in rows]).reshape(k, 3)
    else:
        ordered, counts = sorted_finite(rows)
        bounds = xp.nan_to_num(sorted_quantiles(ordered, counts, (0.5, *clip_q)), nan=0.0)
    fill, lo, hi = (bounds[:, i : i + 1] for i in range(3))
    filled = xp.clip(xp.where(xp.isnan(rows), fill, rows), lo, hi)
    moments = xp.stack([filled.mean(axis=1), filled.std(axis=1)], axis=1) if n else xp.zeros((k, 2))
    return to_host(xp.concatenate([xp.asarray(bounds), moments], axis=1)).astype(np.float64)


def _row_bounds(row: npt.NDArray[np.float64], clip_q: tuple[float, float]) -> list[float]:
    finite = row[np.isfinite(row)]
    if finite.size == 0:
        return [0.0, 0.0, 0.0]
    return [float(v) for v in np.quantile(finite, (0.5, *clip_q))]


def column_quantiles(
    matrix: Any, probs: Sequence[float], *, by_sorting: bool = False
) -> npt.NDArray[np.float64]:
    """Linear quantiles `probs` of each column of an (n, k) matrix of finite values, in float64:
    a (k, len(probs)) NumPy array. CuPy columns are sorted together, NumPy columns partitioned one
    by one unless `by_sorting`."""
    xp = array_module_of(matrix)
    n, k = matrix.shape
    if n == 0:
        return np.full((k, len(probs)), np.nan)
    if xp is np and not by_sorting:
        return np.stack(
            [np.quantile(matrix[:, j].astype(np.float64), probs) for j in range(k)]
        ).reshape(k, len(probs))
    ordered, counts = sorted_finite(matrix.T.astype(xp.float64))
    return to_host(sorted_quantiles(ordered, counts, probs))
