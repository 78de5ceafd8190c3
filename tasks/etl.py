"""ETL: raw table -> split -> fitted transform spec (+ entity lookups) -> feature parquet.

Written once against dask.dataframe and in-memory frames (`tasks.frames`), so the same code runs
with the pandas or the cuDF backend, partitioned by dask or, on one GPU, as a single cuDF frame.
Every statistic is computed on the training split only: no label or future leakage into
valid/test.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import numpy.typing as npt
import pandas as pd

from kernels.reference import fused_preprocess_reference
from tasks.backend import Backend, free_device_bytes, use_async_device_memory, visible_gpus
from tasks.column_stats import FILL, HI, LO, MEAN, STD, column_quantiles, imputation_statistics
from tasks.config import PipelineConfig
from tasks.drift import array_module_of, matrix_bin_counts
from tasks.frames import (
    compute,
    computed,
    is_int64_dtype,
    is_lazy,
    map_frame,
    persisted,
    use_single_frame,
    write_parquet_dir,
)
from tasks.gpu_features import (
    DeviceTransform,
    KeyIndex,
    column_values,
    has_nulls,
    is_cudf,
    numpy_dtype,
    preprocess,
    timestamps_us,
    to_host,
)
from tasks.io import (
    ColumnRoles,
    DataError,
    check_files,
    discover_files,
    files_fingerprint,
    raw_bytes,
)
from tasks.numpy_features import (
    TIME_FEATURES_DEFAULT,
    feature_columns,
    kernel_arrays,
    save_lookup_npz,
)
from tasks.spec import (
    CategoricalFeature,
    EntityTable,
    Histogram,
    NumericFeature,
    TransformSpec,
)

# re-exported: callers load a fitted transform from here as well
from tasks.spec import Lookups as Lookups
from tasks.spec import load_transform as load_transform

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SPLIT_COLUMN = "__split"
FOLD_COLUMN = "__fold"
SQUARE_COLUMN = "__square"
PRESENT_COLUMN = "__present"
TARGET_FOLDS = 5
STATS_SAMPLE_ROWS = 2_000_000


@dataclass(frozen=True)
class EtlOutput:
    """Where the ETL wrote its results; passed between flows as plain paths."""

    root: Path
    fingerprint: str
    backend: str
    rows: dict[str, int]

    @property
    def transform_dir(self) -> Path:
        return self.root / "transform"

    def features_dir(self, split: str) -> Path:
        return self.root / "features" / split

    @property
    def raw_test_dir(self) -> Path:
        return self.root / "raw_test"

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "fingerprint": self.fingerprint,
            "backend": self.backend,
            "rows": self.rows,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EtlOutput:
        return cls(Path(d["root"]), d["fingerprint"], d["backend"], dict(d["rows"]))

    @classmethod
    def load(cls, root: Path) -> EtlOutput:
        """Read `etl.json` under root; the directory may have been moved since it was written."""
        stored = json.loads((root / "etl.json").read_text())
        return cls.from_json({**stored, "root": str(root)})


def column_roles(cfg: PipelineConfig, *, with_target: bool = True) -> ColumnRoles:
    d = cfg.data
    roles: dict[str, Any] = {d.id: "id"}
    if with_target:
        roles[d.target] = "target"
    roles.update({c: "numeric" for c in d.numeric})
    roles.update({c: "categorical" for c in d.categorical})
    if d.timestamp:
        roles[d.timestamp] = "timestamp"
    for e in cfg.features.entities:
        roles.setdefault(e.key, "key")
    return ColumnRoles(roles)


def etl_fingerprint(files: Sequence[Path], cfg: PipelineConfig, backend: Backend) -> str:
    """Cache key: the input files plus every setting that changes the ETL output."""
    salt = json.dumps(
        {
            "data": cfg.data.model_dump(),
            "features": cfg.features.model_dump(),
            "split": cfg.split.model_dump(),
            "backend": backend.device,
            "version": 4,  # bump when the ETL output changes for the same inputs
        },
        sort_keys=True,
    )
    return files_fingerprint(files, salt)


def read_raw(files: Sequence[Path], cfg: PipelineConfig, roles: ColumnRoles) -> dd.DataFrame:
    """Lazily read the raw columns; one partition per file (or per parquet row group)."""
    cols = roles.columns
    if is_csv_input(files, cfg):
        # numeric columns as float64 from the start: dask infers each column's type from the
        # first rows, and an integer column whose missing values come later failed the read
        numeric = {c: "float64" for c in roles.of("numeric")}
        ddf = dd.read_csv([str(f) for f in files], usecols=cols, dtype=numeric)
        if cfg.data.timestamp:
            ddf = map_frame(ddf, parse_timestamps, column=cfg.data.timestamp)
        return ddf
    return with_plain_categoricals(dd.read_parquet([str(f) for f in files], columns=cols))


def parse_timestamps(part: Any, *, column: str) -> Any:
    """`column`'s ISO 8601 text as timestamps, per partition. (Assigning dask's `to_datetime`
    to the frame instead gave a boolean column the type `object` in dask's metadata, and the
    target's sum then failed.)"""
    if is_cudf(part):
        import cudf

        return part.assign(**{column: cudf.to_datetime(part[column], format="ISO8601")})
    return part.assign(**{column: pd.to_datetime(part[column], format="ISO8601")})


def with_plain_categoricals(frame: Any) -> Any:
    """The frame (dask or in memory) with `plain_categoricals` applied, where it has any."""
    if any(str(dtype) == "category" for dtype in frame.dtypes):
        return map_frame(frame, plain_categoricals)
    return frame


def plain_categoricals(part: Any) -> Any:
    """Categorical columns (parquet written from pandas `category` columns) as their plain
    values. Each file has its own categories, so the partitions' types would differ (the raw
    test split's write failed on them), and the values are what the spec and scoring see."""
    return part.assign(
        **{
            column: part[column].astype(part[column].cat.categories.dtype)
            for column, dtype in part.dtypes.items()
            if str(dtype) == "category"
        }
    )


def read_raw_frame(
    files: Sequence[Path], cfg: PipelineConfig, roles: ColumnRoles, backend: Backend
) -> Any:
    """The raw columns as one in-memory frame (the single-device path).

    Parquet on GPU: one `cudf.read_parquet` call over all the files (one pass over the GPU).
    Otherwise the dask reader, computed, so the columns get exactly the dtypes the dask path
    gives them (the fitted spec records them).
    """
    if backend.device == "gpu" and not is_csv_input(files, cfg):
        return with_plain_categoricals(read_parquet_files([str(f) for f in files], roles.columns))
    return read_raw(files, cfg, roles).compute()


def is_csv_input(files: Sequence[Path], cfg: PipelineConfig) -> bool:
    fmt = cfg.data.format
    return fmt == "csv" or (fmt == "auto" and files[0].suffix.lower() == ".csv")


def read_parquet_files(paths: Sequence[str], columns: list[str]) -> Any:
    """All the files as one cuDF frame (one `read_parquet` call: one pass over the GPU)."""
    import cudf

    return cudf.read_parquet(list(paths), columns=columns)


def _host(values: Any) -> npt.NDArray[Any]:
    """A column (pandas, cuDF, NumPy or CuPy) as a NumPy array."""
    if hasattr(values, "to_numpy") and not hasattr(values, "values_host"):
        return np.asarray(values.to_numpy())
    if hasattr(values, "values_host"):
        return np.asarray(values.values_host)
    return to_host(values)


def assign_split(
    part: pd.DataFrame,
    *,
    target: str,
    timestamp: str | None,
    cuts: tuple[int, int] | None,
    valid_fraction: float,
    test_fraction: float,
    seed: int,
    id_col: str | None = None,
    partition_info: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Label each row 0 train / 1 valid / 2 test, and give it a target-encoding fold (a hash of
    its integer id, so both backends agree; else drawn per partition).

    With a timestamp: rows before cuts[0] train, before cuts[1] valid, the rest test (missing
    timestamps train). Without: a seeded split stratified by target within each partition.
    """
    n = len(part)
    xp = array_module(part)  # labels and folds are computed where the rows are
    number = partition_info["number"] if partition_info else 0
    rng = np.random.default_rng([seed, number])
    if id_col is not None and has_integer_ids(part, id_col):
        folds = (id_hash(part, id_col, seed + 1) % xp.uint64(TARGET_FOLDS)).astype(xp.int8)
    else:
        folds = xp.asarray(rng.integers(0, TARGET_FOLDS, n).astype(np.int8))
    if timestamp is not None and cuts is not None:
        ts = timestamps_us(part[timestamp])  # NaT as the int64 minimum: below every cut
        valid_ts = ts != np.iinfo(np.int64).min
        labels = xp.zeros(n, xp.int8)
        labels[valid_ts & (ts >= cuts[0])] = 1
        labels[valid_ts & (ts >= cuts[1])] = 2
    else:
        y = _host(part[target])
        host_labels = np.zeros(n, np.int8)
        for cls in (0, 1):
            idx = np.flatnonzero(y == cls)
            rng.shuffle(idx)
            n_test = round(len(idx) * test_fraction)
            n_valid = round(len(idx) * valid_fraction)
            host_labels[idx[:n_test]] = 2
            host_labels[idx[n_test : n_test + n_valid]] = 1
        labels = xp.asarray(host_labels)
    return part.assign(**{SPLIT_COLUMN: labels, FOLD_COLUMN: folds})


def id_hash(part: Any, id_col: str, seed: int) -> Any:
    """A 64-bit mix (splitmix64) of each integer id: identical on NumPy and CuPy, so anything
    chosen by it (samples, target-encoding folds) is the same on the CPU and GPU paths."""
    xp = array_module(part)
    z = column_values(part[id_col], np.int64, 0).astype(xp.uint64)
    z = z + xp.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(0x94D049BB133111EB)
    return z ^ (z >> xp.uint64(31))


def has_integer_ids(part: Any, id_col: str) -> bool:
    return getattr(part[id_col].dtype, "kind", "O") in "iu"


def hash_sample_partition(part: Any, *, id_col: str, frac: float, seed: int) -> Any:
    """Rows whose id hashes below `frac`: the same rows on pandas and cuDF (integer ids).

    A backend's own `sample` draws from its own random generator, so the CPU and GPU paths would
    fit their statistics on different rows; a hash of the id picks identical rows on both.
    """
    if not has_integer_ids(part, id_col):
        return part.sample(frac=frac, random_state=seed)
    xp = array_module(part)
    keep = (id_hash(part, id_col, seed) >> xp.uint64(11)) < xp.uint64(int(frac * 2**53))
    return part[keep]


def hash_sample(frame: Any, id_col: str, rows: int, target_rows: int, seed: int) -> Any:
    """About `target_rows` rows of the frame (all of it when smaller), chosen by
    `hash_sample_partition`."""
    frac = min(1.0, target_rows / max(rows, 1))
    if frac >= 1.0:
        return frame
    return map_frame(frame, hash_sample_partition, id_col=id_col, frac=frac, seed=seed)


def time_cuts(
    frame: Any,
    timestamp: str,
    id_col: str,
    valid_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[int, int]:
    """Timestamps (int64 microseconds) at which valid and test begin.

    Exact quantiles of a hash-chosen sample of at most STATS_SAMPLE_ROWS rows: dask's approximate
    quantile is too coarse on time-partitioned files, and the hash picks the same rows on CPU
    and GPU, so both backends split identically.
    """
    n = int(compute(frame[timestamp].count()))
    if n == 0:
        raise DataError(f"column {timestamp!r}: every timestamp is missing")
    sample = hash_sample(frame[[id_col, timestamp]], id_col, n, STATS_SAMPLE_ROWS, seed)
    values = _host(timestamps_us(compute(sample[timestamp].dropna())))
    q = np.quantile(values, [1.0 - valid_fraction - test_fraction, 1.0 - test_fraction])
    return int(q[0]), int(q[1])


def _native_list(values: npt.NDArray[Any]) -> list[Any]:
    if values.dtype.kind in "iub":
        return [int(v) for v in values]
    return [str(v) for v in values]


def smoothed_rate(
    pos: npt.NDArray[Any], n: npt.NDArray[Any], prior: float, m: float
) -> npt.NDArray[np.float64]:
    return (np.asarray(pos, np.float64) + m * prior) / (np.asarray(n, np.float64) + m)


def _flat(stats: Any) -> pd.DataFrame:
    """A computed (pandas or cuDF) aggregation as pandas with `column_stat` column names."""
    stats = stats.to_pandas() if hasattr(stats, "to_pandas") else stats
    stats.columns = [
        "_".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in stats.columns
    ]
    return stats


def fit_categorical(
    train: Any, column: str, target: str, prior: float, smoothing: float
) -> CategoricalFeature:
    """Vocabulary (sorted) and smoothed target rate per category, from training rows."""
    stats = _flat(compute(train.groupby(column).agg({target: ["sum", "count"]})))
    stats = stats.rename(columns={f"{target}_sum": "pos", f"{target}_count": "n"})
    stats = stats.sort_index()
    keys = np.asarray(stats.index.to_numpy())
    if keys.dtype.kind not in "iub":
        keys = keys.astype(str)
        order = np.argsort(keys, kind="stable")
        keys, stats = keys[order], stats.iloc[order]
    rates = smoothed_rate(stats["pos"].to_numpy(), stats["n"].to_numpy(), prior, smoothing)
    return CategoricalFeature(
        name=column, vocabulary=_native_list(keys), encoding=[float(r) for r in rates], unseen=prior
    )


def entity_value_columns(part: Any, *, value: str) -> Any:
    """`value` as float64 with its missing values (null or NaN) as 0, its square, and a 0/1
    column saying where it was present: grouped sums of these give each group's count, sum and
    sum of squares, never null (a group of only missing values sums to 0 with count 0), on
    pandas and cuDF alike. (cuDF keeps parquet NaN as a value, and a sum over only nulls is
    null, whose fill cost 70 ms per 2M groups on an H100.)"""
    xp = array_module(part)
    x = column_values(part[value], np.float64, np.nan)
    present = ~xp.isnan(x)
    x = xp.where(present, x, 0.0)
    made = {value: x, SQUARE_COLUMN: x * x, PRESENT_COLUMN: present.astype(xp.int32)}
    if not is_cudf(part):
        return part.assign(**made)
    import cudf

    # cuDF's `assign` of CuPy arrays scans each float array for NaN (a device wait per column,
    # 60 ms of the GPU ETL's 20M rows); these have none left. The rows keep their order under
    # a fresh RangeIndex, which the grouping does not use.
    out = cudf.DataFrame(made, nan_as_null=False)
    for c in part.columns:
        if c != value:
            out[c] = part[c].reset_index(drop=True)
    return out[[*part.columns, SQUARE_COLUMN, PRESENT_COLUMN]]


def fit_entity(
    train: Any, key: str, value: str, target: str, prior: float, smoothing: float
) -> tuple[EntityTable, dict[str, npt.NDArray[Any]], npt.NDArray[np.float64]]:
    """Per-entity count, mean and std of `value` and smoothed target rate, from training rows.

    Also returns the out-of-fold target rates (n_keys, TARGET_FOLDS) that training rows get, so a
    training row's own label never feeds its features (the in-sample rate leaks the label and
    made XGBoost overfit: test ROC AUC 0.68 with it on 1M generated rows).

    One set of sums per (entity, fold) gives both: an entity's totals are its folds' sums. The
    sums stay where they were made (CuPy for cuDF) until the per-entity results. An in-memory
    frame with integer keys makes them with arrays (`integer_key_fold_sums`), anything else
    by grouping (`grouped_fold_sums`); tests hold the two equal.
    """
    if not is_lazy(train) and integer_keys(train[key]):
        keys_sorted, by_fold = integer_key_fold_sums(train, key, value, target)
    else:
        keys_sorted, by_fold = grouped_fold_sums(train, key, value, target)
    xp = array_module_of(by_fold["count"])
    totals = {name: to_host(table.sum(axis=1)) for name, table in by_fold.items()}
    # an entity's rate without one fold's rows: its totals less that fold's sums
    pos_out = xp.asarray(totals["pos"])[:, None] - by_fold["pos"]
    count_out = xp.asarray(totals["count"])[:, None] - by_fold["count"]
    oof = to_host((pos_out + smoothing * prior) / (count_out + smoothing))

    n_values, sums, squares = totals["value_count"], totals["value_sum"], totals["square_sum"]
    prior_mean, prior_std = mean_and_std(n_values.sum(), sums.sum(), squares.sum())
    prior_mean = prior_mean if np.isfinite(prior_mean) else 0.0
    prior_std = prior_std if np.isfinite(prior_std) and prior_std > 0 else 1.0
    mean, std = mean_and_std(n_values, sums, squares)
    lookup = {
        "key": keys_sorted,
        "count": totals["count"],
        "mean": np.where(np.isnan(mean), prior_mean, mean),
        "std": np.where(np.isnan(std), prior_std, std),
        "target_rate": smoothed_rate(totals["pos"], totals["count"], prior, smoothing),
    }
    table = EntityTable(
        key=key,
        value=value,
        file=f"entity_{key}.npz",
        prior_mean=float(prior_mean),
        prior_std=float(prior_std),
        prior_target_rate=prior,
    )
    return table, lookup, oof


# the grouped sums of `fit_entity`, in its aggregation's order
ENTITY_SUMS = ("count", "pos", "value_sum", "value_count", "square_sum")


def grouped_fold_sums(
    train: Any, key: str, value: str, target: str
) -> tuple[npt.NDArray[Any], dict[str, Any]]:
    """`fit_entity`'s sums (ENTITY_SUMS) per (entity, fold) by one grouping: the sorted keys
    (NumPy) and a (keys, TARGET_FOLDS) table per sum, where the grouping ran (CuPy for cuDF).
    Any key type, dask or in-memory frames."""
    work = map_frame(train[[key, value, target, FOLD_COLUMN]], entity_value_columns, value=value)
    # mean and std from sums and counts: dask-cuDF's grouped mean/std of a nullable column
    # disagreed with pandas on 2026-11-23 (H200, cuDF 26.10), sums and counts agree on both
    grouped = compute(
        work.groupby([key, FOLD_COLUMN]).agg(
            {
                target: ["count", "sum"],
                value: ["sum"],
                PRESENT_COLUMN: ["sum"],
                SQUARE_COLUMN: ["sum"],
            }
        )
    )
    grouped.columns = list(ENTITY_SUMS)
    per_fold = grouped.reset_index()
    keys_sorted = sorted_keys(per_fold[key])
    xp = array_module(per_fold)
    rows = KeyIndex.build(keys_sorted, xp).positions(per_fold[key], xp)
    folds = column_values(per_fold[FOLD_COLUMN], np.int64, 0)
    by_fold = {}
    for name in ENTITY_SUMS:
        table = xp.zeros((len(keys_sorted), TARGET_FOLDS))
        table[rows, folds] = column_values(per_fold[name], np.float64, 0.0)
        by_fold[name] = table
    return keys_sorted, by_fold


def integer_keys(series: Any) -> bool:
    """Whether a key column holds integers that fit int64 (the array path of fit_entity)."""
    dtype = numpy_dtype(series)
    if not isinstance(dtype, np.dtype):  # strings, categories, other extension types
        return False
    return dtype.kind == "i" or (dtype.kind == "u" and dtype.itemsize < 8)


def integer_key_fold_sums(
    train: Any, key: str, value: str, target: str
) -> tuple[npt.NDArray[Any], dict[str, Any]]:
    """`grouped_fold_sums` of an in-memory frame with integer keys, as arrays: sorted distinct
    keys, each row's key position by binary search, then one weighted bincount per sum over
    (position, fold). On a GPU this is a sort and five scatter-adds where the grouping built
    a hash table and a frame of results (fit_entity was 65 ms per entity at 14M rows on an
    H100). Rows with a missing key are left out, as the grouping drops them."""
    xp = array_module(train)
    column = train[key]
    keys = column_values(column, numpy_dtype(column), 0)
    folds = column_values(train[FOLD_COLUMN], np.int64, 0)
    labels = column_values(train[target], np.float64, np.nan)
    values = column_values(train[value], np.float64, np.nan)
    if has_nulls(column):
        present = xp.asarray(column_values(column.notna(), np.bool_, False))
        keys, folds, labels, values = (a[present] for a in (keys, folds, labels, values))
    distinct = xp.unique(keys)
    cell = xp.searchsorted(distinct, keys) * TARGET_FOLDS + folds
    size = int(distinct.size) * TARGET_FOLDS
    labelled, measured = ~xp.isnan(labels), ~xp.isnan(values)
    labels, values = xp.where(labelled, labels, 0.0), xp.where(measured, values, 0.0)
    weights = {
        "count": labelled.astype(xp.float64),
        "pos": labels,
        "value_sum": values,
        "value_count": measured.astype(xp.float64),
        "square_sum": values * values,
    }
    by_fold = {
        name: xp.bincount(cell, weights=weights[name], minlength=size).reshape(-1, TARGET_FOLDS)
        for name in ENTITY_SUMS
    }
    return to_host(distinct), by_fold


def sorted_keys(keys: Any) -> npt.NDArray[Any]:
    """The distinct values of a pandas or cuDF column, sorted, as a NumPy array: numbers as
    they are, anything else as fixed-width unicode (an object array cannot be saved without
    pickle). The grouping has already dropped missing keys. cuDF sorts strings by their UTF-8
    bytes, which is the code-point order NumPy sorts unicode by."""
    distinct = keys.unique()
    if is_cudf(keys):
        values = np.asarray(distinct.sort_values().to_numpy())
        return values.astype(str) if values.dtype.kind == "O" else values
    values = np.asarray(distinct)
    return np.sort(values if values.dtype.kind in "iufb" else values.astype(str))


def mean_and_std(n: Any, sums: Any, squares: Any) -> tuple[Any, Any]:
    """Mean and sample std (ddof 1) from counts, sums and sums of squares: NaN where the count
    is below 1 (mean) or 2 (std)."""
    n, sums, squares = (np.asarray(v, np.float64) for v in (n, sums, squares))
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, sums / n, np.nan)
        var = (squares - n * mean**2) / (n - 1)
        std = np.where(n > 1, np.sqrt(np.maximum(var, 0.0)), np.nan)
    return mean, std


def apply_out_of_fold(
    numeric: Any, names: Sequence[str], part: Any, oof: Mapping[str, tuple[Any, Any]], xp: Any
) -> None:
    """Replace training rows' entity target rates by their out-of-fold values, in place."""
    if not oof:
        return
    split = column_values(part[SPLIT_COLUMN], np.int64, 1)
    fold = column_values(part[FOLD_COLUMN], np.int64, 0)
    train_rows = split == 0
    for key, (keys_sorted, table) in oof.items():
        j = list(names).index(f"{key}__target_rate")
        pos = KeyIndex.build(keys_sorted, xp).positions(part[key], xp)
        use = train_rows & (pos >= 0)
        values = xp.asarray(table)[xp.where(use, pos, 0), fold].astype(xp.float32)
        numeric[j] = xp.where(use, values, numeric[j])


def derived_partition(
    part: Any,
    *,
    spec: Mapping[str, Any],
    lookups: Lookups,
    keep: Sequence[str],
    oof: Mapping[str, tuple[Any, Any]] | None = None,
) -> Any:
    """One partition's model-input columns before scaling: numeric (float32) and codes (int32).

    pandas partitions go through `numpy_features`; cuDF partitions stay on the GPU through
    `gpu_features.DeviceTransform` (same definitions, checked against each other in tests).
    """
    num_names = [f["name"] for f in spec["numeric"]]
    cat_names = [f["name"] for f in spec["categorical"]]
    if is_cudf(part):
        import cudf
        import cupy

        numeric, codes = DeviceTransform(spec, lookups, cupy).feature_columns(part)
        apply_out_of_fold(numeric, num_names, part, oof or {}, cupy)
        data = {name: numeric[j] for j, name in enumerate(num_names)}
        data.update({name: codes[i] for i, name in enumerate(cat_names)})
        # NaN stays NaN as in pandas: cuDF's default turns it into nulls, scanning and
        # synchronising per column, and nullable columns leave to_cupy's one-copy path
        out = cudf.DataFrame(data, nan_as_null=False)
        for c in keep:
            out[c] = part[c].reset_index(drop=True)
        return out
    raw = {c: _host(part[c]) for c in part.columns}
    numeric, codes = feature_columns(raw, spec, lookups)
    apply_out_of_fold(numeric, num_names, part, oof or {}, np)
    data = {name: numeric[j] for j, name in enumerate(num_names)}
    data.update({name: codes[i] for i, name in enumerate(cat_names)})
    # the kept columns' own arrays: a string column as an object NumPy array leaves dask no
    # type to write it with (pyarrow cannot infer one from dask's object placeholder)
    data.update({c: part[c].array for c in keep})
    return pd.DataFrame(data, index=pd.RangeIndex(len(part)))


def matrix_partition(part: Any, *, spec: Mapping[str, Any], keep: Sequence[str]) -> Any:
    """Derived columns -> scaled, encoded float32 model inputs (the fused kernel's job on GPU)."""
    num_names = [f["name"] for f in spec["numeric"]]
    cat_names = [f["name"] for f in spec["categorical"]]
    params: dict[str, Any] = kernel_arrays(spec)
    if is_cudf(part):
        import cudf
        import cupy

        numeric = cupy.ascontiguousarray(part[num_names].to_cupy(dtype="float32").T)
        codes = cupy.ascontiguousarray(part[cat_names].to_cupy(dtype="int32").T)
        device_params = {k: cupy.asarray(v) for k, v in params.items()}
        matrix = preprocess(numeric, codes, device_params, params, cupy)
        # one transposed copy, then each column a contiguous slice that cuDF wraps without a copy
        # (a strided column is copied one by one); the matrix has no NaN, so no NaN scan either
        columns = cupy.ascontiguousarray(matrix.T)
        out = cudf.DataFrame(
            {name: columns[j] for j, name in enumerate(num_names + cat_names)}, nan_as_null=False
        )
        for c in keep:
            out[c] = part[c].reset_index(drop=True)
        return out
    numeric = np.ascontiguousarray(part[num_names].to_numpy(np.float32).T)
    codes = np.ascontiguousarray(part[cat_names].to_numpy(np.int32).T)
    matrix = fused_preprocess_reference(numeric, codes, **params)
    out = pd.DataFrame(matrix, columns=num_names + cat_names, index=part.index)
    for c in keep:
        out[c] = part[c].array  # its own type, positionally (see derived_partition)
    return out


def array_module(frame: Any) -> Any:
    """CuPy for a cuDF frame, NumPy otherwise: statistics run where the data is."""
    if is_cudf(frame):
        import cupy

        return cupy
    return np


def fit_numeric(
    sample: Any, names: Sequence[str], clip_q: tuple[float, float]
) -> list[NumericFeature]:
    """Imputation (median), clip bounds (quantiles) and scaling (mean/std after impute+clip).

    `sample` is a pandas or cuDF frame; on cuDF the statistics are computed on the GPU, all
    columns together (`column_stats.imputation_statistics`).
    """
    if not names:
        return []
    xp = array_module(sample)
    rows = xp.stack([column_values(sample[name], np.float64, np.nan) for name in names])
    stats = imputation_statistics(rows, clip_q)
    return [
        NumericFeature(
            name=name,
            fill=float(s[FILL]),
            lo=float(s[LO]),
            hi=float(s[HI]),
            mean=float(s[MEAN]),
            std=float(s[STD]) if s[STD] > 1e-12 else 1.0,
        )
        for name, s in zip(names, stats, strict=True)
    ]


def histograms(matrix: Any, names: Sequence[str], bins: int) -> dict[str, Histogram]:
    """Decile-style bins of each model input on training rows, for the stability index.

    `matrix` is a NumPy or CuPy (n, features) array; the counting runs where it lives, with the
    binning that scoring counts with (`drift.matrix_bin_counts`), so training fractions and
    scoring counts can never disagree about which bin a value falls in.
    """
    n = int(matrix.shape[0])
    probs = [float(p) for p in np.linspace(0, 1, bins + 1)[1:-1]]
    quantiles = column_quantiles(matrix, probs) if n else np.empty((len(names), 0))
    edges = [[float(e) for e in np.unique(q)] for q in quantiles]
    counts = matrix_bin_counts(matrix, edges)
    return {
        name: Histogram(edges=e, fractions=[float(c) / max(n, 1) for c in cnt])
        for name, e, cnt in zip(names, edges, counts, strict=True)
    }


def delta_id_columns(frame: Any, id_col: str) -> list[str]:
    """The id column when it holds 64-bit signed integers (written delta-encoded), else nothing.
    Other integer widths keep the default encoding: int64 is the type tested through both
    writers, cuDF's on a GPU included."""
    if id_col not in frame.columns:
        return []
    return [id_col] if is_int64_dtype(frame[id_col].dtype) else []


def raw_dtypes(frame: Any) -> dict[str, str]:
    return {c: str(t) for c, t in frame.dtypes.items()}


def save_transform(spec: TransformSpec, lookups: Lookups, directory: Path) -> None:
    """Spec JSON plus one npz and one parquet lookup table per entity (no pickle)."""
    directory.mkdir(parents=True, exist_ok=True)
    spec.save(directory)
    for entity in spec.entities:
        lookup = lookups[entity.key]
        save_lookup_npz(str(directory / entity.file), lookup)
        frame = pd.DataFrame({entity.key: lookup["key"]})
        for stat in ("count", "mean", "std", "target_rate"):
            frame[entity.stat_column(stat)] = lookup[stat]
        # unique keys and continuous statistics: dictionary pages would only cost time
        frame.to_parquet(
            directory / f"{entity.file_stem}.parquet", index=False, use_dictionary=False
        )


def run_etl(
    cfg: PipelineConfig,
    backend: Backend,
    out_root: Path,
    progress: Callable[[str], None] = lambda _msg: None,
) -> EtlOutput:
    """The whole ETL; returns where it wrote. Idempotent: an existing complete output is reused."""
    files = discover_files(cfg.data.source, cfg.data.format)
    roles = column_roles(cfg)
    fingerprint = etl_fingerprint(files, cfg, backend)
    root = out_root / fingerprint
    if (root / "etl.json").is_file():
        progress(f"ETL output for fingerprint {fingerprint} exists, reusing it")
        return EtlOutput.load(root)
    progress(f"checking {len(files)} input file(s)")
    check_files(files, roles, cfg.data.format)
    tmp = out_root / f".{fingerprint}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with dask.config.set({"dataframe.backend": backend.dataframe_backend}):
        _run_etl(cfg, backend, files, roles, fingerprint, tmp, progress)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return EtlOutput.load(root)


class StageClock:
    """Reports each stage as it starts and keeps how long each took (for etl.json and benches)."""

    def __init__(self, progress: Callable[[str], None]) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def __call__(self, stage: str) -> None:
        self.finish()
        self.progress(stage)
        self._current = (stage, time.perf_counter())

    def finish(self) -> dict[str, float]:
        if self._current is not None:
            name, start = self._current
            self.seconds[name] = round(time.perf_counter() - start, 4)
            self._current = None
        return dict(self.seconds)


def _run_etl(
    cfg: PipelineConfig,
    backend: Backend,
    files: Sequence[Path],
    roles: ColumnRoles,
    fingerprint: str,
    root: Path,
    progress: Callable[[str], None],
) -> EtlOutput:
    d, fcfg, s = cfg.data, cfg.features, cfg.split
    clock = StageClock(progress)
    clock("reading")
    gpus = visible_gpus() if backend.device == "gpu" else 0  # a GPU backend has CUDA
    sizes_matter = cfg.etl_frames == "auto" and gpus == 1  # footers read only when they decide
    single, why = use_single_frame(
        cfg.etl_frames,
        device=backend.device,
        gpu_count=gpus,
        table_bytes=raw_bytes(files, roles.columns) if sizes_matter else 0,
        free_device_bytes=free_device_bytes() if sizes_matter else 0,
    )
    progress(f"ETL table: {'one in-memory frame' if single else 'dask partitions'} ({why})")
    if single and backend.device == "gpu" and use_async_device_memory():
        progress("ETL device memory: cudaMallocAsync pool (RMM)")
    raw = read_raw_frame(files, cfg, roles, backend) if single else read_raw(files, cfg, roles)
    clock("splitting")
    cuts = (
        time_cuts(raw, d.timestamp, d.id, s.valid_fraction, s.test_fraction, s.seed)
        if d.timestamp
        else None
    )
    raw = map_frame(
        raw,
        assign_split,
        target=d.target,
        timestamp=d.timestamp,
        cuts=cuts,
        valid_fraction=s.valid_fraction,
        test_fraction=s.test_fraction,
        seed=s.seed,
        id_col=d.id,
    )
    raw = persisted(raw)
    # Host I/O beside device work: the raw test split (final once rows are assigned) is written
    # on a thread while the statistics are fitted, and the transform files while the features
    # are computed and written. Both are waited for before the output is complete; a failure
    # either side waits for the other, then raises.
    background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gpupipe-etl-io")
    try:
        raw_test = raw[raw[SPLIT_COLUMN] == 2].drop(columns=[SPLIT_COLUMN, FOLD_COLUMN])
        delta = delta_id_columns(raw, d.id)
        raw_test_written = background.submit(
            write_parquet_dir, raw_test, root / "raw_test", delta=delta
        )
        train = raw[raw[SPLIT_COLUMN] == 0]
        n_train, pos_train = computed(train[d.target].count(), train[d.target].sum())
        n_train = int(n_train)
        if n_train == 0:
            raise DataError(f"{d.source}: the training split is empty")
        prior = float(pos_train) / n_train
        if prior in (0.0, 1.0):
            raise DataError(
                f"{d.source}: column {d.target!r}: the training split has a single class"
            )

        clock("fitting entity statistics and category encodings")
        entities, lookups, oof = [], {}, {}
        for e in fcfg.entities:
            table, lookup, rates = fit_entity(
                train, e.key, e.value, d.target, prior, fcfg.target_smoothing
            )
            entities.append(table)
            lookups[e.key] = lookup
            oof[e.key] = (lookup["key"], rates)
        categorical = [
            fit_categorical(train, c, d.target, prior, fcfg.target_smoothing) for c in d.categorical
        ]
        time_names = list(TIME_FEATURES_DEFAULT) if (fcfg.time_features and d.timestamp) else []
        numeric_names = [*d.numeric, *time_names, *(c for e in entities for c in e.feature_columns)]
        draft = TransformSpec(
            id_column=d.id,
            target_column=d.target,
            timestamp_column=d.timestamp,
            raw_numeric=list(d.numeric),
            raw_categorical=list(d.categorical),
            raw_dtypes=raw_dtypes(raw[roles.columns]),
            time_features=time_names,
            entities=entities,
            numeric=[
                NumericFeature(name=n, fill=0, lo=0, hi=0, mean=0, std=1) for n in numeric_names
            ],
            categorical=categorical,
            histograms={},
            train_rows=n_train,
            train_positive_rate=prior,
        )
        keep = [d.id, d.target, SPLIT_COLUMN]
        part_args: dict[str, Any] = {
            "spec": draft.model_dump(),
            "lookups": lookups,
            "keep": keep,
            "oof": oof,
        }
        derived = persisted(map_frame(raw, derived_partition, **part_args))

        clock("fitting numeric imputation, clipping and scaling")
        train_derived = derived[derived[SPLIT_COLUMN] == 0]
        sample = hash_sample(train_derived, d.id, n_train, STATS_SAMPLE_ROWS, s.seed)
        sample_frame = compute(sample)
        numeric = fit_numeric(sample_frame, numeric_names, fcfg.clip_quantiles)
        spec = draft.model_copy(update={"numeric": numeric})
        names = spec.feature_names
        sample_matrix = _frame_matrix(
            matrix_partition(sample_frame, spec=spec.model_dump(), keep=[]), names
        )
        spec = spec.model_copy(
            update={"histograms": histograms(sample_matrix, names, fcfg.histogram_bins)}
        )
        spec = TransformSpec.model_validate(spec.model_dump())
        transform_saved = background.submit(save_transform, spec, lookups, root / "transform")

        clock("writing feature parquet")
        matrix = map_frame(derived, matrix_partition, spec=spec.model_dump(), keep=keep)
        parts = [
            matrix[matrix[SPLIT_COLUMN] == code].drop(columns=[SPLIT_COLUMN])
            for code in range(len(SPLITS))
        ]
        if is_lazy(matrix):
            for split, part in zip(SPLITS, parts, strict=True):
                write_parquet_dir(part, root / "features" / split, delta=delta)
        else:
            with ThreadPoolExecutor(len(SPLITS), thread_name_prefix="gpupipe-etl-split") as pool:
                written = [
                    pool.submit(write_parquet_dir, part, root / "features" / split, delta=delta)
                    for split, part in zip(SPLITS, parts, strict=True)
                ]
                for w in written:
                    w.result()
        counts = _to_pandas(compute(derived[SPLIT_COLUMN].value_counts()))
        rows = {split: int(counts.get(code, 0)) for code, split in enumerate(SPLITS)}
        raw_test_written.result()
        transform_saved.result()
    finally:
        background.shutdown(wait=True)
    out = EtlOutput(root, fingerprint, backend.device, rows)
    timings = clock.finish()
    (root / "etl.json").write_text(
        json.dumps({**out.to_json(), "root": None, "stage_seconds": timings}, indent=2)
    )
    return out


def _frame_matrix(frame: Any, names: Sequence[str]) -> Any:
    """Columns of a pandas (-> NumPy) or cuDF (-> CuPy) frame as one float32 matrix."""
    if is_cudf(frame):
        return frame[list(names)].to_cupy(dtype="float32")
    return frame[list(names)].to_numpy(np.float32)


def _to_pandas(obj: Any) -> Any:
    return (
        obj.to_pandas()
        if hasattr(obj, "to_pandas") and not isinstance(obj, pd.DataFrame | pd.Series)
        else obj
    )
