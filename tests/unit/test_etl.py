from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tasks.backend import probe_gpu, resolve_backend
from tasks.bundle import frame_to_raw
from tasks.config import builtin_config, config_from_mapping
from tasks.etl import EtlOutput, load_transform, run_etl
from tasks.io import DataError
from tasks.numpy_features import transform_raw

GPU_OK, GPU_WHY = probe_gpu()
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)]
# a pandas frame, and a cuDF one where a GPU is usable
FRAME_KINDS = ["pandas", pytest.param("cudf", marks=ON_GPU)]
# the ETL's two ways of holding the table on CPU, and the in-memory one on a GPU
FRAMES_AND_DEVICES = [
    ("dask", "cpu"),
    ("single", "cpu"),
    pytest.param("single", "gpu", marks=ON_GPU),
]

CPU = resolve_backend("cpu")


def etl_of_table(
    source: Path,
    home: Path,
    frames: str,
    *,
    entities: dict[str, str] | None = None,
    device: str = "cpu",
    **data: Any,
) -> EtlOutput:
    """The ETL of a small test table: `data` is the config's data section besides its source,
    `entities` maps entity keys to their value columns."""
    mapping: dict[str, Any] = {
        "data": {"source": str(source), **data},
        "home": str(home),
        "etl_frames": frames,
    }
    if entities:
        mapping["features"] = {"entities": [{"key": k, "value": v} for k, v in entities.items()]}
    return run_etl(config_from_mapping(mapping), resolve_backend(device), home / "etl")


def assert_test_features_equal_the_scoring_transform(out: EtlOutput, id_column: str) -> None:
    """The test split's feature parquet equals what scoring computes from its raw rows."""
    spec, lookups = load_transform(out.transform_dir)
    raw_test = pd.read_parquet(out.raw_test_dir).sort_values(id_column)
    feats = pd.read_parquet(out.features_dir("test")).sort_values(id_column)
    direct = transform_raw(frame_to_raw(raw_test, spec.raw_columns), spec.model_dump(), lookups)
    np.testing.assert_allclose(feats[spec.feature_names].to_numpy(), direct, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def etl(raw_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EtlOutput, Path]:
    home = tmp_path_factory.mktemp("home")
    cfg = builtin_config(raw_dataset, home)
    return run_etl(cfg, CPU, home / "etl"), raw_dataset


def test_rows_accounted_and_time_ordered(etl: tuple[EtlOutput, Path]) -> None:
    out, raw_dir = etl
    raw = pd.read_parquet(raw_dir)
    assert sum(out.rows.values()) == len(raw)
    assert out.rows["train"] / len(raw) == pytest.approx(0.70, abs=0.02)
    ids = {
        s: pd.read_parquet(out.features_dir(s))["transaction_id"]
        for s in ("train", "valid", "test")
    }
    assert sum(len(v) for v in ids.values()) == raw.transaction_id.nunique()
    ts = raw.set_index("transaction_id").timestamp
    assert ts[ids["train"]].max() <= ts[ids["valid"]].min()
    assert ts[ids["valid"]].max() <= ts[ids["test"]].min()


def test_entity_statistics_use_training_rows_only(etl: tuple[EtlOutput, Path]) -> None:
    out, raw_dir = etl
    raw = pd.read_parquet(raw_dir)
    train_ids = pd.read_parquet(out.features_dir("train"))["transaction_id"]
    train = raw[raw.transaction_id.isin(train_ids)]
    spec, lookups = load_transform(out.transform_dir)
    card = lookups["card_id"]
    assert card["count"].sum() == len(train)
    assert set(card["key"].tolist()) == set(train.card_id.unique().tolist())
    expected = train.groupby("card_id").amount.mean()
    got = pd.Series(card["mean"], index=card["key"])
    has_amount = expected.dropna().index
    np.testing.assert_allclose(got[has_amount], expected[has_amount], rtol=1e-9)
    expected_std = train.groupby("card_id").amount.std().dropna()
    got_std = pd.Series(card["std"], index=card["key"])
    np.testing.assert_allclose(got_std[expected_std.index], expected_std, rtol=1e-6)
    assert (np.diff(card["key"]) > 0).all()  # sorted and unique: the lookups binary-search it
    # keys without any amount take the entity prior: the mean and std over all training amounts
    table = next(e for e in spec.entities if e.key == "card_id")
    assert table.prior_mean == pytest.approx(train.amount.mean(), rel=1e-9)
    assert table.prior_std == pytest.approx(train.amount.std(), rel=1e-6)
    assert spec.train_rows == len(train)
    assert spec.train_positive_rate == pytest.approx(train.is_fraud.mean())


def test_features_equal_the_scoring_transform(etl: tuple[EtlOutput, Path]) -> None:
    """The feature parquet that training reads equals what scoring computes from raw rows."""
    out, _ = etl
    spec, lookups = load_transform(out.transform_dir)
    raw_test = pd.read_parquet(out.raw_test_dir).sort_values("transaction_id")
    feats = pd.read_parquet(out.features_dir("test")).sort_values("transaction_id")
    direct = transform_raw(frame_to_raw(raw_test, spec.raw_columns), spec.model_dump(), lookups)
    np.testing.assert_allclose(feats[spec.feature_names].to_numpy(), direct, rtol=0, atol=0)
    assert np.isfinite(direct).all()


def test_second_run_reuses_output(etl: tuple[EtlOutput, Path], raw_dataset: Path) -> None:
    out, _ = etl
    stamp = (out.root / "etl.json").stat().st_mtime_ns
    cfg = builtin_config(raw_dataset, out.root.parent.parent)
    again = run_etl(cfg, CPU, out.root.parent)
    assert again.root == out.root
    assert (out.root / "etl.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("frames", ["dask", "single"])
def test_user_csv_without_timestamp_uses_stratified_split(
    tmp_path: Path, test_seed: int, frames: str
) -> None:
    rng = np.random.default_rng(test_seed)
    n = 4000
    table = pd.DataFrame(
        {
            "row": np.arange(n),
            "f1": rng.normal(size=n),
            "f2": rng.normal(size=n),
            "shop": rng.choice(["a", "b", "c"], n),
        }
    )
    table["label"] = (table.f1 + rng.normal(scale=0.5, size=n) > 1.2).astype(int)
    table.iloc[: n // 2].to_csv(tmp_path / "part1.csv", index=False)
    table.iloc[n // 2 :].to_csv(tmp_path / "part2.csv", index=False)
    out = etl_of_table(
        tmp_path / "*.csv",
        tmp_path / "home",
        frames,
        target="label",
        id="row",
        numeric=["f1", "f2"],
        categorical=["shop"],
    )
    rates = {
        s: pd.read_parquet(out.features_dir(s)).label.mean() for s in ("train", "valid", "test")
    }
    assert sum(out.rows.values()) == n
    assert max(rates.values()) - min(rates.values()) < 0.01
    spec, _ = load_transform(out.transform_dir)
    assert spec.feature_names == ["f1", "f2", "shop"]


def test_raw_test_split_keeps_only_raw_columns(etl: tuple[EtlOutput, Path]) -> None:
    out, raw_dir = etl
    raw_cols = set(pd.read_parquet(raw_dir).columns)
    assert set(pd.read_parquet(out.raw_test_dir).columns) == raw_cols


def test_hash_sample_is_deterministic_and_sized(test_seed: int) -> None:
    from tasks.etl import hash_sample_partition

    frame = pd.DataFrame(
        {"id": np.arange(200_000), "x": np.random.default_rng(test_seed).random(200_000)}
    )
    a = hash_sample_partition(frame, id_col="id", frac=0.1, seed=7)
    b = hash_sample_partition(frame.iloc[::-1], id_col="id", frac=0.1, seed=7)
    assert sorted(a.id) == sorted(b.id)  # membership depends on the id only, not on row order
    assert len(a) == pytest.approx(20_000, rel=0.05)
    assert set(a.id) != set(hash_sample_partition(frame, id_col="id", frac=0.1, seed=8).id)


def assert_close_tree(got: object, want: object, where: str = "spec") -> None:
    """Nested spec JSON equal, floats within 1e-9 relative (sums in another order)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_close_tree(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close_tree(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), where
    else:
        assert got == want, where


def test_single_frame_etl_equals_dask_etl(etl: tuple[EtlOutput, Path], tmp_path: Path) -> None:
    """The in-memory path (what one GPU runs) gives the dask path's split, spec and features."""
    by_dask, raw_dir = etl
    cfg = builtin_config(raw_dir, tmp_path).model_copy(update={"etl_frames": "single"})
    single = run_etl(cfg, CPU, tmp_path / "etl")
    assert len(list(single.features_dir("train").glob("*.parquet"))) == 1
    assert len(list(by_dask.features_dir("train").glob("*.parquet"))) > 1  # really two paths
    assert single.rows == by_dask.rows
    spec_single, lookups_single = load_transform(single.transform_dir)
    spec_dask, lookups_dask = load_transform(by_dask.transform_dir)
    assert_close_tree(spec_single.model_dump(), spec_dask.model_dump())
    for key, table in lookups_dask.items():
        for stat, values in table.items():
            np.testing.assert_allclose(lookups_single[key][stat], values, rtol=1e-9, err_msg=stat)
    for split in ("train", "valid", "test"):
        a = pd.read_parquet(single.features_dir(split)).sort_values("transaction_id")
        b = pd.read_parquet(by_dask.features_dir(split)).sort_values("transaction_id")
        assert list(a.columns) == list(b.columns)
        np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-6, atol=1e-7)
    raw_a = pd.read_parquet(single.raw_test_dir).sort_values("transaction_id")
    raw_b = pd.read_parquet(by_dask.raw_test_dir).sort_values("transaction_id")
    pd.testing.assert_frame_equal(raw_a.reset_index(drop=True), raw_b.reset_index(drop=True))


GIB = 2**30


@pytest.mark.parametrize(
    ("choice", "device", "gpus", "table_gib", "free_gib", "single"),
    [
        ("auto", "gpu", 1, 1, 78, True),
        ("auto", "gpu", 1, 10, 78, False),  # 8 x 10 GiB does not fit: partitions, which spill
        ("auto", "gpu", 2, 1, 78, False),
        ("auto", "cpu", 0, 1, 0, False),
        ("dask", "gpu", 1, 1, 78, False),
        ("single", "cpu", 0, 1, 0, True),
        ("single", "gpu", 1, 100, 78, True),  # the user's choice stands
    ],
)
def test_single_frame_choice(
    choice: str, device: str, gpus: int, table_gib: int, free_gib: int, single: bool
) -> None:
    from tasks.frames import use_single_frame

    chosen, why = use_single_frame(
        choice,  # type: ignore[arg-type]
        device=device,
        gpu_count=gpus,
        table_bytes=table_gib * GIB,
        free_device_bytes=free_gib * GIB,
    )
    assert chosen is single
    assert why


def test_raw_bytes_counts_only_the_wanted_columns(raw_dataset: Path) -> None:
    import pyarrow.parquet as pq

    from tasks.io import raw_bytes

    files = sorted(raw_dataset.glob("*.parquet"))
    every = pq.read_schema(files[0]).names
    whole = raw_bytes(files, every)
    some = raw_bytes(files, every[:2])
    assert 0 < some < whole
    in_memory = sum(pq.read_table(f).nbytes for f in files)
    assert whole == pytest.approx(in_memory, rel=0.5)  # footer sizes track in-memory sizes


def test_training_rows_get_out_of_fold_entity_rates(etl: tuple[EtlOutput, Path]) -> None:
    """A training row's entity target rate leaves out its own fold's rows (its own label)."""
    from tasks.etl import FOLD_COLUMN, TARGET_FOLDS, id_hash

    out, raw_dir = etl
    spec, _ = load_transform(out.transform_dir)
    cfg = builtin_config(raw_dir, out.root.parent.parent)
    smoothing, prior = cfg.features.target_smoothing, spec.train_positive_rate
    feats = pd.read_parquet(out.features_dir("train"))
    raw = pd.read_parquet(raw_dir)
    train = raw[raw.transaction_id.isin(feats.transaction_id)].copy()
    train[FOLD_COLUMN] = id_hash(train, "transaction_id", cfg.split.seed + 1) % TARGET_FOLDS
    total = train.groupby("card_id").is_fraud.agg(["sum", "count"])
    fold = train.groupby(["card_id", FOLD_COLUMN]).is_fraud.agg(["sum", "count"])
    keys = pd.MultiIndex.from_arrays([train.card_id, train[FOLD_COLUMN]])
    pos = total["sum"].reindex(train.card_id).to_numpy() - fold["sum"].reindex(keys).to_numpy()
    n = total["count"].reindex(train.card_id).to_numpy() - fold["count"].reindex(keys).to_numpy()
    rate = (pos + smoothing * prior) / (n + smoothing)
    feature = next(f for f in spec.numeric if f.name == "card_id__target_rate")
    expected = (np.clip(rate, feature.lo, feature.hi) - feature.mean) / feature.std
    got = feats.set_index("transaction_id").loc[train.transaction_id, feature.name].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_split_by_time_cuts_puts_missing_timestamps_in_train() -> None:
    from tasks.etl import SPLIT_COLUMN, assign_split

    ts = pd.to_datetime(["2026-01-01", "2026-02-01", None, "2026-03-01", "2026-04-01"]).astype(
        "datetime64[us]"
    )
    frame = pd.DataFrame({"id": np.arange(5), "y": [0, 1, 0, 1, 0], "t": ts})
    cut_valid = int(pd.Timestamp("2026-02-01").value // 1000)
    cut_test = int(pd.Timestamp("2026-03-15").value // 1000)
    out = assign_split(
        frame,
        target="y",
        timestamp="t",
        cuts=(cut_valid, cut_test),
        valid_fraction=0.15,
        test_fraction=0.15,
        seed=1,
        id_col="id",
    )
    assert out[SPLIT_COLUMN].tolist() == [0, 1, 0, 1, 2]


@pytest.mark.parametrize("failing_dir", ["raw_test", "train"])
def test_a_failed_write_on_either_thread_fails_the_etl_and_leaves_no_output(
    raw_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_dir: str
) -> None:
    """The raw test split is written on a background thread beside the fits: a write that fails
    there (or on the main thread) fails the ETL after both finish, and no output is published.
    The failure is injected into the real writer (a disk error cannot be made to order)."""
    import tasks.etl

    real_write = tasks.etl.write_parquet_dir

    def write_failing_once(frame: object, directory: Path, **options: Any) -> None:
        if directory.name == failing_dir:
            raise OSError(f"no space left on device (injected for {directory.name})")
        real_write(frame, directory, **options)

    monkeypatch.setattr(tasks.etl, "write_parquet_dir", write_failing_once)
    out_root = tmp_path / "etl"
    with pytest.raises(OSError, match=f"injected for {failing_dir}"):
        run_etl(builtin_config(raw_dataset, tmp_path / "home"), CPU, out_root)
    assert not list(out_root.glob("*/etl.json"))
    monkeypatch.setattr(tasks.etl, "write_parquet_dir", real_write)
    done = run_etl(builtin_config(raw_dataset, tmp_path / "home"), CPU, out_root)  # a retry works
    assert sum(done.rows.values()) == len(pd.read_parquet(raw_dataset))
    assert len(pd.read_parquet(done.raw_test_dir)) == done.rows["test"]


def test_a_failed_transform_save_on_its_thread_fails_the_etl(
    raw_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transform files are saved on a background thread while the features are written: a
    save that fails there fails the ETL, and no output is published."""
    import tasks.etl

    def save_failing(*args: object, **kwargs: object) -> None:
        raise OSError("no space left on device (injected for the transform)")

    monkeypatch.setattr(tasks.etl, "save_transform", save_failing)
    out_root = tmp_path / "etl"
    with pytest.raises(OSError, match="injected for the transform"):
        run_etl(builtin_config(raw_dataset, tmp_path / "home"), CPU, out_root)
    assert not list(out_root.glob("*/etl.json"))


@pytest.mark.parametrize("frame_kind", FRAME_KINDS)
def test_fit_entity_on_a_small_table(frame_kind: str) -> None:
    """Totals are the folds' sums; an entity without values takes the priors; the out-of-fold
    rate leaves out exactly that fold's rows. The same on a cuDF frame (the GPU path)."""
    from tasks.etl import FOLD_COLUMN, TARGET_FOLDS, fit_entity

    train = pd.DataFrame(
        {
            "k": [1, 1, 2, 2, 3, 1],
            "v": [1.0, 3.0, np.nan, np.nan, 5.0, 2.0],
            "y": [1, 0, 0, 1, 0, 1],
            FOLD_COLUMN: np.array([0, 1, 0, 2, 4, 1], np.int8),
        }
    )
    if frame_kind == "cudf":
        import cudf

        train = cudf.DataFrame(train)
    prior, m = 0.5, 2.0
    table, lookup, oof = fit_entity(train, "k", "v", "y", prior, m)
    assert lookup["key"].tolist() == [1, 2, 3]
    assert lookup["count"].tolist() == [3, 2, 1]
    values = np.array([1.0, 3.0, 5.0, 2.0])
    assert table.prior_mean == pytest.approx(values.mean(), rel=1e-12)
    assert table.prior_std == pytest.approx(values.std(ddof=1), rel=1e-12)
    np.testing.assert_allclose(lookup["mean"], [2.0, table.prior_mean, 5.0], rtol=1e-12)
    np.testing.assert_allclose(lookup["std"], [1.0, table.prior_std, table.prior_std], rtol=1e-12)
    np.testing.assert_allclose(
        lookup["target_rate"],
        [(2 + m * prior) / (3 + m), (1 + m * prior) / (2 + m), m * prior / (1 + m)],
    )
    assert oof.shape == (3, TARGET_FOLDS)
    # key 1 without fold 1 (rows y=0 and y=1): one row, y=1; without fold 3 (no rows): all three
    assert oof[0, 1] == pytest.approx((1 + m * prior) / (1 + m))
    assert oof[0, 3] == pytest.approx(lookup["target_rate"][0])


@pytest.mark.parametrize("frame_kind", FRAME_KINDS)
def test_integer_key_sums_equal_the_grouping(frame_kind: str, test_seed: int) -> None:
    """The array path of fit_entity (integer keys of an in-memory frame) gives the grouping's
    sorted keys and per-(entity, fold) sums: with missing keys (left out), missing values,
    missing labels, negative and sparse keys, and entities absent from some folds."""
    from tasks.etl import FOLD_COLUMN, TARGET_FOLDS, grouped_fold_sums, integer_key_fold_sums

    rng = np.random.default_rng(test_seed)
    n = 20_000
    keys = pd.array(rng.choice([-7, 0, 3, 10**12, *range(100, 400)], n), dtype="Int64")
    keys[rng.random(n) < 0.05] = pd.NA
    values = rng.normal(5.0, 2.0, n)
    values[rng.random(n) < 0.1] = np.nan
    labels = pd.array((rng.random(n) < 0.2).astype(int), dtype="Int64")
    labels[rng.random(n) < 0.02] = pd.NA
    train = pd.DataFrame(
        {"k": keys, "v": values, "y": labels, FOLD_COLUMN: rng.integers(0, 5, n).astype(np.int8)}
    )
    if frame_kind == "cudf":
        import cudf

        train = cudf.from_pandas(train)
    want_keys, want = grouped_fold_sums(train, "k", "v", "y")
    got_keys, got = integer_key_fold_sums(train, "k", "v", "y")
    np.testing.assert_array_equal(got_keys, np.asarray(want_keys, np.int64))
    assert not np.isin(got_keys, [None]).any()
    for name, table in want.items():
        assert got[name].shape == (len(want_keys), TARGET_FOLDS)
        np.testing.assert_allclose(
            to_numpy(got[name]), to_numpy(table), rtol=1e-12, atol=1e-9, err_msg=name
        )
    assert to_numpy(got["count"]).sum() == int((train["k"].notna() & train["y"].notna()).sum())


def to_numpy(values: Any) -> np.ndarray:
    return values.get() if hasattr(values, "get") else np.asarray(values)


@pytest.mark.parametrize(("frames", "device"), FRAMES_AND_DEVICES)
def test_string_entity_keys(tmp_path: Path, test_seed: int, frames: str, device: str) -> None:
    """An entity keyed by strings (with missing keys and values, non-ASCII keys): the lookup
    holds the sorted distinct training keys with their count, mean and std, as pandas computes
    them, saved without pickle; the ETL's features equal the scoring transform's."""
    rng = np.random.default_rng(test_seed)
    n = 3000
    stores = np.array([f"store-{i:02d}" for i in range(40)] + ["Zürich", "ärger"])
    table = pd.DataFrame(
        {
            "row": np.arange(n),
            "store": rng.choice(stores, n).astype(object),
            "spend": rng.gamma(2.0, 10.0, n),
        }
    )
    table.loc[rng.choice(n, 100, replace=False), "store"] = None
    table.loc[rng.choice(n, 200, replace=False), "spend"] = np.nan
    table["label"] = (rng.random(n) < 0.2).astype(int)
    table.to_parquet(tmp_path / "part.parquet", index=False)
    out = etl_of_table(
        tmp_path / "*.parquet",
        tmp_path / "home",
        frames,
        entities={"store": "spend"},
        device=device,
        target="label",
        id="row",
        numeric=["spend"],
        categorical=[],
    )
    _, lookups = load_transform(out.transform_dir)
    lookup = lookups["store"]
    train_ids = pd.read_parquet(out.features_dir("train"))["row"]
    train = table[table.row.isin(train_ids)]
    grouped = train.dropna(subset=["store"]).groupby("store")
    assert [str(k) for k in lookup["key"]] == sorted(grouped.groups)
    np.testing.assert_array_equal(lookup["count"], grouped.label.count().to_numpy())
    np.testing.assert_allclose(lookup["mean"], grouped.spend.mean().to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(lookup["std"], grouped.spend.std().to_numpy(), rtol=1e-6)
    assert_test_features_equal_the_scoring_transform(out, "row")


@pytest.mark.parametrize("frames", ["dask", "single"])
def test_category_typed_parquet_columns(tmp_path: Path, test_seed: int, frames: str) -> None:
    """Files written from pandas `category` columns, each with its own categories (so their
    dictionary index widths differ): the ETL reads them as plain values, as if they were
    strings, and its output and spec equal those of the same data written as strings."""
    rng = np.random.default_rng(test_seed)
    parts = []
    for i, n_stores in enumerate((40, 200)):  # int8 and int16 dictionary indices
        n = 1500
        parts.append(
            pd.DataFrame(
                {
                    "row": np.arange(i * n, (i + 1) * n),
                    "store": rng.choice([f"s{j:03d}" for j in range(n_stores)], n),
                    "kind": rng.choice(["a", "b", "c"], n),
                    "spend": rng.gamma(2.0, 10.0, n),
                    "label": (rng.random(n) < 0.2).astype(int),
                }
            )
        )
    outputs = {}
    for typed in ("category", "string"):
        source = tmp_path / typed
        source.mkdir()
        for i, part in enumerate(parts):
            if typed == "category":
                part = part.astype({"store": "category", "kind": "category"})
            part.to_parquet(source / f"part-{i}.parquet", index=False)
        outputs[typed] = etl_of_table(
            source / "*.parquet",
            tmp_path / f"home-{typed}",
            frames,
            entities={"store": "spend"},
            target="label",
            id="row",
            numeric=["spend"],
            categorical=["kind"],
        )
    cat, plain = outputs["category"], outputs["string"]
    assert cat.rows == plain.rows and sum(cat.rows.values()) == 3000
    cat_spec, cat_lookups = load_transform(cat.transform_dir)
    plain_spec, plain_lookups = load_transform(plain.transform_dir)
    assert "category" not in cat_spec.raw_dtypes.values()
    assert cat_spec.categorical == plain_spec.categorical
    np.testing.assert_array_equal(cat_lookups["store"]["key"], plain_lookups["store"]["key"])
    for split in ("train", "test"):
        a = pd.read_parquet(cat.features_dir(split)).sort_values("row")
        b = pd.read_parquet(plain.features_dir(split)).sort_values("row")
        np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())


@pytest.mark.parametrize("target_type", ["bool", "float64"])
@pytest.mark.parametrize("frames", ["dask", "single"])
def test_string_ids_boolean_target_nullable_ints_and_spaced_names(
    tmp_path: Path, test_seed: int, frames: str, target_type: str
) -> None:
    """String ids (the dask path could not write them: no type to infer from an object
    column), a boolean or float 0/1 target, a nullable integer column with missing values, and column
    names with spaces: every row lands in one split and its features equal the scoring
    transform's."""
    rng = np.random.default_rng(test_seed)
    n = 4000
    table = pd.DataFrame(
        {
            "tx id": [f"T{i:06d}" for i in range(n)],
            "amount usd": rng.gamma(2.0, 10.0, n),
            "visits": pd.array(rng.integers(0, 20, n), dtype="Int64"),
            "shop": rng.choice(["a", "b", "c"], n),
            "when": pd.Timestamp("2026-01-01")
            + pd.to_timedelta(np.sort(rng.integers(0, 90 * 86400, n)), unit="s"),
        }
    )
    table.loc[rng.choice(n, 200, replace=False), "visits"] = pd.NA
    table["fraud"] = (rng.random(n) < 0.05 + 0.2 * (table["amount usd"] > 40)).astype(target_type)
    table.iloc[: n // 2].to_parquet(tmp_path / "p0.parquet", index=False)
    table.iloc[n // 2 :].to_parquet(tmp_path / "p1.parquet", index=False)
    out = etl_of_table(
        tmp_path / "*.parquet",
        tmp_path / "home",
        frames,
        target="fraud",
        id="tx id",
        timestamp="when",
        numeric=["amount usd", "visits"],
        categorical=["shop"],
    )
    ids = pd.concat(pd.read_parquet(out.features_dir(s))["tx id"] for s in out.rows)
    assert sorted(ids) == sorted(table["tx id"])  # each row once, in one split
    assert_test_features_equal_the_scoring_transform(out, "tx id")


@pytest.mark.parametrize("frames", ["dask", "single"])
def test_csv_with_boolean_target_timestamp_and_late_missing_integers(
    tmp_path: Path, test_seed: int, frames: str
) -> None:
    """CSV whose integer column has missing values only in its second file (dask infers types
    from the first rows, and the read failed), with a True/False target and ISO timestamps
    (parsing them gave the target an `object` type in dask's metadata, and its sum failed)."""
    rng = np.random.default_rng(test_seed)
    n = 3000
    table = pd.DataFrame(
        {
            "row": np.arange(n),
            "visits": rng.integers(0, 20, n).astype(float),
            "amount": rng.gamma(2.0, 10.0, n),
            "when": (
                pd.Timestamp("2026-01-01")
                + pd.to_timedelta(np.sort(rng.integers(0, 90 * 86400, n)), unit="s")
            ).strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    table["fraud"] = rng.random(n) < 0.1 + 0.2 * (table.amount > 40)
    late = rng.choice(np.arange(n // 2, n), 100, replace=False)
    table.loc[late, "visits"] = np.nan
    first = table.iloc[: n // 2].astype({"visits": int})  # written as integers
    first.to_csv(tmp_path / "p0.csv", index=False)
    table.iloc[n // 2 :].to_csv(tmp_path / "p1.csv", index=False)
    out = etl_of_table(
        tmp_path / "*.csv",
        tmp_path / "home",
        frames,
        target="fraud",
        id="row",
        timestamp="when",
        numeric=["visits", "amount"],
        categorical=[],
    )
    assert sum(out.rows.values()) == n
    spec, _ = load_transform(out.transform_dir)
    assert spec.train_positive_rate == pytest.approx(
        table.fraud[table.row.isin(pd.read_parquet(out.features_dir("train")).row)].mean()
    )
    visits = next(f for f in spec.numeric if f.name == "visits")
    assert 0 <= visits.fill <= 19


@pytest.mark.parametrize("frames", ["dask", "single"])
def test_nullable_integer_entity_key_and_integer_categories(
    tmp_path: Path, test_seed: int, frames: str
) -> None:
    """An entity keyed by a nullable integer column (pandas Int64, some keys missing) and a
    categorical column of integers: the lookup holds pandas' distinct training keys, and the
    features equal the scoring transform's."""
    rng = np.random.default_rng(test_seed)
    n = 3000
    table = pd.DataFrame(
        {
            "id": np.arange(n),
            "zip": rng.choice([10001, 10002, 94105, 60601], n),
            "cust": pd.array(rng.integers(0, 300, n), dtype="Int64"),
            "amt": rng.gamma(2.0, 10.0, n).astype(np.float32),
        }
    )
    table.loc[rng.choice(n, 100, replace=False), "cust"] = pd.NA
    table["y"] = (rng.random(n) < 0.1 + 0.2 * (table.amt > 40)).astype(np.int8)
    table.iloc[: n // 2].to_parquet(tmp_path / "a.parquet", index=False)
    table.iloc[n // 2 :].to_parquet(tmp_path / "b.parquet", index=False)
    out = etl_of_table(
        tmp_path / "*.parquet",
        tmp_path / "home",
        frames,
        entities={"cust": "amt"},
        target="y",
        id="id",
        numeric=["amt"],
        categorical=["zip"],
    )
    _, lookups = load_transform(out.transform_dir)
    train = table[table.id.isin(pd.read_parquet(out.features_dir("train")).id)]
    counts = train.dropna(subset=["cust"]).groupby("cust").y.count()
    np.testing.assert_array_equal(lookups["cust"]["key"].astype(np.int64), counts.index)
    np.testing.assert_array_equal(lookups["cust"]["count"], counts.to_numpy())
    assert_test_features_equal_the_scoring_transform(out, "id")


@pytest.mark.parametrize("frames", ["dask", "single"])
def test_time_zone_aware_timestamps(tmp_path: Path, test_seed: int, frames: str) -> None:
    """Zone-aware timestamps (with missing ones) split by time and give time features in
    their local wall time; the ETL's features equal the scoring transform's."""
    from tasks.numpy_features import time_feature_columns

    rng = np.random.default_rng(test_seed)
    n = 3000
    seconds = np.sort(rng.integers(0, 90 * 86400, n))
    table = pd.DataFrame(
        {
            "id": np.arange(n),
            "ts": pd.Timestamp("2026-03-01", tz="Europe/Zurich")
            + pd.to_timedelta(seconds, unit="s"),
            "amt": rng.gamma(2.0, 10.0, n),
        }
    )
    table.loc[rng.choice(n, 30, replace=False), "ts"] = pd.NaT
    table["y"] = (rng.random(n) < 0.1 + 0.2 * (table.amt > 40)).astype(int)
    table.iloc[: n // 2].to_parquet(tmp_path / "a.parquet", index=False)
    table.iloc[n // 2 :].to_parquet(tmp_path / "b.parquet", index=False)
    out = etl_of_table(
        tmp_path / "*.parquet",
        tmp_path / "home",
        frames,
        target="y",
        id="id",
        timestamp="ts",
        numeric=["amt"],
        categorical=[],
    )
    assert sum(out.rows.values()) == n
    ts = table.set_index("id").ts
    split_ids = {s: pd.read_parquet(out.features_dir(s)).id for s in ("train", "valid", "test")}
    assert ts[split_ids["train"]].max() <= ts[split_ids["valid"]].min()
    assert ts[split_ids["valid"]].max() <= ts[split_ids["test"]].min()
    hours = time_feature_columns(table.ts.to_numpy(), ["hour"])["hour"]
    local = table.ts.dt.hour.to_numpy(dtype=np.float64, na_value=np.nan)
    np.testing.assert_array_equal(hours, local)  # wall time, not UTC (March: UTC+1 and +2)
    assert_test_features_equal_the_scoring_transform(out, "id")


@pytest.mark.parametrize("frames", ["dask", "single"])
@pytest.mark.parametrize("problem", ["unreadable", "text_target"])
def test_bad_input_file_is_named_by_the_check_and_nothing_is_written(
    tmp_path: Path, test_seed: int, frames: str, problem: str
) -> None:
    """A bad file fails the ETL with the input check's error naming the file (and column), not
    with the reader's own error (an unreadable file would fail the read too), and no parquet
    output is left."""
    rng = np.random.default_rng(test_seed)
    n = 500
    good = pd.DataFrame(
        {"row": np.arange(n), "x": rng.normal(size=n), "label": (rng.random(n) < 0.3).astype(int)}
    )
    good.to_parquet(tmp_path / "a.parquet", index=False)
    bad = tmp_path / "b.parquet"
    if problem == "unreadable":
        bad.write_bytes(b"PAR1 this is not a parquet file")
        want = r"b\.parquet: unreadable parquet file"
    else:
        bad_rows = good.assign(row=good.row + n, label=good.label.map({0: "no", 1: "yes"}))
        bad_rows.to_parquet(bad, index=False)
        want = r"b\.parquet: column 'label'"
    with pytest.raises(DataError, match=want):
        etl_of_table(
            tmp_path / "*.parquet",
            tmp_path / "home",
            frames,
            target="label",
            id="row",
            numeric=["x"],
            categorical=[],
            timestamp=None,
        )
    etl_root = tmp_path / "home" / "etl"
    assert not etl_root.exists() or not any(etl_root.rglob("*.parquet"))


def column_encodings(directory: Path, column: str) -> set[str]:
    """The parquet encodings of `column` over every row group of every file in `directory`."""
    import pyarrow.parquet as pq

    found: set[str] = set()
    for path in sorted(directory.glob("*.parquet")):
        meta = pq.ParquetFile(path).metadata
        j = meta.schema.names.index(column)
        for g in range(meta.num_row_groups):
            found.update(meta.row_group(g).column(j).encodings)
    return found


@pytest.mark.parametrize(("frames", "device"), FRAMES_AND_DEVICES)
def test_integer_ids_are_written_delta_encoded_and_exact(
    tmp_path: Path, test_seed: int, frames: str, device: str
) -> None:
    """Integer ids go into the feature and raw-test files DELTA_BINARY_PACKED (a few bits a row
    where they increase), on both ways of holding the table, and come back exactly: 64-bit ids
    above 2**53 in shuffled order, so no float round trip or delta overflow could hide."""
    rng = np.random.default_rng(test_seed)
    n = 3000
    ids = (2**60 + rng.permutation(n) * 7919).astype(np.int64)
    table = pd.DataFrame(
        {
            "id": ids,
            "amount": rng.gamma(2.0, 10.0, n),
            "shop": rng.choice(["a", "b", "c"], n),
        }
    )
    table["fraud"] = (rng.random(n) < 0.05 + 0.2 * (table["amount"] > 40)).astype("int64")
    table.to_parquet(tmp_path / "p0.parquet", index=False)
    out = etl_of_table(
        tmp_path / "p0.parquet",
        tmp_path / "home",
        frames,
        device=device,
        target="fraud",
        id="id",
        timestamp=None,
        numeric=["amount"],
        categorical=["shop"],
    )
    for directory in [*(out.features_dir(s) for s in out.rows), out.raw_test_dir]:
        assert "DELTA_BINARY_PACKED" in column_encodings(directory, "id"), directory
        assert "DELTA_BINARY_PACKED" not in column_encodings(directory, "fraud"), directory
    written = pd.concat(pd.read_parquet(out.features_dir(s))["id"] for s in out.rows)
    assert written.dtype == np.int64
    assert sorted(written.tolist()) == sorted(ids.tolist())  # each id once, exactly
    assert_test_features_equal_the_scoring_transform(out, "id")


def test_delta_encoding_options() -> None:
    from tasks.frames import delta_encoding

    assert delta_encoding(["id", "x"], [], cudf_writer=False) == {}
    assert delta_encoding(["x"], ["id"], cudf_writer=True) == {}  # not in this frame
    assert delta_encoding(["id", "x"], ["id"], cudf_writer=True) == {
        "column_encoding": {"id": "DELTA_BINARY_PACKED"}
    }
    assert delta_encoding(["id", "x", "y"], ["id"], cudf_writer=False) == {
        "column_encoding": {"id": "DELTA_BINARY_PACKED"},
        "use_dictionary": ["x", "y"],
    }


def test_string_ids_are_not_delta_encoded() -> None:
    from tasks.etl import delta_id_columns

    assert delta_id_columns(pd.DataFrame({"id": ["a", "b"]}), "id") == []
    assert delta_id_columns(pd.DataFrame({"id": pd.array([1, None], dtype="Int64")}), "id") == [
        "id"
    ]
    assert delta_id_columns(pd.DataFrame({"id": [1.0, 2.0]}), "id") == []
    assert delta_id_columns(pd.DataFrame({"id": np.array([1, 2], np.uint64)}), "id") == []
    assert delta_id_columns(pd.DataFrame({"id": np.array([1, 2], np.int32)}), "id") == []
    assert delta_id_columns(pd.DataFrame({"x": [1, 2]}), "id") == []
