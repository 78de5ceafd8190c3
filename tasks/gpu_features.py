"""Raw columns -> model input matrix on the GPU: the cuDF/CuPy twin of `tasks.numpy_features`.

Data read by cuDF stays on the device: time features come from the datetime column's integer
microseconds, entity statistics and numeric category codes from lookups in key arrays held on the
device (a direct-address table for dense integer keys, else `searchsorted`), string category codes
from an exact index lookup (a dictionary-encoded column looks up each category once), and the last
step is the fused preprocess kernel (`kernels.fused_preprocess`) when it can run, else the same
math in CuPy.

The code is written against two modules chosen at construction, an array module (`numpy` or
`cupy`) and the frames it is given (pandas or cuDF), so the unit tests run it with pandas + NumPy
and compare it with `numpy_features`, the oracle. Nothing from cuDF or CuPy is imported here at
module level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.fused_preprocess import is_available as fused_kernels_available
from kernels.reference import fused_preprocess_reference
from kernels.string_match import fits as string_match_fits
from kernels.string_match import pack_keys
from tasks.numpy_features import ENTITY_STATS, datetime_values, kernel_arrays, raw_column_names

_US_PER_HOUR = 3_600_000_000
_US_PER_DAY = 86_400_000_000
_NAT = np.iinfo(np.int64).min
_NIGHT_END_HOUR = 6
FUSED_BLOCK_N = 64
FUSED_WARPS = 4


def is_cudf(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "cudf"


def column_values(series: Any, dtype: Any, na_value: Any) -> Any:
    """A pandas or cuDF column as a NumPy or CuPy array of `dtype`, nulls replaced by na_value.

    A cuDF column that already has the dtype and no nulls is handed over without a copy.
    """
    if is_cudf(series):
        if series.null_count == 0:
            if series.dtype == np.dtype(dtype):
                return series.values
            return series.values.astype(dtype)
        return series.astype(dtype).to_cupy(na_value=na_value)
    return series.to_numpy(dtype=dtype, na_value=na_value)


def numpy_dtype(series: Any) -> Any:
    """A column's NumPy dtype: pandas' nullable types (Int64, ...) give the type they wrap;
    other extension types (strings, categories) come back as they are."""
    return getattr(series.dtype, "numpy_dtype", series.dtype)


def has_nulls(series: Any) -> bool:
    """Whether a pandas or cuDF column has missing values (cuDF keeps the count as metadata)."""
    if is_cudf(series):
        return bool(series.null_count)
    return bool(series.isna().any())


def _is_numeric(series: Any) -> bool:
    kind = getattr(series.dtype, "kind", "O")
    return kind in "iufb"


def timestamps_us(series: Any) -> Any:
    """Datetime column -> int64 microseconds since the epoch; missing values -> int64 min (NaT).

    Time-zone-aware timestamps count in their local wall time (the zone dropped, not converted
    to UTC): the hour and night features mean the hour where the row happened, and data stored
    in UTC reads the same either way.
    """
    if getattr(series.dtype, "tz", None) is not None:
        series = series.dt.tz_localize(None)
    if is_cudf(series):
        micros = series.astype("datetime64[us]").astype("int64")
        return micros.values if micros.null_count == 0 else micros.to_cupy(na_value=_NAT)
    return datetime_values(series.to_numpy()).astype(np.int64)


def time_feature_columns(ts_us: Any, names: Sequence[str], xp: Any) -> dict[str, Any]:
    """hour, day_of_week (Monday=0) and is_night from int64 microseconds; NaT -> NaN.

    Floor division, as NumPy's datetime64 unit casts do, so times before 1970 agree too.
    """
    missing = ts_us == _NAT
    hours = ts_us // _US_PER_HOUR
    days = ts_us // _US_PER_DAY
    hour = (hours % 24).astype(xp.float32)
    values = {
        "hour": lambda: hour,
        # 1970-01-01 was a Thursday (weekday 3 with Monday = 0)
        "day_of_week": lambda: ((days + 3) % 7).astype(xp.float32),
        "is_night": lambda: (hour < _NIGHT_END_HOUR).astype(xp.float32),
    }
    # `where`, not a masked assignment: no host sync to count the masked rows
    return {name: xp.where(missing, xp.float32(np.nan), values[name]()) for name in names}


# Dense integer keys (ids 0..N, the usual case) get a direct-address table of positions: one
# gather per row instead of a binary search. Used while the key range is at most this many times
# the number of keys and the table at most this many entries (int32, so 256 MiB).
_DIRECT_SPAN_PER_KEY = 8
_DIRECT_MIN_SPAN = 1 << 16
_DIRECT_MAX_SPAN = 1 << 26


def direct_table(keys: npt.NDArray[Any]) -> tuple[int, npt.NDArray[np.int32]] | None:
    """(lowest key, position of key `lowest + i` at i or -1) for sorted unique integer keys
    whose range is dense enough; None otherwise."""
    if keys.size == 0 or keys.dtype.kind not in "iu":
        return None
    lo, hi = int(keys[0]), int(keys[-1])
    span = hi - lo + 1
    if span > _DIRECT_MAX_SPAN or span > max(_DIRECT_SPAN_PER_KEY * keys.size, _DIRECT_MIN_SPAN):
        return None
    table = np.full(span, -1, np.int32)
    table[(keys.astype(np.int64) - lo)] = np.arange(keys.size, dtype=np.int32)
    return lo, table


def _string_series(keys: Sequence[str], xp: Any) -> Any:
    if xp is np:
        import pandas

        return pandas.Series(list(keys), dtype=object)
    import cudf

    return cudf.Series(list(keys), dtype="str")


@dataclass(frozen=True)
class KeyIndex:
    """Sorted keys for exact-match lookups: numeric keys on the device (with a direct-address
    table when they are dense integers), string keys on the host, and also on the device as the
    string-match kernel's packed bytes when there are few of them."""

    numeric: Any  # NumPy/CuPy array, or None for string keys
    strings: list[str] | None
    direct: Any = None  # int32 positions indexed by key - direct_base, -1 where no key
    direct_base: int = 0
    packed_strings: Any = None  # (keys, width) uint8 and (keys,) int32 lengths: pack_keys
    string_lengths: Any = None

    @classmethod
    def build(cls, keys_sorted: Any, xp: Any) -> KeyIndex:
        keys = np.asarray(keys_sorted)
        if keys.size and keys.dtype.kind in "iuf":
            dense = direct_table(keys)
            if dense is None:
                return cls(xp.asarray(keys), None)
            return cls(xp.asarray(keys), None, xp.asarray(dense[1]), dense[0])
        if keys.size == 0:
            return cls(xp.asarray(np.zeros(0, np.int64)), None)
        strings = [str(k) for k in keys]
        if xp is np or not string_match_fits(strings):
            return cls(None, strings)
        packed, lengths = pack_keys(strings)
        return cls(
            None, strings, packed_strings=xp.asarray(packed), string_lengths=xp.asarray(lengths)
        )

    @property
    def size(self) -> int:
        return len(self.strings) if self.strings is not None else int(self.numeric.size)

    def positions(self, series: Any, xp: Any) -> Any:
        """Position of each value among the keys, -1 where absent or missing (int64)."""
        n = len(series)
        if self.size == 0:
            return xp.full(n, -1, xp.int64)
        if self.numeric is not None and _is_numeric(series):
            return self._numeric_positions(series, xp)
        return self._string_positions(series, xp)

    def _numeric_positions(self, series: Any, xp: Any) -> Any:
        keys = self.numeric
        if series.dtype.kind == "f" or has_nulls(series):
            vals = column_values(series, np.float64, np.nan)
            present = ~xp.isnan(vals)
            # like numpy_features.lookup_positions: cast to the key dtype before comparing
            vals = xp.where(present, vals, keys[0]).astype(keys.dtype)
        else:
            # a pandas nullable integer column (Int64) reads as its NumPy type
            vals = column_values(series, numpy_dtype(series), 0).astype(keys.dtype, copy=False)
            present = None
        if self.direct is not None:
            offset = vals.astype(xp.int64) - self.direct_base
            inside = (offset >= 0) & (offset < self.direct.size)
            if present is not None:
                inside &= present
            return xp.where(inside, self.direct[xp.where(inside, offset, 0)], -1).astype(xp.int64)
        pos = xp.minimum(xp.searchsorted(keys, vals), keys.size - 1)
        found = keys[pos] == vals
        if present is not None:
            found &= present
        return xp.where(found, pos, -1).astype(xp.int64)

    def _string_positions(self, series: Any, xp: Any) -> Any:
        # exact string match: the position of each value in the key index (-1 when absent)
        if is_categorical(series):
            return self._categorical_positions(series, xp)
        text = series if series.dtype.kind == "O" else series.astype(str)
        if self.packed_strings is not None and is_cudf(text) and fused_kernels_available():
            pos = self._kernel_positions(text, xp)
            if pos is not None:
                if has_nulls(series):
                    pos = xp.where(column_values(series.notna(), bool, False), pos, -1)
                return pos.astype(xp.int64)
        keys = self.strings if self.strings is not None else [str(k) for k in to_host(self.numeric)]
        present = column_values(series.notna(), bool, False)
        if is_cudf(series):
            import cudf

            pos = cudf.Index(keys).get_indexer(text)
        else:
            import pandas

            pos = pandas.Index(keys).get_indexer(text)
        return xp.where(present, xp.asarray(pos), -1).astype(xp.int64)

    def _kernel_positions(self, text: Any, xp: Any) -> Any:
        """The string-match kernel over a cuDF strings column's own buffers (no copy, no host
        round trip); None when the column is not a plain strings column."""
        from cudf.core.column import access_columns

        from kernels.string_match import string_positions

        column = text._column
        # as cuDF's own operations do: the buffers cannot be spilled to host while read
        with access_columns(column, mode="read", scope="internal"):
            buffers = strings_column_buffers(column.plc_column)
            if buffers is None:
                return None
            offsets, chars, row_base = buffers
            pos = string_positions(
                offsets, chars, self.packed_strings, self.string_lengths, len(text), row_base
            )
        return xp.from_dlpack(pos)

    def _categorical_positions(self, series: Any, xp: Any) -> Any:
        """A dictionary-encoded column (parquet read with its dictionary): look up the few
        distinct values once, then one gather by code per row."""
        categories = series.cat.categories
        names = categories.to_pandas() if is_cudf(categories) else categories
        lookup = self._string_positions(_string_series([str(v) for v in names], xp), xp)
        if lookup.size == 0:
            return xp.full(len(series), -1, xp.int64)
        present = column_values(series.notna(), bool, False)
        codes = column_values(series.cat.codes.astype("int64"), np.int64, 0)
        codes = xp.where(present & (codes >= 0), codes, 0)
        return xp.where(present, lookup[codes], -1).astype(xp.int64)


def strings_column_buffers(column: Any) -> tuple[Any, Any, int] | None:
    """(offsets, chars, row_base) of a pylibcudf strings column as CuPy arrays over its own
    device memory: row i is chars[offsets[row_base + i]:offsets[row_base + i + 1]]. None for
    any other column, or one with no offsets child (no rows)."""
    import cupy
    import pylibcudf as plc

    if column.type().id() != plc.TypeId.STRING or column.num_children() == 0:
        return None
    offsets = column.child(0)
    kinds = {plc.TypeId.INT32: np.int32, plc.TypeId.INT64: np.int64}
    kind = kinds.get(offsets.type().id())
    if kind is None or offsets.data() is None:
        return None

    def device_array(span: Any, dtype: Any, size: int) -> Any:
        if span is None or size == 0:
            return cupy.zeros(0, dtype)
        memory = cupy.cuda.UnownedMemory(span.ptr, span.size, column)
        return cupy.ndarray((size,), dtype, cupy.cuda.MemoryPointer(memory, 0))

    offsets_array = device_array(offsets.data(), kind, offsets.size())
    chars = column.data()
    chars_array = device_array(chars, np.uint8, 0 if chars is None else chars.size)
    return offsets_array, chars_array, column.offset() + offsets.offset()


def is_categorical(series: Any) -> bool:
    return str(getattr(series, "dtype", "")) == "category"


def to_host_pinned(values: Any) -> npt.NDArray[Any]:
    """A CuPy array copied into page-locked host memory (from CuPy's pinned pool): several times
    faster than a copy into fresh pageable memory. NumPy arrays are returned as they are."""
    if not hasattr(values, "get"):
        return np.asarray(values)
    import cupyx

    out = cupyx.empty_pinned(values.shape, values.dtype)
    values.get(out=out)
    return out


def to_host(values: Any) -> npt.NDArray[Any]:
    """A NumPy or CuPy array as NumPy."""
    return np.asarray(values.get() if hasattr(values, "get") else values)


class DeviceTransform:
    """The fitted transform of one bundle, with its lookup tables uploaded once to the device."""

    def __init__(
        self, spec: Mapping[str, Any], lookups: Mapping[str, Mapping[str, Any]], xp: Any
    ) -> None:
        self.spec = spec
        self.xp = xp
        self.entities = []
        for entity in spec["entities"]:
            lookup = lookups[entity["key"]]
            stats = {s: xp.asarray(np.asarray(lookup[s], np.float64)) for s in ENTITY_STATS}
            self.entities.append((entity, KeyIndex.build(lookup["key"], xp), stats))
        self.vocabularies = [KeyIndex.build(c["vocabulary"], xp) for c in spec["categorical"]]
        self.kernel_host = kernel_arrays(spec)
        self.kernel = {k: xp.asarray(v) for k, v in self.kernel_host.items()}

    @property
    def raw_columns(self) -> list[str]:
        spec = self.spec
        return raw_column_names(
            spec["id_column"],
            spec["raw_numeric"],
            spec["raw_categorical"],
            spec["timestamp_column"],
            [e["key"] for e in spec["entities"]],
        )

    def _entity_columns(self, frame: Any, entity: Mapping[str, Any], keys: KeyIndex, stats: Any):
        xp = self.xp
        key = entity["key"]
        pos = keys.positions(frame[key], xp)
        seen = pos >= 0
        safe = xp.where(seen, pos, 0)
        priors = {
            "count": 0.0,
            "mean": entity["prior_mean"],
            "std": entity["prior_std"],
            "target_rate": entity["prior_target_rate"],
        }
        out = {}
        for stat in ENTITY_STATS:
            table = stats[stat]
            col = table[safe] if table.size else xp.zeros(pos.shape)
            out[f"{key}__{stat}"] = xp.where(seen, col, priors[stat]).astype(xp.float32)
        mean = out[f"{key}__mean"].astype(xp.float64)
        std = xp.maximum(out[f"{key}__std"].astype(xp.float64), 1e-6)
        values = column_values(frame[entity["value"]], np.float64, np.nan)
        out[f"{key}__{entity['value']}_z"] = ((values - mean) / std).astype(xp.float32)
        return out

    def feature_columns(self, frame: Any) -> tuple[Any, Any]:
        """Raw frame -> (numeric (k, n) float32 feature-major, codes (c, n) int32) on the device."""
        xp, spec = self.xp, self.spec
        n = len(frame)
        derived: dict[str, Any] = {}
        if spec["time_features"]:
            ts = timestamps_us(frame[spec["timestamp_column"]])
            derived.update(time_feature_columns(ts, spec["time_features"], xp))
        for entity, keys, stats in self.entities:
            derived.update(self._entity_columns(frame, entity, keys, stats))
        numeric = xp.empty((len(spec["numeric"]), n), xp.float32)
        for j, feat in enumerate(spec["numeric"]):
            name = feat["name"]
            numeric[j] = (
                derived[name] if name in derived else column_values(frame[name], np.float32, np.nan)
            )
        codes = xp.empty((len(spec["categorical"]), n), xp.int32)
        for i, feat in enumerate(spec["categorical"]):
            codes[i] = self.vocabularies[i].positions(frame[feat["name"]], xp).astype(xp.int32)
        return numeric, codes

    def matrix(self, frame: Any) -> Any:
        """Raw frame -> the model's (n, n_features) float32 row-major input, on the device."""
        numeric, codes = self.feature_columns(frame)
        return preprocess(numeric, codes, self.kernel, self.kernel_host, self.xp)


def preprocess(
    numeric: Any, codes: Any, kernel: Mapping[str, Any], kernel_host: Mapping[str, Any], xp: Any
) -> Any:
    """Impute, clip, scale and encode: the fused kernel on a GPU, the NumPy reference on CPU."""
    if xp is np:
        return fused_preprocess_reference(numeric, codes, **kernel_host)
    n = numeric.shape[1] if numeric.shape[0] else codes.shape[1]
    if n and fused_kernels_available():
        from kernels.fused_preprocess import fused_preprocess

        # The tile measured best on an H100 (bench/results/*bench_kernels*: 99% of copy
        # bandwidth): a fixed tile spares every worker the autotuner's seconds-long first call.
        out = fused_preprocess(
            numeric, codes, **kernel, block_n=FUSED_BLOCK_N, num_warps=FUSED_WARPS
        )
        return xp.from_dlpack(out)
    return preprocess_xp(numeric, codes, kernel, xp)


def preprocess_xp(numeric: Any, codes: Any, kernel: Mapping[str, Any], xp: Any) -> Any:
    """`fused_preprocess_reference` written for any array module (the CuPy fallback)."""
    k = numeric.shape[0]
    c = codes.shape[0]
    n = numeric.shape[1] if k else codes.shape[1]
    out = xp.empty((n, k + c), xp.float32)
    if k:
        x = xp.where(xp.isnan(numeric), kernel["fill"][:, None], numeric)
        x = xp.clip(x, kernel["lo"][:, None], kernel["hi"][:, None])
        out[:, :k] = ((x - kernel["mean"][:, None]) * kernel["inv_std"][:, None]).T
    table = kernel["enc_table"]
    for i in range(c):
        col = codes[i]
        size = int(kernel["enc_sizes"][i])
        valid = (col >= 0) & (col < size)
        idx = xp.where(valid, col, 0) + kernel["enc_offsets"][i]
        vals = table[idx] if table.size else xp.zeros(n, xp.float32)
        out[:, k + i] = xp.where(valid, vals, kernel["unseen"][i])
    return out
