"""The fitted feature transform: a JSON spec plus per-entity lookup tables (parquet / npz).

Training, batch scoring and the Triton `preprocess` model all read this one spec, so they compute
exactly the features that training saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from tasks.numpy_features import ENTITY_STATS, kernel_arrays, load_lookup_npz, raw_column_names

SPEC_FILE = "transform_spec.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumericFeature(_Frozen):
    """One model input column: NaN -> fill, clip to [lo, hi], then (x - mean) / std."""

    name: str
    fill: float
    lo: float
    hi: float
    mean: float
    std: float


class CategoricalFeature(_Frozen):
    """A raw categorical column encoded as the smoothed training target rate of its category."""

    name: str
    vocabulary: list[str] | list[int]
    encoding: list[float]
    unseen: float


class EntityTable(_Frozen):
    """Training-window statistics of `value` per distinct `key`, stored in `file`.

    The table's columns are `key` (native dtype, sorted) and `<key>__<stat>` for stat in
    ENTITY_STATS; a row's derived feature `<key>__<value>_z` = (value - mean) / std.
    """

    key: str
    value: str
    file: str
    prior_mean: float
    prior_std: float
    prior_target_rate: float

    @property
    def file_stem(self) -> str:
        return f"entity_{self.key}"

    def stat_column(self, stat: str) -> str:
        return f"{self.key}__{stat}"

    @property
    def z_column(self) -> str:
        return f"{self.key}__{self.value}_z"

    @property
    def feature_columns(self) -> list[str]:
        return [*(self.stat_column(s) for s in ENTITY_STATS), self.z_column]


class Histogram(_Frozen):
    """Training distribution of one model input, for the population stability index."""

    edges: list[float]
    fractions: list[float]


class TransformSpec(_Frozen):
    """Everything needed to turn raw rows into the model's float32 input matrix."""

    format_version: int = 1
    id_column: str
    target_column: str
    timestamp_column: str | None
    raw_numeric: list[str]
    raw_categorical: list[str]
    raw_dtypes: dict[str, str]
    time_features: list[str]
    entities: list[EntityTable]
    numeric: list[NumericFeature]
    categorical: list[CategoricalFeature]
    histograms: dict[str, Histogram]
    train_rows: int
    train_positive_rate: float

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.numeric] + [f.name for f in self.categorical]

    @property
    def raw_columns(self) -> list[str]:
        """Raw input columns that scoring needs (id first), as the config named them."""
        return raw_column_names(
            self.id_column,
            self.raw_numeric,
            self.raw_categorical,
            self.timestamp_column,
            [e.key for e in self.entities],
        )

    def kernel_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """The spec flattened into the arrays that the fused preprocess kernel reads."""
        return kernel_arrays(self.model_dump())

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / SPEC_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, directory: Path) -> TransformSpec:
        path = directory / SPEC_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: transform spec not found")
        return cls.model_validate(json.loads(path.read_text()))


# Entity key -> its lookup arrays (key, count, mean, std, target_rate).
Lookups = dict[str, dict[str, npt.NDArray[Any]]]


def load_transform(directory: Path) -> tuple[TransformSpec, Lookups]:
    """A fitted transform (spec + entity lookups) as the ETL saved it. Lives here, not in
    `tasks.etl`, so that scoring workers load a bundle without importing dask.dataframe."""
    spec = TransformSpec.load(directory)
    lookups = {e.key: load_lookup_npz(str(directory / e.file)) for e in spec.entities}
    return spec, lookups
