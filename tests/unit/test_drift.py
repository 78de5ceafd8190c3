"""Population stability index and the mergeable histogram counts behind it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.drift import (
    PSI_EPSILON,
    TRANSPOSE_BLOCK_ROWS,
    bin_counts,
    drift_level,
    feature_major,
    feature_psi,
    float32_at_least,
    histogram_counts,
    merge_counts,
    population_stability_index,
)
from tasks.etl import histograms
from tasks.spec import Histogram


def test_psi_zero_for_the_training_distribution() -> None:
    expected = [0.1, 0.2, 0.3, 0.4]
    assert population_stability_index(expected, [10, 20, 30, 40]) == pytest.approx(0.0, abs=1e-12)
    assert population_stability_index(expected, [1, 2, 3, 4]) == pytest.approx(0.0, abs=1e-12)


def test_psi_matches_the_formula() -> None:
    expected = np.array([0.25, 0.25, 0.5])
    counts = np.array([50, 30, 20])
    actual = counts / counts.sum()
    want = float(np.sum((actual - expected) * np.log(actual / expected)))
    assert population_stability_index(expected, counts) == pytest.approx(want, rel=1e-12)
    assert want > 0


def test_psi_empty_bins_use_epsilon_not_infinity() -> None:
    psi = population_stability_index([0.5, 0.5, 0.0], [0, 10, 0])
    a = np.array([PSI_EPSILON, 1.0, PSI_EPSILON])
    e = np.array([0.5, 0.5, PSI_EPSILON])
    assert math.isfinite(psi)
    assert psi == pytest.approx(float(np.sum((a - e) * np.log(a / e))), rel=1e-12)


def test_psi_without_rows_is_nan_and_shapes_must_match() -> None:
    assert math.isnan(population_stability_index([0.5, 0.5], [0, 0]))
    with pytest.raises(ValueError, match="2 bins"):
        population_stability_index([0.5, 0.5], [1, 2, 3])


def test_drift_levels() -> None:
    assert drift_level(0.01) == "stable"
    assert drift_level(0.15) == "moderate"
    assert drift_level(0.5) == "significant"
    assert drift_level(math.nan) == "n/a"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bin_counts_match_searchsorted(test_seed: int, dtype: type) -> None:
    rng = np.random.default_rng(test_seed)
    edges = np.sort(rng.normal(size=7))
    x = rng.normal(size=5000).astype(dtype)
    x[:20] = edges[:4].repeat(5).astype(dtype)  # values exactly on (float32-rounded) edges
    x[20:30] = np.nan
    x[30:35] = np.inf
    x[35:40] = -np.inf
    want = np.bincount(np.searchsorted(edges, x, side="right"), minlength=edges.size + 1)
    np.testing.assert_array_equal(bin_counts(x, edges.tolist()), want)
    assert bin_counts(x, []).tolist() == [x.size]


def test_float32_bin_counts_equal_float64_comparison(test_seed: int) -> None:
    """float32 values right around float64 edges, and edges beyond float32's range."""
    rng = np.random.default_rng(test_seed)
    edges = np.sort(np.concatenate([rng.normal(size=6), [-1e39, 1e-45, 0.1, 3e38, 1e39]]))
    near = edges[np.abs(edges) < 3.4e38].astype(np.float32)
    x = np.concatenate(
        [
            near,
            np.nextafter(near, np.float32(np.inf)),
            np.nextafter(near, np.float32(-np.inf)),
            rng.normal(size=1000).astype(np.float32),
            np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4028235e38], np.float32),
        ]
    ).astype(np.float32)
    want = np.bincount(np.searchsorted(edges, x, side="right"), minlength=edges.size + 1)
    np.testing.assert_array_equal(bin_counts(x, edges.tolist()), want)
    assert (
        float32_at_least(0.1) >= 0.1 and np.float64(np.nextafter(float32_at_least(0.1), -1)) < 0.1
    )


@pytest.mark.parametrize("rows", [0, 1, TRANSPOSE_BLOCK_ROWS, 2 * TRANSPOSE_BLOCK_ROWS + 3])
def test_feature_major_is_the_transpose(rows: int, test_seed: int) -> None:
    matrix = np.random.default_rng(test_seed).normal(size=(rows, 5)).astype(np.float32)
    out = feature_major(matrix)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, matrix.T)


def test_counts_merge_across_partitions_and_reproduce_training_fractions(test_seed: int) -> None:
    rng = np.random.default_rng(test_seed)
    matrix = rng.normal(size=(4000, 3)).astype(np.float32)
    matrix[:, 2] = rng.integers(0, 3, 4000)  # few distinct values: fewer edges
    names = ["a", "b", "c"]
    hists = histograms(matrix, names, bins=10)
    whole = histogram_counts(matrix, names, hists)
    merged: dict[str, np.ndarray] = {}
    for part in np.array_split(matrix, 7):
        merge_counts(merged, histogram_counts(part, names, hists))
    for name in names:
        np.testing.assert_array_equal(merged[name], whole[name])
        np.testing.assert_allclose(whole[name] / 4000, hists[name].fractions, atol=1e-12)
    psi = feature_psi(merged, hists)
    assert set(psi) == set(names)
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in psi.values())


def test_shifted_data_has_significant_psi(test_seed: int) -> None:
    rng = np.random.default_rng(test_seed)
    train = rng.normal(size=(20_000, 1)).astype(np.float32)
    hists = histograms(train, ["x"], bins=10)
    same = histogram_counts(rng.normal(size=(20_000, 1)), ["x"], hists)
    shifted = histogram_counts(rng.normal(1.0, 1.0, size=(20_000, 1)), ["x"], hists)
    assert drift_level(feature_psi(same, hists)["x"]) == "stable"
    assert drift_level(feature_psi(shifted, hists)["x"]) == "significant"


def test_features_without_histogram_are_skipped_and_bins_must_agree() -> None:
    hists = {"a": Histogram(edges=[0.0], fractions=[0.5, 0.5])}
    counts = histogram_counts(np.array([[-1.0, 5.0], [1.0, 6.0]]), ["a", "b"], hists)
    assert list(counts) == ["a"]
    assert counts["a"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="cannot add"):
        merge_counts({"a": np.zeros(2, np.int64)}, {"a": [1, 2, 3]})


@pytest.mark.parametrize("n_edges", [0, 1, 9])
def test_bins_from_the_kernels_counts_match_searchsorted_binning(
    test_seed: int, n_edges: int
) -> None:
    """The GPU path: the kernel's per-edge counts (here its NumPy oracle) turned into bins."""
    from kernels.reference import at_least_counts_reference
    from tasks.drift import _bins_from_at_least, matrix_bin_counts

    rng = np.random.default_rng(test_seed)
    x = rng.normal(size=(5000, 2)).astype(np.float32)
    x[:37] = np.nan
    x[40:60] = 0.0
    edges = sorted([0.0] * min(n_edges, 1) + list(rng.normal(size=max(n_edges - 1, 0))))
    per_column = [edges, edges[:1]]
    counts = at_least_counts_reference(x, per_column)
    for j, col_edges in enumerate(per_column):
        got = _bins_from_at_least(x.shape[0], counts[j, : len(col_edges)], int(counts[j, -1]))
        idx = np.searchsorted(np.asarray(col_edges, np.float64), x[:, j], side="right")
        want = np.bincount(idx, minlength=len(col_edges) + 1)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(matrix_bin_counts(x, per_column)[j], want)
