"""Raw columns -> model input matrix, with NumPy alone.

This is the CPU implementation of the fitted transform. It imports nothing from the project but
`kernels.reference`, and reads the transform spec as the plain dict of its JSON, so the Triton
Python-backend `preprocess` model ships it verbatim and computes the same features as training
and batch scoring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.reference import fused_preprocess_reference

Spec = Mapping[str, Any]
Lookup = Mapping[str, npt.NDArray[Any]]
ENTITY_STATS = ("count", "mean", "std", "target_rate")
TIME_FEATURES_DEFAULT = ("hour", "day_of_week", "is_night")
_NIGHT_END_HOUR = 6


@dataclass(frozen=True)
class DictionaryColumn:
    """A dictionary-encoded raw column: row i holds `dictionary[indices[i]]`, or is missing where
    `indices[i] < 0` (what parquet stores and pyarrow/pandas categoricals hold). Categorical
    features are coded once per dictionary entry instead of once per row."""

    indices: npt.NDArray[np.integer[Any]]
    dictionary: npt.NDArray[Any]

    def __len__(self) -> int:
        return len(self.indices)

    def dense(self) -> npt.NDArray[Any]:
        """The values row by row, as pandas holds them: numbers as float64 with NaN where
        missing, anything else as objects with None where missing."""
        values = np.asarray(self.dictionary)
        missing = np.asarray(self.indices) < 0
        if not missing.any():
            return values[self.indices]
        if values.dtype.kind in "iuf":
            out = np.full(missing.shape, np.nan)
        else:
            out = np.full(missing.shape, None, dtype=object)
        out[~missing] = values[self.indices[~missing]]
        return out


RawColumn = npt.NDArray[Any] | DictionaryColumn


def dense_column(values: RawColumn) -> npt.NDArray[Any]:
    """A raw column as a NumPy array (a dictionary column expanded row by row)."""
    return values.dense() if isinstance(values, DictionaryColumn) else values


def raw_column_names(
    id_column: str,
    numeric: Sequence[str],
    categorical: Sequence[str],
    timestamp: str | None,
    entity_keys: Sequence[str],
) -> list[str]:
    """Raw input columns a transform reads (id first), each once, in the config's order."""
    cols = [id_column, *numeric, *categorical]
    if timestamp:
        cols.append(timestamp)
    cols += [k for k in dict.fromkeys(entity_keys) if k not in cols]
    return cols


def datetime_values(values: npt.NDArray[Any]) -> npt.NDArray[np.datetime64]:
    """Timestamps as datetime64[us]: datetime64 as it is; text parsed as ISO 8601; pandas
    Timestamps with a time zone (a zone-aware column read into NumPy: an object array) in their
    local wall time, as `gpu_features.timestamps_us` counts them. Object arrays only come from
    pandas frames, so pandas is imported only for them (the Triton model sends int64)."""
    ts = np.asarray(values)
    if ts.dtype.kind != "O":
        return ts.astype("datetime64[us]")
    import pandas as pd

    parsed = pd.to_datetime(pd.Series(ts, dtype=object), format="ISO8601")
    if parsed.dt.tz is not None:
        parsed = parsed.dt.tz_localize(None)
    return parsed.to_numpy(dtype="datetime64[us]")


def time_feature_columns(
    timestamps: npt.NDArray[Any], names: Sequence[str]
) -> dict[str, npt.NDArray[np.float32]]:
    """hour, day_of_week (Monday=0) and is_night (hour < 6) from datetime64 values; NaT -> NaN."""
    ts = datetime_values(timestamps)
    missing = np.isnat(ts)
    hours = ts.astype("datetime64[h]").astype(np.int64)
    days = ts.astype("datetime64[D]").astype(np.int64)
    hour = (hours % 24).astype(np.float32)
    values = {
        "hour": hour,
        # 1970-01-01 was a Thursday (weekday 3 with Monday = 0)
        "day_of_week": ((days + 3) % 7).astype(np.float32),
        "is_night": (hour < _NIGHT_END_HOUR).astype(np.float32),
    }
    out = {}
    for name in names:
        col = values[name]
        col[missing] = np.nan
        out[name] = col
    return out


def _is_present(value: Any) -> bool:
    # None, NaN and pandas' NA (checked by type name: this module must not need pandas)
    if value is None or type(value).__name__ == "NAType":
        return False
    return not (isinstance(value, float) and value != value)


def present_mask(values: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """True where an object array holds a value (not None, NaN or pandas' NA).

    Uses pandas' vectorized `isna` when pandas is importable (training and scoring); the Triton
    preprocess model, which ships NumPy only, falls back to a Python loop with the same result.
    """
    try:
        import pandas as pd
    except ImportError:
        flat = values.ravel()
        return np.fromiter((_is_present(v) for v in flat), bool, flat.size).reshape(values.shape)
    return ~np.asarray(pd.isna(values), dtype=bool)


def lookup_positions(
    keys_sorted: npt.NDArray[Any], values: npt.NDArray[Any]
) -> npt.NDArray[np.int64]:
    """Position of each value in the sorted key array, -1 where absent (or missing)."""
    if keys_sorted.size == 0:
        return np.full(values.shape, -1, np.int64)
    vals = np.asarray(values)
    if keys_sorted.dtype.kind in "US" or vals.dtype.kind in "OUS":
        # strings: compare as str, with None/NaN as missing
        present = present_mask(vals)
        vals = np.where(present, vals, "").astype(str)
        keys = keys_sorted.astype(str)
    else:
        present = ~np.isnan(vals) if vals.dtype.kind == "f" else np.ones(vals.shape, bool)
        keys = keys_sorted
        vals = np.where(present, vals, keys[0]).astype(keys.dtype)
    pos = np.searchsorted(keys, vals)
    pos = np.minimum(pos, keys.size - 1)
    found = present & (keys[pos] == vals)
    return np.where(found, pos, -1).astype(np.int64)


def entity_feature_columns(
    keys: npt.NDArray[Any], values: npt.NDArray[Any], entity: Spec, lookup: Lookup
) -> dict[str, npt.NDArray[np.float32]]:
    """Training-window statistics of each row's entity, plus the row's z-score within it.

    Entities unseen in training get count 0 and the prior mean/std/target rate, so a new card
    is scored like an average one rather than like a missing value.
    """
    key = entity["key"]
    pos = lookup_positions(lookup["key"], keys)
    seen = pos >= 0
    safe = np.where(seen, pos, 0)
    priors = {
        "count": 0.0,
        "mean": entity["prior_mean"],
        "std": entity["prior_std"],
        "target_rate": entity["prior_target_rate"],
    }
    out: dict[str, npt.NDArray[np.float32]] = {}
    for stat in ENTITY_STATS:
        table = np.asarray(lookup[stat], dtype=np.float64)
        col = table[safe] if table.size else np.zeros(pos.shape)
        out[f"{key}__{stat}"] = np.where(seen, col, priors[stat]).astype(np.float32)
    mean = out[f"{key}__mean"].astype(np.float64)
    std = np.maximum(out[f"{key}__std"].astype(np.float64), 1e-6)
    z = (np.asarray(values, np.float64) - mean) / std
    out[f"{key}__{entity['value']}_z"] = z.astype(np.float32)
    return out


def category_codes(values: RawColumn, vocabulary: Sequence[Any]) -> npt.NDArray[np.int32]:
    """Index of each value in the (sorted) vocabulary; -1 for unseen or missing.

    Integer vocabularies compare numerically (a float column with NaN still matches); string
    vocabularies compare as str, looking up each distinct value once rather than every row. A
    `DictionaryColumn` looks up its dictionary entries, then takes them by index.
    """
    if isinstance(values, DictionaryColumn):
        return dictionary_codes(values, vocabulary)
    vocab = np.asarray(vocabulary)
    vals = np.asarray(values)
    if vocab.size and vocab.dtype.kind in "iu" and vals.dtype.kind in "iuf":
        present = ~np.isnan(vals) if vals.dtype.kind == "f" else np.ones(vals.shape, bool)
        ints = np.where(present, vals, vocab[0]).astype(np.int64)
        pos = lookup_positions(vocab.astype(np.int64), ints)
        return np.where(present, pos, -1).astype(np.int32)
    if vals.size == 0:
        return np.zeros(vals.shape, np.int32)
    obj = vals.astype(object) if vals.dtype.kind != "O" else vals
    uniques, inverse = _distinct(obj.ravel())
    if uniques.size == 0:  # every value missing
        return np.full(obj.shape, -1, np.int32)
    positions = lookup_positions(vocab.astype(str), uniques.astype(str))
    codes = np.where(inverse >= 0, positions[np.maximum(inverse, 0)], -1)
    return codes.reshape(obj.shape).astype(np.int32)


def dictionary_codes(column: DictionaryColumn, vocabulary: Sequence[Any]) -> npt.NDArray[np.int32]:
    """`category_codes` of a dictionary-encoded column: the same codes as of its dense values."""
    indices = np.asarray(column.indices)
    dictionary = np.asarray(column.dictionary)
    if dictionary.size == 0:
        return np.full(indices.shape, -1, np.int32)
    positions = category_codes(dictionary, vocabulary)
    return np.where(indices >= 0, positions[np.maximum(indices, 0)], -1).astype(np.int32)


def _distinct(obj: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """(distinct present values, index of each row's value or -1 when missing).

    pandas' hash-based factorize when pandas is importable; NumPy's sort-based unique for the
    NumPy-only Triton preprocess model. Both give the same codes after the vocabulary lookup.
    """
    try:
        import pandas as pd
    except ImportError:
        present = present_mask(obj)
        text = np.where(present, obj, "").astype(str)
        uniques, inverse = np.unique(text, return_inverse=True)
        return uniques, np.where(present, inverse.reshape(-1), -1).astype(np.int64)
    inverse, uniques = pd.factorize(obj, use_na_sentinel=True)
    return np.asarray(uniques, dtype=object), np.asarray(inverse, dtype=np.int64)


def feature_columns(
    raw: Mapping[str, RawColumn], spec: Spec, lookups: Mapping[str, Lookup]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """Raw columns -> (numeric (k, n) float32 feature-major, codes (c, n) int32).

    Categorical columns may come dictionary-encoded (`DictionaryColumn`); any other use of a
    column reads its dense values.
    """
    n = len(raw[spec["id_column"]])
    derived: dict[str, npt.NDArray[np.float32]] = {}
    if spec["time_features"]:
        derived.update(
            time_feature_columns(dense_column(raw[spec["timestamp_column"]]), spec["time_features"])
        )
    for entity in spec["entities"]:
        derived.update(
            entity_feature_columns(
                dense_column(raw[entity["key"]]),
                dense_column(raw[entity["value"]]),
                entity,
                lookups[entity["key"]],
            )
        )
    numeric = np.empty((len(spec["numeric"]), n), np.float32)
    for j, feat in enumerate(spec["numeric"]):
        name = feat["name"]
        src = derived[name] if name in derived else dense_column(raw[name])
        numeric[j] = np.asarray(src, dtype=np.float32)
    codes = np.empty((len(spec["categorical"]), n), np.int32)
    for i, feat in enumerate(spec["categorical"]):
        codes[i] = category_codes(raw[feat["name"]], feat["vocabulary"])
    return numeric, codes


def kernel_arrays(spec: Spec) -> dict[str, npt.NDArray[Any]]:
    """The spec flattened into the arrays that the fused preprocess kernel reads."""
    num = spec["numeric"]
    cats = spec["categorical"]
    sizes = [len(c["encoding"]) for c in cats]
    return {
        "fill": np.array([f["fill"] for f in num], np.float32),
        "lo": np.array([f["lo"] for f in num], np.float32),
        "hi": np.array([f["hi"] for f in num], np.float32),
        "mean": np.array([f["mean"] for f in num], np.float32),
        "inv_std": np.array([1.0 / f["std"] for f in num], np.float32),
        "enc_table": np.array([v for c in cats for v in c["encoding"]], np.float32),
        "enc_offsets": np.array(np.cumsum([0, *sizes[:-1]]) if sizes else [], np.int32),
        "enc_sizes": np.array(sizes, np.int32),
        "unseen": np.array([c["unseen"] for c in cats], np.float32),
    }


def transform_raw(
    raw: Mapping[str, RawColumn],
    spec: Spec,
    lookups: Mapping[str, Lookup],
    out_dtype: type[np.floating] = np.float32,
) -> npt.NDArray[np.floating]:
    """Raw columns -> the model's (n, n_features) row-major input matrix."""
    numeric, codes = feature_columns(raw, spec, lookups)
    params: dict[str, Any] = kernel_arrays(spec)
    return fused_preprocess_reference(numeric, codes, out_dtype=out_dtype, **params)


def load_lookup_npz(path: str) -> dict[str, npt.NDArray[Any]]:
    """Read one entity lookup table saved by `save_lookup_npz` (no pickle)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def save_lookup_npz(path: str, lookup: Lookup) -> None:
    """Save one entity lookup table without pickle: object arrays (string keys) are stored as
    fixed-width unicode, which `load_lookup_npz` reads back without pickle."""
    arrays: dict[str, Any] = {}
    for name, values in lookup.items():
        array = np.asarray(values)
        arrays[name] = array.astype(str) if array.dtype.kind == "O" else array
    np.savez(path, **arrays)
