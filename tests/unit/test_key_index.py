"""Exact-match lookups of the device transform (`gpu_features.KeyIndex`), run with pandas + NumPy
against `numpy_features.lookup_positions`, the oracle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.gpu_features import KeyIndex, direct_table
from tasks.numpy_features import lookup_positions


def test_dense_integer_keys_get_a_direct_table_and_sparse_ones_do_not() -> None:
    dense = np.array([3, 4, 7, 10], np.int64)
    lo, table = direct_table(dense)  # type: ignore[misc]
    assert lo == 3
    assert table.tolist() == [0, 1, -1, -1, 2, -1, -1, 3]
    assert direct_table(np.array([0, 10**12], np.int64)) is None
    assert direct_table(np.array([0.5, 1.5])) is None
    assert direct_table(np.zeros(0, np.int64)) is None


@pytest.mark.parametrize("keys", [np.arange(0, 5000, 3), np.array([5, 10**9, 10**12])])
def test_numeric_positions_match_the_oracle(keys: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [keys, rng.integers(-10, int(keys.max()) + 10, 2000), [10**13, -(10**13)]]
    )
    index = KeyIndex.build(keys, np)
    assert (index.direct is not None) == (keys.size > 3)
    got = index.positions(pd.Series(values), np)
    np.testing.assert_array_equal(got, lookup_positions(keys, values))
    # floats and missing values: cast to the key dtype, NaN never matches
    floats = pd.Series(np.concatenate([values[:50].astype(np.float64) + 0.25, [np.nan]]))
    want = lookup_positions(keys, floats.to_numpy())
    np.testing.assert_array_equal(index.positions(floats, np), want)
    nullable = pd.Series(values[:50], dtype="Int64")
    # without missing values a nullable column reads as its NumPy type (Int64 failed)
    np.testing.assert_array_equal(
        index.positions(nullable, np), lookup_positions(keys, values[:50])
    )
    nullable.iloc[3] = pd.NA
    assert index.positions(nullable, np)[3] == -1


def test_string_positions_match_the_oracle_with_missing_and_unseen_values() -> None:
    vocab = np.array(sorted(["de", "fr", "gb", "us", "online", ""]))
    values = pd.Series(["fr", None, "us", "xx", "", "online", np.nan, "FR"], dtype=object)
    index = KeyIndex.build(vocab, np)
    got = index.positions(values, np)
    np.testing.assert_array_equal(got, lookup_positions(vocab, values.to_numpy()))
    assert got.tolist() == [2, -1, 5, -1, 0, 4, -1, -1]


def test_dictionary_encoded_columns_are_looked_up_by_category() -> None:
    """Parquet read with its dictionary (the GPU arrow reader) gives categorical columns."""
    vocab = np.array(sorted(["de", "fr", "us"]))
    values = pd.Series(["fr", None, "us", "xx", "fr", "de"], dtype=object)
    index = KeyIndex.build(vocab, np)
    categorical = values.astype("category")
    got = index.positions(categorical, np)
    np.testing.assert_array_equal(got, index.positions(values, np))
    assert got.tolist() == [1, -1, 2, -1, 1, 0]
    empty = pd.Series([None, None], dtype=object).astype("category")
    assert index.positions(empty, np).tolist() == [-1, -1]
