"""Per-column statistics of the ETL: the sorted path (what runs on a GPU) against NumPy's own
quantiles and against the partitioned path (what runs on the CPU)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.backend import probe_gpu
from tasks.column_stats import (
    FILL,
    HI,
    LO,
    MEAN,
    STD,
    column_quantiles,
    imputation_statistics,
    sorted_finite,
    sorted_quantiles,
)
from tasks.etl import fit_numeric

SEED = 20261206
CLIP_Q = (0.01, 0.99)


def awkward_rows(rng: np.random.Generator) -> np.ndarray:
    """Rows with NaN, +-inf, a constant row, an all-NaN row, one finite value, two values."""
    rows = rng.normal(size=(7, 1001)) * rng.uniform(0.1, 50, size=(7, 1))
    rows[0, rng.choice(1001, 300, replace=False)] = np.nan
    rows[1, rng.choice(1001, 20, replace=False)] = np.inf
    rows[1, rng.choice(1001, 20, replace=False)] = -np.inf
    rows[2] = 3.25
    rows[3] = np.nan
    rows[4] = np.nan
    rows[4, 17] = -2.5
    rows[5] = np.nan
    rows[5, [3, 900]] = [1.0, 4.0]
    rows[6] = np.round(rows[6])  # many ties
    return rows


def test_sorted_quantiles_equal_numpys_of_the_finite_values() -> None:
    rng = np.random.default_rng(SEED)
    rows = awkward_rows(rng)
    probs = [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]
    ordered, counts = sorted_finite(rows)
    got = sorted_quantiles(ordered, counts, probs)
    assert got.shape == (7, len(probs))
    for i, row in enumerate(rows):
        finite = row[np.isfinite(row)]
        assert counts[i] == finite.size
        if finite.size == 0:
            assert np.isnan(got[i]).all()
        else:
            np.testing.assert_allclose(got[i], np.quantile(finite, probs), rtol=1e-14, atol=0)


def test_imputation_statistics_sorted_and_partitioned_paths_agree() -> None:
    rng = np.random.default_rng(SEED + 1)
    rows = awkward_rows(rng)
    sorted_stats = imputation_statistics(rows, CLIP_Q, by_sorting=True)
    partitioned = imputation_statistics(rows, CLIP_Q)
    np.testing.assert_allclose(sorted_stats, partitioned, rtol=1e-12, atol=1e-12)
    # the definition, row by row
    for i, row in enumerate(rows):
        finite = row[np.isfinite(row)]
        if finite.size == 0:
            fill = lo = hi = 0.0
        else:
            fill = float(np.median(finite))
            lo, hi = np.quantile(finite, CLIP_Q)
        filled = np.clip(np.where(np.isnan(row), fill, row), lo, hi)
        want = [fill, lo, hi, filled.mean(), filled.std()]
        np.testing.assert_allclose(
            sorted_stats[i, [FILL, LO, HI, MEAN, STD]], want, rtol=1e-12, atol=1e-12
        )
    assert sorted_stats[3, [FILL, LO, HI, MEAN, STD]].tolist() == [0.0] * 5
    assert sorted_stats[4, FILL] == -2.5 and sorted_stats[4, STD] == 0.0


def test_statistics_of_no_rows() -> None:
    empty = np.empty((3, 0))
    assert imputation_statistics(empty, CLIP_Q, by_sorting=True).tolist() == [[0.0] * 5] * 3
    assert imputation_statistics(empty, CLIP_Q).tolist() == [[0.0] * 5] * 3
    assert np.isnan(column_quantiles(np.empty((0, 2), np.float32), [0.5])).all()


def test_column_quantiles_both_paths_equal_numpy() -> None:
    rng = np.random.default_rng(SEED + 2)
    matrix = rng.normal(size=(5000, 6)).astype(np.float32)
    matrix[:, 3] = np.round(matrix[:, 3])
    probs = [float(p) for p in np.linspace(0, 1, 11)[1:-1]]
    want = np.stack([np.quantile(matrix[:, j].astype(np.float64), probs) for j in range(6)])
    np.testing.assert_array_equal(column_quantiles(matrix, probs), want)
    np.testing.assert_allclose(
        column_quantiles(matrix, probs, by_sorting=True), want, rtol=1e-14, atol=0
    )


def test_fit_numeric_follows_its_definition_per_column() -> None:
    rng = np.random.default_rng(SEED + 3)
    rows = awkward_rows(rng)
    names = [f"x{i}" for i in range(len(rows))]
    frame = pd.DataFrame({n: r for n, r in zip(names, rows, strict=True)})
    frame["x0"] = frame["x0"].astype("Float64")  # nullable: NaN read back as nulls
    feats = fit_numeric(frame, names, CLIP_Q)
    assert [f.name for f in feats] == names
    by_name = {f.name: f for f in feats}
    finite = rows[1][np.isfinite(rows[1])]
    assert by_name["x1"].fill == pytest.approx(float(np.median(finite)), rel=1e-12)
    assert by_name["x1"].lo == pytest.approx(float(np.quantile(finite, 0.01)), rel=1e-12)
    assert by_name["x2"].std == 1.0  # constant: no scaling by zero
    assert by_name["x3"].fill == 0.0 and by_name["x3"].std == 1.0
    assert fit_numeric(frame, [], CLIP_Q) == []


GPU_OK, GPU_WHY = probe_gpu()


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
def test_cupy_statistics_equal_numpys() -> None:
    import cupy

    rng = np.random.default_rng(SEED + 4)
    rows = awkward_rows(rng)
    np.testing.assert_allclose(
        imputation_statistics(cupy.asarray(rows), CLIP_Q),
        imputation_statistics(rows, CLIP_Q),
        rtol=1e-12,
        atol=1e-12,
    )
    matrix = rng.normal(size=(4096, 5)).astype(np.float32)
    probs = [0.1, 0.5, 0.9]
    np.testing.assert_allclose(
        column_quantiles(cupy.asarray(matrix), probs),
        column_quantiles(matrix, probs),
        rtol=1e-14,
        atol=0,
    )
