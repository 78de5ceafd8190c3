"""The one typed configuration of gpupipe, loaded from TOML and overridable by dotted keys."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DeviceChoice = Literal["auto", "cpu", "gpu"]
EtlFrames = Literal["auto", "dask", "single"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Describes any tabular dataset: where it is and what its columns mean."""

    source: str = Field(description="Path, directory or glob of parquet or CSV files.")
    format: Literal["auto", "parquet", "csv"] = "auto"
    target: str = Field(description="Binary 0/1 label column.")
    id: str = Field(description="Unique row identifier column.")
    numeric: list[str] = Field(default_factory=list)
    categorical: list[str] = Field(default_factory=list)
    timestamp: str | None = Field(
        default=None, description="If set, the split is time-ordered; otherwise seeded stratified."
    )

    @model_validator(mode="after")
    def _columns_distinct(self) -> DataConfig:
        named = [self.target, self.id, *self.numeric, *self.categorical]
        if self.timestamp:
            named.append(self.timestamp)
        duplicated = sorted({c for c in named if named.count(c) > 1})
        if duplicated:
            raise ValueError(f"data: columns listed in more than one role: {duplicated}")
        if not self.numeric and not self.categorical:
            raise ValueError("data: at least one numeric or categorical column is required")
        return self


class EntityAggregate(_Strict):
    """Per-entity statistics of one numeric column, computed on the training window only."""

    key: str = Field(description="Entity column, e.g. card_id.")
    value: str = Field(description="Numeric column aggregated per entity, e.g. amount.")


class FeaturesConfig(_Strict):
    entities: list[EntityAggregate] = Field(default_factory=list)
    time_features: bool = True
    clip_quantiles: tuple[float, float] = (0.001, 0.999)
    target_smoothing: float = Field(default=50.0, ge=0.0)
    histogram_bins: int = Field(default=10, ge=2, le=100)

    @field_validator("clip_quantiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"features.clip_quantiles must satisfy 0 <= lo < hi <= 1, got {v}")
        return v


class SplitConfig(_Strict):
    valid_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)
    seed: int = 42


class XGBoostConfig(_Strict):
    n_estimators: int = Field(default=300, ge=1)
    max_depth: int = Field(default=8, ge=1, le=20)
    learning_rate: float = Field(default=0.1, gt=0.0)
    subsample: float = Field(default=0.9, gt=0.0, le=1.0)
    colsample_bytree: float = Field(default=0.9, gt=0.0, le=1.0)
    early_stopping_rounds: int = Field(default=20, ge=1)
    max_bin: int = Field(default=256, ge=16)


class MLPConfig(_Strict):
    enabled: bool = True
    hidden: list[int] = Field(default_factory=lambda: [64, 32])
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=4096, ge=16)
    learning_rate: float = Field(default=2e-3, gt=0.0)
    max_train_rows: int = Field(default=2_000_000, ge=1000)


class Int8Config(_Strict):
    """INT8 calibration of the MLP's ONNX model (explicit Q/DQ, tasks/quantize.py)."""

    enabled: bool = True
    calibration_rows: int = Field(default=4096, ge=16, description="Training rows calibrated on.")
    method: Literal["minmax", "percentile", "entropy"] = "minmax"
    max_auc_drop: float = Field(
        default=0.005, ge=0.0, description="Largest test ROC AUC loss for keeping the INT8 model."
    )
    check_rows: int = Field(
        default=200_000, ge=1000, description="Test rows both models score for the comparison."
    )


class ModelConfig(_Strict):
    xgboost: XGBoostConfig = XGBoostConfig()
    mlp: MLPConfig = MLPConfig()
    int8: Int8Config = Int8Config()
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    onnx_parity_atol: float = Field(default=1e-4, gt=0.0)


class RegistryConfig(_Strict):
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default sqlite:///<home>/mlflow.db."
    )
    experiment: str = "gpupipe"
    model_prefix: str = "gpupipe"
    promotion_metric: Literal["roc_auc", "pr_auc", "log_loss"] = "pr_auc"
    min_improvement: float = Field(default=0.0, ge=0.0)


class PublishConfig(_Strict):
    model_repo: str = "model_repo"
    max_batch_size: int = Field(default=65536, ge=1)
    preferred_batch_sizes: list[int] = Field(default_factory=lambda: [4096, 16384])
    max_queue_delay_microseconds: int = Field(default=2000, ge=0)


# Parquet codecs of the predictions files (pyarrow and libcudf both write each).
OutputCompression = Literal["snappy", "lz4", "zstd", "none"]
# The predictions files' codec unless scoring.output_compression says otherwise.
OUTPUT_COMPRESSION: OutputCompression = "snappy"
# How the predictions files store an int64 id column: DELTA_BINARY_PACKED or PLAIN.
OutputIdEncoding = Literal["delta", "plain"]


class ScoringConfig(_Strict):
    partition_rows: int = Field(default=2_000_000, ge=1)
    files_per_task: int = Field(
        default=0,
        ge=0,
        description="0 = choose from the cluster: on CPU GROUPS_PER_WORKER tasks per worker, on "
        "GPU one per worker thread, more only past GPU_TASK_BYTES of input each (tasks/scoring.py).",
    )
    max_quarantined_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    progress_interval_s: float = Field(
        default=1.0,
        ge=0.0,
        description="Least seconds between two updates of a run's progress artifact (the "
        "first and the last are always published); 0 = after every dask task.",
    )
    io_threads: int = Field(
        default=0,
        ge=0,
        description="Files read (and written) at once per worker; 0 = 1 on CPU, 4 on GPU.",
    )
    gpu_io: Literal["cudf", "arrow"] = Field(
        default="cudf",
        description="GPU workers: decode and encode parquet on the GPU (cudf: one call per batch "
        "of files) or on the worker's CPU threads with pyarrow, moving only columns across "
        "PCIe (arrow: faster only when files are scored one at a time).",
    )
    gpu_streams: bool = Field(
        default=True,
        description="GPU workers with gpu_io = cudf: decode and encode batches on CUDA streams "
        "of the reading and writing threads' own, so they overlap the transform and predict "
        "instead of queuing behind them on the default stream (tasks/gpu_io.py).",
    )
    gpu_worker_threads: int = Field(
        default=1,
        ge=1,
        description="Dask threads per GPU worker of a cluster that a scoring run starts itself "
        "(cluster = local); each runs one task's read -> score -> write pipeline, so with 2 one "
        "task keeps the GPU busy while another starts or drains (twice the device memory in "
        "flight). The training pipeline's clusters and CPU workers keep "
        "cluster.threads_per_worker; a running cluster keeps its own (dask-cuda-worker "
        "--nthreads). GPU runs get one task per thread (tasks/scoring.py: gpu_group_count). "
        "docs/benchmarks.md (ninth and tenth sessions) has 1 against 2 on an H100: 2 measured "
        "no faster.",
    )
    batch_rows: int = Field(
        default=0,
        ge=0,
        description="Whole files read, scored and written together on a worker, up to about "
        "this many rows per batch; 0 = automatic: off (1 file at a time) on CPU, "
        "GPU_BATCH_ROWS (tasks/scoring.py) on GPU.",
    )
    output_compression: OutputCompression = Field(
        default=OUTPUT_COMPRESSION,
        description="Parquet codec of the predictions files: snappy (read everywhere), lz4 "
        "(LZ4_RAW: needs a reader from parquet-format 2.9 on), zstd (smallest) or none.",
    )
    output_id_encoding: OutputIdEncoding = Field(
        default="delta",
        description="How the predictions files store an int64 id column: delta "
        "(DELTA_BINARY_PACKED: a few bits per row for increasing ids, read by pyarrow, Spark, "
        "DuckDB, polars and cuDF) or plain (for readers without parquet v2 encodings). Ids of "
        "other types are written plain either way.",
    )
    batch_read_threads: int = Field(
        default=0,
        ge=0,
        description="Batches a worker reads at once in batch mode, each on a thread (and, on a "
        "GPU, a CUDA stream) of its own, so one batch's parquet decode overlaps the next's; "
        "0 = automatic: GPU_BATCH_READ_THREADS (tasks/scoring.py) on GPU, 1 on CPU. Each adds "
        "a batch of raw columns to the device memory in flight.",
    )


class ClusterConfig(_Strict):
    address: str | None = Field(default=None, description="Existing scheduler; None = local.")
    n_workers: int | None = Field(default=None, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    rmm_pool_size: str | None = Field(
        default=None, description="RMM pool per GPU worker (bytes, '24GB' or a fraction)."
    )
    rmm_async: bool = Field(
        default=True,
        description="GPU workers allocate through CUDA's stream-ordered pool (cudaMallocAsync); "
        "ignored when rmm_pool_size is set.",
    )
    device_memory_limit: str | None = "0.8"


class PipelineConfig(_Strict):
    """Everything one run of gpupipe needs; every default works on a laptop with no GPU."""

    data: DataConfig
    features: FeaturesConfig = FeaturesConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    registry: RegistryConfig = RegistryConfig()
    publish: PublishConfig = PublishConfig()
    scoring: ScoringConfig = ScoringConfig()
    cluster: ClusterConfig = ClusterConfig()
    device: DeviceChoice = "auto"
    home: str = ".gpupipe"
    etl_partition_rows: int | None = Field(
        default=None,
        ge=1000,
        description="Deprecated and ignored: the ETL's dask partitions follow its input (dask's "
        "defaults for parquet and CSV). Still accepted so older configs load; will be removed.",
    )
    etl_frames: EtlFrames = Field(
        default="auto",
        description="How the ETL holds the table: 'dask' partitions (every CPU core, many GPUs), "
        "'single' one in-memory pandas/cuDF frame, or 'auto': single on exactly one GPU when "
        "8x the raw columns fit in its free memory, dask otherwise. Both give the same features.",
    )

    @field_validator("etl_partition_rows")
    @classmethod
    def _etl_partition_rows_is_ignored(cls, value: int | None) -> int | None:
        if value is not None:
            warnings.warn(
                "etl_partition_rows is ignored (the ETL's dask partitions follow its input) and "
                "will be removed: delete it from the config",
                FutureWarning,
                stacklevel=2,
            )
        return value

    @model_validator(mode="after")
    def _entities_known(self) -> PipelineConfig:
        raw = {self.data.id, *self.data.numeric, *self.data.categorical}
        for e in self.features.entities:
            if e.value not in self.data.numeric:
                raise ValueError(
                    f"features.entities: value column {e.value!r} must be listed in data.numeric"
                )
            if e.key in {self.data.target, self.data.timestamp}:
                raise ValueError(f"features.entities: key {e.key!r} cannot be target or timestamp")
        _ = raw
        return self

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        if self.registry.tracking_uri:
            return self.registry.tracking_uri
        return f"sqlite:///{self.home_path / 'mlflow.db'}"

    @property
    def model_repo_path(self) -> Path:
        return Path(self.publish.model_repo).expanduser().resolve()

    def model_name(self, kind: str) -> str:
        """Registered-model name for a model kind (`xgboost` or `mlp`)."""
        return f"{self.registry.model_prefix}-{kind}"


class ConfigError(ValueError):
    """A configuration file or override that cannot be used, with the reason."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `a.b=VALUE`, where VALUE is read as TOML (falls back to a plain string)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. model.xgboost.max_depth=6")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def config_from_mapping(
    tree: dict[str, Any], overrides: dict[str, Any] | None = None, origin: str = "<mapping>"
) -> PipelineConfig:
    """Validate a nested mapping (plus dotted-key overrides) into a PipelineConfig."""
    merged: dict[str, Any] = _deep_copy(tree)
    for key, value in (overrides or {}).items():
        _set_dotted(merged, key, value)
    try:
        return PipelineConfig.model_validate(merged)
    except ValueError as exc:
        raise ConfigError(f"{origin}: invalid configuration:\n{exc}") from exc


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a TOML config file. Relative data/home/model_repo paths stay relative to the CWD."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        tree = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    return config_from_mapping(tree, overrides, origin=str(p))


def builtin_config(data_dir: str | Path, home: str | Path, **overrides: Any) -> PipelineConfig:
    """Config for the built-in card-transaction dataset written by `gpupipe generate`."""
    tree: dict[str, Any] = {
        "data": {
            "source": str(Path(data_dir) / "*.parquet"),
            "target": "is_fraud",
            "id": "transaction_id",
            "timestamp": "timestamp",
            "numeric": ["amount", "customer_age"],
            "categorical": ["mcc", "channel", "country"],
        },
        "features": {
            "entities": [
                {"key": "card_id", "value": "amount"},
                {"key": "merchant_id", "value": "amount"},
            ]
        },
        "home": str(home),
    }
    return config_from_mapping(tree, overrides, origin="built-in config")


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}
