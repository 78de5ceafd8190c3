from __future__ import annotations

import numpy as np
import pytest

from tasks.numpy_features import (
    DictionaryColumn,
    category_codes,
    dense_column,
    entity_feature_columns,
    lookup_positions,
    time_feature_columns,
)


def test_time_features_known_dates() -> None:
    ts = np.array(["2026-11-23T03:15", "2026-11-29T23:59", "NaT"], dtype="datetime64[us]")
    out = time_feature_columns(ts, ["hour", "day_of_week", "is_night"])
    assert out["hour"][:2].tolist() == [3.0, 23.0]
    assert out["day_of_week"][:2].tolist() == [0.0, 6.0]  # Monday, Sunday
    assert out["is_night"][:2].tolist() == [1.0, 0.0]
    assert all(np.isnan(out[k][2]) for k in out)


def test_category_codes_strings_ints_missing_unseen() -> None:
    vocab = ["chip", "online", "swipe"]
    codes = category_codes(
        np.array(["online", None, "tap", "chip", float("nan")], dtype=object), vocab
    )
    assert codes.tolist() == [1, -1, -1, 0, -1]
    assert category_codes(np.array([5411, 7995, 1234]), [5411, 7995]).tolist() == [0, 1, -1]
    assert category_codes(np.array([5411.0, np.nan]), [5411]).tolist() == [0, -1]


@pytest.mark.parametrize("n_keys", [0, 1, 50])
def test_lookup_positions_matches_dict(n_keys: int, test_seed: int) -> None:
    rng = np.random.default_rng(test_seed)
    keys = np.sort(rng.choice(1000, n_keys, replace=False))
    values = rng.integers(0, 1000, 500)
    expected = {int(k): i for i, k in enumerate(keys)}
    got = lookup_positions(keys, values)
    assert got.tolist() == [expected.get(int(v), -1) for v in values]


def test_unseen_entity_gets_prior_and_zero_count() -> None:
    lookup = {
        "key": np.array([10, 20]),
        "count": np.array([5.0, 7.0]),
        "mean": np.array([100.0, 50.0]),
        "std": np.array([10.0, 5.0]),
        "target_rate": np.array([0.2, 0.01]),
    }
    entity = {
        "key": "card",
        "value": "amount",
        "prior_mean": 60.0,
        "prior_std": 20.0,
        "prior_target_rate": 0.05,
    }
    out = entity_feature_columns(np.array([20, 99]), np.array([60.0, 100.0]), entity, lookup)
    assert out["card__count"].tolist() == [7.0, 0.0]
    assert out["card__target_rate"].tolist() == pytest.approx([0.01, 0.05])
    assert out["card__amount_z"].tolist() == pytest.approx([2.0, 2.0])


def test_integer_categories_of_different_widths() -> None:
    # compared as numbers: "10" < "7" as text, which once mis-coded these
    assert category_codes(np.array([7, 10, 99, 10, 5]), [7, 10, 99]).tolist() == [0, 1, 2, 1, -1]
    assert category_codes(np.array(["10", "7", None], dtype=object), ["10", "7"]).tolist() == [
        0,
        1,
        -1,
    ]


def test_category_codes_same_without_pandas(
    monkeypatch: pytest.MonkeyPatch, test_seed: int
) -> None:
    """The Triton preprocess model ships NumPy only: its fallback must code exactly the same."""
    import sys

    rng = np.random.default_rng(test_seed)
    values = rng.choice(
        np.array(["a", "b", "zz", "unseen", None, float("nan"), 10], dtype=object), 2000
    )
    vocab = ["10", "a", "b", "zz"]
    with_pandas = category_codes(values, vocab)
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` raise ImportError
    without = category_codes(values, vocab)
    np.testing.assert_array_equal(with_pandas, without)
    assert set(np.unique(with_pandas)) == {-1, 0, 1, 2, 3}


@pytest.mark.parametrize(
    ("dictionary", "vocab"),
    [
        (np.array(["online", "tap", "chip", None], dtype=object), ["chip", "online", "swipe"]),
        (np.array([7, 10, 99]), [7, 10]),
        (np.array(["10", "7"], dtype=object), [7, 10]),
        (np.array([], dtype=object), ["a"]),
    ],
)
def test_dictionary_column_codes_like_its_dense_values(
    dictionary: np.ndarray, vocab: list[object], test_seed: int
) -> None:
    """A dictionary-encoded column (what the CPU scoring engine reads from parquet) must get the
    codes its row-by-row values get: missing (-1 indices), unseen and mistyped values included."""
    rng = np.random.default_rng(test_seed)
    indices = rng.integers(-1, max(len(dictionary), 1), 500).astype(np.int8)
    if len(dictionary) == 0:
        indices[:] = -1
    column = DictionaryColumn(indices, dictionary)
    dense = dense_column(column)
    assert len(column) == 500 and dense.shape == (500,)
    assert all(v is None or v != v for v in dense[indices < 0])  # None, or NaN for numbers
    np.testing.assert_array_equal(category_codes(column, vocab), category_codes(dense, vocab))
