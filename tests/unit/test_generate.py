"""The built-in dataset generator: schema, determinism, time order, fraud signal, idempotency."""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks.generate import (
    CHANNELS,
    COUNTRIES,
    MANIFEST,
    MCC_CODES,
    SCHEMA,
    SPAN_DAYS,
    START,
    default_entity_counts,
    generate_transactions,
)

SEED = 7
BIG_ROWS = 200_000

EXPECTED_DTYPES = {
    "transaction_id": "int64",
    "card_id": "int64",
    "merchant_id": "int64",
    "mcc": "int32",
    "amount": "float64",
    "timestamp": "datetime64[us]",
    "channel": "str",
    "country": "str",
    "customer_age": "float64",
    "is_fraud": "int8",
}


def _read(paths: list[Path]) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("big")
    return _read(generate_transactions(BIG_ROWS, out, seed=SEED, rows_per_file=50_000))


def test_schema_and_dtypes_are_exact(tmp_path: Path) -> None:
    paths = generate_transactions(2_500, tmp_path, seed=SEED, rows_per_file=1_000)
    for p in paths:
        assert pq.read_schema(p).remove_metadata() == SCHEMA
    df = _read(paths)
    assert {c: str(t) for c, t in df.dtypes.items()} == EXPECTED_DTYPES


def test_row_and_file_counts_when_rows_not_a_multiple(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    paths = generate_transactions(
        2_500,
        tmp_path,
        seed=SEED,
        rows_per_file=1_000,
        on_file_written=lambda f, r: seen.append((f, r)),
    )
    assert [p.name for p in paths] == [f"part-{i:05d}.parquet" for i in range(3)]
    assert [pq.read_metadata(p).num_rows for p in paths] == [1_000, 1_000, 500]
    assert seen == [(1, 1_000), (2, 2_000), (3, 2_500)]
    assert (tmp_path / MANIFEST).is_file()


def test_transaction_ids_unique_across_files(tmp_path: Path) -> None:
    df = _read(generate_transactions(2_500, tmp_path, seed=SEED, rows_per_file=700))
    assert df["transaction_id"].is_unique
    assert df["transaction_id"].min() == 1 and df["transaction_id"].max() == 2_500


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    a = _read(generate_transactions(3_000, tmp_path / "a", seed=SEED, rows_per_file=1_000))
    b = _read(generate_transactions(3_000, tmp_path / "b", seed=SEED, rows_per_file=1_000))
    c = _read(generate_transactions(3_000, tmp_path / "c", seed=SEED + 1, rows_per_file=1_000))
    pd.testing.assert_frame_equal(a, b)
    assert not a.drop(columns="transaction_id").equals(c.drop(columns="transaction_id"))


def test_files_cover_successive_time_windows(tmp_path: Path) -> None:
    paths = generate_transactions(5_000, tmp_path, seed=SEED, rows_per_file=1_000)
    ranges = [(df["timestamp"].min(), df["timestamp"].max()) for df in map(pd.read_parquet, paths)]
    for (_, prev_max), (next_min, _) in itertools.pairwise(ranges):
        assert prev_max < next_min
    start = pd.Timestamp(START)
    assert ranges[0][0] >= start
    assert ranges[-1][1] < start + pd.Timedelta(days=SPAN_DAYS)
    # The files share the span in proportion to their rows, so it is covered end to end.
    assert ranges[-1][1] - ranges[0][0] > pd.Timedelta(days=SPAN_DAYS - 1)


def test_values_are_in_their_domains(big: pd.DataFrame) -> None:
    assert set(big["channel"].dropna()) == set(CHANNELS)
    assert set(big["country"]) == set(COUNTRIES)
    assert set(big["mcc"]) <= set(MCC_CODES) and big["mcc"].nunique() >= 25
    assert (big.groupby("merchant_id")["mcc"].nunique() == 1).all()
    assert (big["amount"].dropna() > 0).all()
    assert big["customer_age"].dropna().between(18, 90).all()
    assert set(big["is_fraud"]) == {0, 1}
    # Cards mostly transact in their home country.
    per_country = big.groupby(["card_id", "country"]).size()
    top = per_country.groupby(level="card_id").max()
    assert (top / per_country.groupby(level="card_id").sum()).median() > 0.8


def test_missing_values_only_where_intended(big: pd.DataFrame) -> None:
    missing = big.isna().mean()
    assert 0.002 < missing["amount"] < 0.01
    assert 0.005 < missing["channel"] < 0.02
    assert 0.01 < missing["customer_age"] < 0.03
    assert missing.drop(["amount", "channel", "customer_age"]).eq(0).all()


def test_fraud_rate_is_about_one_percent(big: pd.DataFrame) -> None:
    assert 0.005 <= big["is_fraud"].mean() <= 0.02


def test_fraud_patterns_are_learnable(big: pd.DataFrame) -> None:
    base = big["is_fraud"].mean()
    night = big["timestamp"].dt.hour < 6
    ratio = big["amount"] / big.groupby("card_id")["amount"].transform("median")
    risky_mcc = big["mcc"].isin([7995, 4829])
    online = big["channel"] == "online"
    for name, mask in [("night", night), ("amount x5", ratio > 5), ("risky mcc", risky_mcc)]:
        assert big.loc[mask, "is_fraud"].mean() > 3 * base, name
    assert big.loc[online, "is_fraud"].mean() > 1.5 * base


def test_rerun_with_same_params_returns_existing_files(tmp_path: Path) -> None:
    first = generate_transactions(2_500, tmp_path, seed=SEED, rows_per_file=1_000)
    mtimes = [p.stat().st_mtime_ns for p in first]
    seen: list[tuple[int, int]] = []
    again = generate_transactions(
        2_500,
        tmp_path,
        seed=SEED,
        rows_per_file=1_000,
        on_file_written=lambda f, r: seen.append((f, r)),
    )
    assert again == first
    assert [p.stat().st_mtime_ns for p in again] == mtimes
    assert seen[-1] == (3, 2_500)


def test_missing_file_is_regenerated_identically(tmp_path: Path) -> None:
    paths = generate_transactions(2_500, tmp_path, seed=SEED, rows_per_file=1_000)
    before = pd.read_parquet(paths[1])
    untouched = paths[0].stat().st_mtime_ns
    paths[1].unlink()
    generate_transactions(2_500, tmp_path, seed=SEED, rows_per_file=1_000)
    pd.testing.assert_frame_equal(pd.read_parquet(paths[1]), before)
    assert paths[0].stat().st_mtime_ns == untouched
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "changed", [{"seed": SEED + 1}, {"rows": 2_000}, {"rows_per_file": 500}, {"n_cards": 123}]
)
def test_rerun_with_other_params_refuses(tmp_path: Path, changed: dict[str, int]) -> None:
    params = {"rows": 2_500, "seed": SEED, "rows_per_file": 1_000}
    generate_transactions(out_dir=tmp_path, **params)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=str(tmp_path)):
        generate_transactions(out_dir=tmp_path, **{**params, **changed})  # type: ignore[arg-type]


def test_refuses_part_files_of_unknown_origin(tmp_path: Path) -> None:
    (tmp_path / "part-00000.parquet").write_bytes(b"not ours")
    with pytest.raises(ValueError, match=str(tmp_path)):
        generate_transactions(100, tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rows": 0},
        {"rows": -5},
        {"rows_per_file": 0},
        {"seed": -1},
        {"seed": 2**63},
        {"n_cards": 0},
        {"n_merchants": 0},
    ],
)
def test_invalid_arguments_raise(tmp_path: Path, kwargs: dict[str, int]) -> None:
    args = {"rows": 100, **kwargs}
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        generate_transactions(out_dir=tmp_path, **args)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_default_entity_counts_are_clipped() -> None:
    assert default_entity_counts(1) == (100, 50)
    assert default_entity_counts(1_000_000) == (20_000, 2_000)
    assert default_entity_counts(10**12) == (5_000_000, 200_000)
