"""Publishing a model bundle to a Triton model repository, atomically.

A bundle of registered model `<name>` at MLflow version V becomes three Triton models:

    <repo>/<name>-preprocess/  Python backend: raw columns -> float32 features (`input__0`)
    <repo>/<name>/             FIL (XGBoost, `xgboost.ubj`) or ONNX Runtime (MLP, `model.onnx`)
    <repo>/<name>-ensemble/    raw columns -> preprocess -> model, both steps pinned to version V

each as `<model>/config.pbtxt` plus `<model>/<V>/<files>`; the version directory is the MLflow
version. Configs are `model_config_pb2.ModelConfig` messages written with `text_format`.

What a reader (Triton polling the repository) can observe:
- a version directory appears whole: it is written under `<model>/.staging-<V>-<uuid>` (a name
  Triton does not take for a version), fsynced, then renamed to `<model>/<V>`;
- configs change whole (temp file + `os.replace`), after every version directory is in place,
  preprocess and model before the ensemble that references them;
- composing models serve exactly {V, previously pinned version} (`version_policy: specific`), so
  the old ensemble keeps working until its config switches to V, and republishing an older MLflow
  version (a rollback) serves that version rather than the highest number on disk;
- `<repo>/gpupipe_repository.json`, the record of what was published when, is replaced last.
A crash leaves at most hidden `.staging-`/`.retired-`/`.tmp-` leftovers (deleted by the next
publish) and complete version directories that no config serves yet. Publishers of one repository are serialized
by an exclusive lock on `<repo>/.gpupipe-publish.lock` (POSIX `flock`).

Republishing a version that is already there is a no-op for each model whose files are
byte-identical (a retried flow), and otherwise an atomic-per-rename replacement: the old directory
is renamed to `.retired-...`, the new one renamed in, the old one deleted. Between those two
renames the version is briefly absent; MLflow versions are immutable, so this only happens when a
registry was rebuilt.

FIL parameters follow the FIL backend shipped with Triton 25.09 and later (the releases this
project's tritonclient 2.73 belongs to): `is_classifier` (which replaced `output_class`), no
`storage_type` (removed in 25.09; its value was ignored with a warning).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

import kernels.reference
import tasks.numpy_features
from tasks.etl import Lookups, load_transform
from tasks.spec import SPEC_FILE, TransformSpec
from tasks.train import ONNX_INPUT, ONNX_OUTPUT, TRANSFORM_DIR, read_bundle_json

log = logging.getLogger(__name__)

InstanceKind = Literal["auto", "gpu", "cpu"]
Outcome = Literal["new", "unchanged", "replaced"]
# `model_config_pb2.ModelConfig`: protobuf builds its message classes at runtime, so type checkers
# cannot see their fields; annotations say which message is meant.
ModelConfig: TypeAlias = Any

CONFIG_FILE = "config.pbtxt"
RECORD_FILE = "gpupipe_repository.json"
LOCK_FILE = ".gpupipe-publish.lock"
STAGING_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"
TMP_PREFIX = ".tmp-"
FIL_MODEL_FILE = "xgboost.ubj"
ONNX_MODEL_FILE = "model.onnx"
PYTHON_MODEL_FILE = "model.py"
FEATURES_MODULE_FILE = "numpy_features.py"
BUNDLE_COPY_FILE = "bundle.json"
MODEL_INPUT = ONNX_INPUT
FIL_OUTPUT = "output__0"
FEATURES_TENSOR = "features"
PREPROCESS_SUFFIX = "-preprocess"
ENSEMBLE_SUFFIX = "-ensemble"
RECORD_HISTORY = 20

# FIL's default model file per `model_type` (fil_backend src/model.h, docs/model_config.md)
FIL_MODEL_FILES = {
    "xgboost_ubj": "xgboost.ubj",
    "xgboost_json": "xgboost.json",
    "xgboost": "xgboost.model",
    "lightgbm": "model.txt",
    "treelite_checkpoint": "checkpoint.tl",
}
_PREPROCESS_SOURCE = Path(__file__).parent / "triton_models" / "preprocess_model.py"
_INSTANCE_KINDS = {
    "auto": None,
    "gpu": mc.ModelInstanceGroup.KIND_GPU,
    "cpu": mc.ModelInstanceGroup.KIND_CPU,
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NULLABLE_RE = re.compile(r"^(U?Int(8|16|32|64)|Float(32|64)|boolean)$")
_NUMPY_TO_TRITON = {
    "b": {1: mc.TYPE_BOOL},
    "i": {1: mc.TYPE_INT8, 2: mc.TYPE_INT16, 4: mc.TYPE_INT32, 8: mc.TYPE_INT64},
    "u": {1: mc.TYPE_UINT8, 2: mc.TYPE_UINT16, 4: mc.TYPE_UINT32, 8: mc.TYPE_UINT64},
    "f": {2: mc.TYPE_FP16, 4: mc.TYPE_FP32, 8: mc.TYPE_FP64},
}
_TRITON_TO_NUMPY: dict[int, type[np.generic]] = {
    mc.TYPE_BOOL: np.bool_,
    mc.TYPE_INT8: np.int8,
    mc.TYPE_INT16: np.int16,
    mc.TYPE_INT32: np.int32,
    mc.TYPE_INT64: np.int64,
    mc.TYPE_UINT8: np.uint8,
    mc.TYPE_UINT16: np.uint16,
    mc.TYPE_UINT32: np.uint32,
    mc.TYPE_UINT64: np.uint64,
    mc.TYPE_FP16: np.float16,
    mc.TYPE_FP32: np.float32,
    mc.TYPE_FP64: np.float64,
}


# ---------------------------------------------------------------- names and results


@dataclass(frozen=True)
class ServingNames:
    """The three Triton model names derived from one registered model name."""

    model: str
    preprocess: str
    ensemble: str

    @classmethod
    def for_model(cls, registered_name: str) -> ServingNames:
        if not _NAME_RE.match(registered_name):
            raise ValueError(
                f"{registered_name!r}: a Triton model name needs letters, digits, '_', '.' or '-'"
                " and cannot start with '.'"
            )
        return cls(
            registered_name,
            registered_name + PREPROCESS_SUFFIX,
            registered_name + ENSEMBLE_SUFFIX,
        )

    def all(self) -> tuple[str, str, str]:
        """In publishing order: the ensemble last, after the models it references."""
        return (self.preprocess, self.model, self.ensemble)


@dataclass(frozen=True)
class PublishedModels:
    """What one `publish_bundle` call wrote."""

    repo: Path
    version: int
    kind: str
    names: ServingNames
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    @property
    def ensemble(self) -> str:
        return self.names.ensemble

    def version_dir(self, model: str) -> Path:
        return self.repo / model / str(self.version)

    def config_path(self, model: str) -> Path:
        return self.repo / model / CONFIG_FILE

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": str(self.repo),
            "version": self.version,
            "kind": self.kind,
            "model": self.names.model,
            "preprocess": self.names.preprocess,
            "ensemble": self.names.ensemble,
            "outcomes": dict(self.outcomes),
        }

    def __str__(self) -> str:
        done = ", ".join(f"{m}:{self.version} {o}" for m, o in self.outcomes.items())
        return f"{self.repo}: {done}"


# ---------------------------------------------------------------- raw inputs on the wire


def triton_type_for_dtype(dtype: str, *, timestamp: bool = False) -> int:
    """The Triton data type that carries a raw column of this pandas dtype.

    Datetimes travel as INT64 microseconds since the epoch; strings as BYTES; pandas nullable
    numbers (Int64, Float64, boolean, ...) as FP64 so that missing values survive as NaN.
    """
    d = dtype.strip()
    if timestamp or d.startswith("datetime64"):
        return mc.TYPE_INT64
    if d in ("str", "string", "object", "category") or d.startswith("string"):
        return mc.TYPE_STRING
    if _NULLABLE_RE.match(d):
        return mc.TYPE_FP64
    try:
        np_dtype = np.dtype(d)
    except TypeError as exc:
        raise ValueError(f"raw dtype {dtype!r} has no Triton equivalent") from exc
    found = _NUMPY_TO_TRITON.get(np_dtype.kind, {}).get(np_dtype.itemsize)
    if found is None:
        raise ValueError(f"raw dtype {dtype!r} has no Triton equivalent")
    return found


def raw_input_types(spec: TransformSpec) -> list[tuple[str, int]]:
    """(name, Triton data type) of every raw input column, in the spec's `raw_columns` order."""
    out = []
    for name in spec.raw_columns:
        if name not in spec.raw_dtypes:
            raise ValueError(f"transform spec has no raw dtype for input column {name!r}")
        out.append(
            (
                name,
                triton_type_for_dtype(
                    spec.raw_dtypes[name], timestamp=name == spec.timestamp_column
                ),
            )
        )
    return out


def protocol_datatype(data_type: int) -> str:
    """Config data type -> the inference protocol's datatype string (TYPE_STRING -> "BYTES")."""
    name = mc.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _present(value: Any) -> bool:
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return False
    return not (isinstance(value, float) and value != value)


def _integral(arr: npt.NDArray[np.floating]) -> bool:
    return bool(np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))


def encode_column(values: npt.ArrayLike, data_type: int, name: str = "column") -> npt.NDArray[Any]:
    """One raw column -> the [n, 1] array a client sends for an input of `data_type`.

    Strings become UTF-8 bytes with missing values as b"" (the preprocess model reads b"" back as
    missing); datetimes become int64 microseconds (NaT as int64 min); numbers keep NaN.
    """
    arr = np.asarray(values)
    if data_type == mc.TYPE_STRING:
        flat = arr.reshape(-1)
        out = np.empty(flat.shape, dtype=object)
        for i, v in enumerate(flat):
            out[i] = (v if isinstance(v, bytes) else str(v).encode("utf-8")) if _present(v) else b""
        return out.reshape(-1, 1)
    if data_type == mc.TYPE_INT64 and arr.dtype.kind in "MOU":
        ts = (
            arr.astype("datetime64[us]")
            if arr.dtype.kind == "M"
            else np.array(
                [v if _present(v) else None for v in arr.reshape(-1)], dtype="datetime64[us]"
            )
        )
        return ts.view(np.int64).reshape(-1, 1)
    target = _TRITON_TO_NUMPY.get(data_type)
    if target is None:
        raise ValueError(f"{name}: cannot encode values as {mc.DataType.Name(data_type)}")
    if arr.dtype.kind == "O":
        arr = np.array([v if _present(v) else np.nan for v in arr.reshape(-1)], dtype=np.float64)
    if np.dtype(target).kind in "iub" and arr.dtype.kind == "f" and not _integral(arr):
        raise ValueError(
            f"{name}: missing or fractional values cannot be sent as {mc.DataType.Name(data_type)}"
        )
    return arr.astype(target).reshape(-1, 1)


def encode_raw_inputs(
    raw: Mapping[str, npt.ArrayLike], spec: TransformSpec
) -> dict[str, npt.NDArray[Any]]:
    """Raw columns (name -> array) -> the ensemble's inputs, typed and shaped for Triton."""
    return {name: encode_column(raw[name], dtype, name) for name, dtype in raw_input_types(spec)}


# ---------------------------------------------------------------- config builders


def _tensor(cls: Any, name: str, data_type: int, dims: Sequence[int]) -> Any:
    t = cls(name=name, data_type=data_type)
    t.dims.extend(dims)
    return t


def _set_versions(config: ModelConfig, versions: Sequence[int]) -> None:
    if versions:
        config.version_policy.specific.versions.extend(sorted(set(versions)))


def _batching(
    config: ModelConfig, max_batch_size: int, preferred: Sequence[int], delay_us: int
) -> None:
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    config.max_batch_size = max_batch_size
    too_big = sorted(b for b in preferred if b > max_batch_size)
    if too_big:
        # Triton refuses a config whose preferred sizes exceed max_batch_size
        log.warning(
            "%s: preferred batch sizes %s exceed max_batch_size %d, dropped",
            config.name,
            too_big,
            max_batch_size,
        )
    config.dynamic_batching.preferred_batch_size.extend(
        sorted({b for b in preferred if b <= max_batch_size})
    )
    config.dynamic_batching.max_queue_delay_microseconds = delay_us


def _instances(config: ModelConfig, kind: str, count: int = 1) -> None:
    if kind not in _INSTANCE_KINDS:
        raise ValueError(f"instance kind {kind!r}: expected one of {sorted(_INSTANCE_KINDS)}")
    group = config.instance_group.add(count=count)
    triton_kind = _INSTANCE_KINDS[kind]
    if triton_kind is not None:
        group.kind = triton_kind


def fil_config(
    name: str,
    n_features: int,
    threshold: float,
    *,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_us: int,
    instance_kind: InstanceKind = "auto",
    versions: Sequence[int] = (),
) -> ModelConfig:
    """FIL backend config for an XGBoost UBJSON binary classifier.

    `output__0` has dims [2]: with `predict_proba` FIL returns (1 - p, p) per row for a binary
    model when the output holds two values per row, so column 1 is P(positive).
    """
    config = mc.ModelConfig(name=name, backend="fil")
    _batching(config, max_batch_size, preferred_batch_sizes, max_queue_delay_us)
    config.input.append(_tensor(mc.ModelInput, MODEL_INPUT, mc.TYPE_FP32, [n_features]))
    config.output.append(_tensor(mc.ModelOutput, FIL_OUTPUT, mc.TYPE_FP32, [2]))
    params = {
        "model_type": "xgboost_ubj",
        "is_classifier": "true",
        "predict_proba": "true",
        "threshold": str(float(threshold)),
    }
    for key, value in params.items():
        config.parameters[key].string_value = value
    _instances(config, instance_kind)
    _set_versions(config, versions)
    return config


def onnx_config(
    name: str,
    n_features: int,
    *,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_us: int,
    instance_kind: InstanceKind = "auto",
    output_name: str = ONNX_OUTPUT,
    versions: Sequence[int] = (),
) -> ModelConfig:
    """ONNX Runtime config: `input__0` float32 [n_features] -> P(positive) float32 [1]."""
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx")
    _batching(config, max_batch_size, preferred_batch_sizes, max_queue_delay_us)
    config.input.append(_tensor(mc.ModelInput, MODEL_INPUT, mc.TYPE_FP32, [n_features]))
    config.output.append(_tensor(mc.ModelOutput, output_name, mc.TYPE_FP32, [1]))
    _instances(config, instance_kind)
    _set_versions(config, versions)
    return config


def preprocess_config(
    name: str,
    spec: TransformSpec,
    *,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_us: int,
    instances: int = 1,
    versions: Sequence[int] = (),
) -> ModelConfig:
    """Python-backend config: one [1] input per raw column -> `input__0` float32 [n_features].

    It runs on CPU (NumPy); dynamic batching hands it several requests per `execute`, which it
    transforms in one pass.
    """
    config = mc.ModelConfig(name=name, backend="python")
    _batching(config, max_batch_size, preferred_batch_sizes, max_queue_delay_us)
    for column, data_type in raw_input_types(spec):
        config.input.append(_tensor(mc.ModelInput, column, data_type, [1]))
    n_features = len(spec.feature_names)
    config.output.append(_tensor(mc.ModelOutput, MODEL_INPUT, mc.TYPE_FP32, [n_features]))
    _instances(config, "cpu", instances)
    _set_versions(config, versions)
    return config


def ensemble_config(
    name: str, preprocess: ModelConfig, model: ModelConfig, version: int
) -> ModelConfig:
    """Ensemble: the preprocess model's inputs -> preprocess:V -> model:V -> the model's output."""
    config = mc.ModelConfig(name=name, platform="ensemble")
    config.max_batch_size = min(preprocess.max_batch_size, model.max_batch_size)
    config.input.extend(
        _tensor(mc.ModelInput, t.name, t.data_type, list(t.dims)) for t in preprocess.input
    )
    out = model.output[0]
    config.output.append(_tensor(mc.ModelOutput, out.name, out.data_type, list(out.dims)))
    pre_step = config.ensemble_scheduling.step.add(
        model_name=preprocess.name, model_version=version
    )
    for t in preprocess.input:
        pre_step.input_map[t.name] = t.name
    pre_step.output_map[preprocess.output[0].name] = FEATURES_TENSOR
    model_step = config.ensemble_scheduling.step.add(model_name=model.name, model_version=version)
    model_step.input_map[model.input[0].name] = FEATURES_TENSOR
    model_step.output_map[out.name] = out.name
    _set_versions(config, [version])
    return config


def config_text(config: ModelConfig) -> str:
    """The protobuf text form Triton reads from config.pbtxt."""
    return text_format.MessageToString(config)


def read_model_config(path: Path) -> ModelConfig:
    """Parse a config.pbtxt into a ModelConfig (raises text_format.ParseError if malformed)."""
    return text_format.Parse(Path(path).read_text(encoding="utf-8"), mc.ModelConfig())


# ---------------------------------------------------------------- filesystem primitives


def _copy_file(src: Path, dst: Path) -> None:
    """Every file that goes into a version directory is written through here."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def _tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (directories map to ""), bytecode caches skipped."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts:
            continue
        out[rel.as_posix()] = (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        )
    return out


def _write_atomic(path: Path, data: bytes) -> bool:
    """Replace `path` whole (temp file in the same directory, fsync, os.replace); False if the
    content is already there, so an unchanged config does not make Triton reload the model."""
    if path.is_file() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)
    return True


@contextlib.contextmanager
def _publish_lock(repo: Path) -> Iterator[None]:
    with open(repo / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _is_leftover(name: str) -> bool:
    return name.startswith((STAGING_PREFIX, RETIRED_PREFIX, TMP_PREFIX))


def clean_stale(repo: Path) -> list[Path]:
    """Delete what interrupted publishes left (staging/retired dirs, temp files); call under the
    publish lock. A model directory left with nothing in it is removed too. Returns what went."""
    removed: list[Path] = []
    entries = [repo, *(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))]
    for directory in entries:
        for entry in list(directory.iterdir()):
            if not _is_leftover(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        if directory != repo and not any(directory.iterdir()):
            directory.rmdir()
            removed.append(directory)
    for path in removed:
        log.info("removed leftover of an interrupted publish: %s", path)
    return removed


def _stage(model_dir: Path, version: int, fill: Callable[[Path], None]) -> Path:
    """Build a version directory under a hidden name inside the model directory and fsync it."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f"{STAGING_PREFIX}{version}-{uuid.uuid4().hex}"
    staging.mkdir()
    fill(staging)
    _fsync_tree(staging)
    return staging


def _install(model_dir: Path, version: int, staging: Path) -> Outcome:
    """Rename a staged version directory to `<version>` (see the module docstring for reuse)."""
    target = model_dir / str(version)
    if target.exists():
        if _tree_digest(target) == _tree_digest(staging):
            shutil.rmtree(staging)
            return "unchanged"
        retired = model_dir / f"{RETIRED_PREFIX}{version}-{uuid.uuid4().hex}"
        os.rename(target, retired)
        os.rename(staging, target)
        _fsync(model_dir)
        shutil.rmtree(retired)
        return "replaced"
    os.rename(staging, target)
    _fsync(model_dir)
    return "new"


# ---------------------------------------------------------------- publishing


def _fill_preprocess(bundle_dir: Path, spec: TransformSpec) -> Callable[[Path], None]:
    def fill(dest: Path) -> None:
        _copy_file(_PREPROCESS_SOURCE, dest / PYTHON_MODEL_FILE)
        _copy_file(Path(tasks.numpy_features.__file__), dest / FEATURES_MODULE_FILE)
        kernels_dir = Path(kernels.reference.__file__).parent
        for module in ("__init__.py", "reference.py"):
            _copy_file(kernels_dir / module, dest / "kernels" / module)
        src = bundle_dir / TRANSFORM_DIR
        for name in (SPEC_FILE, *(e.file for e in spec.entities)):
            _copy_file(src / name, dest / TRANSFORM_DIR / name)

    return fill


def _fill_model(bundle_dir: Path, meta: Mapping[str, Any]) -> Callable[[Path], None]:
    def fill(dest: Path) -> None:
        if meta["kind"] == "xgboost":
            _copy_file(bundle_dir / meta["native_file"], dest / FIL_MODEL_FILE)
        else:
            _copy_file(bundle_dir / meta["onnx_file"], dest / ONNX_MODEL_FILE)
        # provenance: which bundle (threshold, metrics, feature names) this version came from
        _copy_file(bundle_dir / "bundle.json", dest / BUNDLE_COPY_FILE)

    return fill


def _check_bundle(meta: Mapping[str, Any], spec: TransformSpec, lookups: Lookups) -> None:
    if meta.get("kind") not in ("xgboost", "mlp"):
        raise ValueError(f"bundle kind {meta.get('kind')!r}: expected 'xgboost' or 'mlp'")
    if list(meta["feature_names"]) != spec.feature_names:
        raise ValueError("bundle.json feature_names differ from the transform spec's features")
    if meta["kind"] == "mlp" and (
        meta["onnx_input"] != MODEL_INPUT or meta["onnx_output"] != ONNX_OUTPUT
    ):
        raise ValueError(
            f"ONNX tensors {meta['onnx_input']!r} -> {meta['onnx_output']!r}: "
            f"expected {MODEL_INPUT!r} -> {ONNX_OUTPUT!r}"
        )
    # On the wire an empty string means "missing"; a real "" category would be read as missing.
    for feat in spec.categorical:
        if "" in feat.vocabulary:
            raise ValueError(f"categorical {feat.name!r} has the empty string as a category")
    for entity in spec.entities:
        keys = lookups[entity.key]["key"]
        if keys.dtype.kind in "OUS" and np.any(keys.astype(str) == ""):
            raise ValueError(f"entity {entity.key!r} has the empty string as a key")


def _pinned_version(ensemble_config_path: Path, model: str) -> int | None:
    """The version of `model` that the current ensemble config pins, if there is one."""
    if not ensemble_config_path.is_file():
        return None
    try:
        config = read_model_config(ensemble_config_path)
    except text_format.ParseError:
        return None
    for step in config.ensemble_scheduling.step:
        if step.model_name == model and step.model_version > 0:
            return int(step.model_version)
    return None


def _served_set(model_dir: Path, version: int, previous: int | None) -> list[int]:
    keep = [version]
    if previous is not None and previous != version and (model_dir / str(previous)).is_dir():
        keep.append(previous)
    return keep


def build_configs(
    names: ServingNames,
    spec: TransformSpec,
    meta: Mapping[str, Any],
    version: int,
    served: Mapping[str, Sequence[int]],
    *,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_us: int,
    instance_kind: InstanceKind = "auto",
    preprocess_instances: int = 1,
) -> dict[str, ModelConfig]:
    """The three configs of one publish, keyed by Triton model name, in publishing order.

    Args:
        meta: the bundle's bundle.json (kind, threshold).
        served: per composing model, the versions its version policy serves.
    """
    n_features = len(spec.feature_names)
    pre = preprocess_config(
        names.preprocess,
        spec,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instances=preprocess_instances,
        versions=served.get(names.preprocess, ()),
    )
    if meta["kind"] == "xgboost":
        model = fil_config(
            names.model,
            n_features,
            float(meta["threshold"]),
            max_batch_size=max_batch_size,
            preferred_batch_sizes=preferred_batch_sizes,
            max_queue_delay_us=max_queue_delay_us,
            instance_kind=instance_kind,
            versions=served.get(names.model, ()),
        )
    else:
        model = onnx_config(
            names.model,
            n_features,
            max_batch_size=max_batch_size,
            preferred_batch_sizes=preferred_batch_sizes,
            max_queue_delay_us=max_queue_delay_us,
            instance_kind=instance_kind,
            versions=served.get(names.model, ()),
        )
    return {
        names.preprocess: pre,
        names.model: model,
        names.ensemble: ensemble_config(names.ensemble, pre, model, version),
    }


def publish_bundle(
    bundle_dir: Path,
    repo: Path,
    model_name: str,
    version: int,
    *,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_us: int,
    instance_kind: InstanceKind = "auto",
    preprocess_instances: int = 1,
) -> PublishedModels:
    """Publish one model bundle as `<name>-preprocess`, `<name>` and `<name>-ensemble` at `version`.

    Args:
        bundle_dir: a bundle written by training (bundle.json, model files, transform/).
        repo: the Triton model repository (created if missing).
        model_name: the registered model name; the Triton model names derive from it.
        version: the MLflow model version (>= 1); it names the version directories.
        instance_kind: where the model (FIL/ONNX) runs: "auto" leaves it to Triton, "gpu", "cpu".
        preprocess_instances: CPU instances of the Python preprocess model.

    Returns:
        The names written and, per Triton model, whether its version directory is new, was
        already there byte-identical, or replaced.
    """
    if isinstance(version, bool) or int(version) != version or version < 1:
        raise ValueError(f"version must be an integer >= 1 (Triton ignores 0), got {version!r}")
    version = int(version)
    names = ServingNames.for_model(model_name)
    bundle_dir, repo = Path(bundle_dir), Path(repo)
    meta = read_bundle_json(bundle_dir)
    spec, lookups = load_transform(bundle_dir / TRANSFORM_DIR)
    _check_bundle(meta, spec, lookups)
    repo.mkdir(parents=True, exist_ok=True)
    with _publish_lock(repo):
        clean_stale(repo)
        previous = _pinned_version(repo / names.ensemble / CONFIG_FILE, names.model)
        configs = build_configs(
            names,
            spec,
            meta,
            version,
            {n: _served_set(repo / n, version, previous) for n in names.all()},
            max_batch_size=max_batch_size,
            preferred_batch_sizes=preferred_batch_sizes,
            max_queue_delay_us=max_queue_delay_us,
            instance_kind=instance_kind,
            preprocess_instances=preprocess_instances,
        )
        fills: dict[str, Callable[[Path], None]] = {
            names.preprocess: _fill_preprocess(bundle_dir, spec),
            names.model: _fill_model(bundle_dir, meta),
            names.ensemble: lambda _dest: None,  # Triton wants an (empty) version dir here too
        }
        staged = {name: _stage(repo / name, version, fills[name]) for name in names.all()}
        outcomes: dict[str, Outcome] = {
            name: _install(repo / name, version, staged[name]) for name in names.all()
        }
        for name in names.all():
            _write_atomic(repo / name / CONFIG_FILE, config_text(configs[name]).encode())
        published = PublishedModels(repo, version, str(meta["kind"]), names, outcomes)
        _write_record(repo, published, meta, bundle_dir)
    log.info("published %s", published)
    return published


def _write_record(
    repo: Path, published: PublishedModels, meta: Mapping[str, Any], bundle_dir: Path
) -> None:
    path = repo / RECORD_FILE
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        record = {}
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    models = record.setdefault("models", {})
    entry = models.get(published.names.model, {})
    history = [*entry.get("history", []), {"version": published.version, "published_at": now}]
    models[published.names.model] = {
        **published.to_json(),
        "published_at": now,
        "bundle": str(bundle_dir),
        "threshold": meta.get("threshold"),
        "feature_names": meta.get("feature_names"),
        "metrics": meta.get("metrics", {}),
        "history": history[-RECORD_HISTORY:],
    }
    record.update({"format_version": 1, "updated_at": now})
    _write_atomic(path, json.dumps(record, indent=2, sort_keys=True).encode())


# ---------------------------------------------------------------- validation


def version_dirs(model_dir: Path) -> list[int]:
    """The version numbers Triton sees in a model directory (numeric names not starting with 0)."""
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")
    )


def served_versions(config: ModelConfig, available: Sequence[int]) -> set[int]:
    """The versions Triton loads under the config's version policy (default: the latest one)."""
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return set(available)
    if which == "specific":
        return set(policy.specific.versions) & set(available)
    n = policy.latest.num_versions if which == "latest" else 1
    return set(sorted(available)[-n:]) if n > 0 else set()


def expected_files(config: ModelConfig) -> list[str]:
    """Files a version directory must hold for the config's backend ([] for an ensemble)."""
    if config.platform == "ensemble":
        return []
    if config.default_model_filename:
        return [config.default_model_filename]
    if config.backend == "fil":
        model_type = (
            config.parameters["model_type"].string_value
            if "model_type" in config.parameters
            else "xgboost"
        )
        return [FIL_MODEL_FILES.get(model_type, f"<unknown model_type {model_type!r}>")]
    if config.platform == "onnxruntime_onnx" or config.backend == "onnxruntime":
        return [ONNX_MODEL_FILE]
    if config.backend == "python":
        return [PYTHON_MODEL_FILE]
    return []


def _tensor_sig(t: Any) -> tuple[int, tuple[int, ...]]:
    return int(t.data_type), tuple(int(d) for d in t.dims)


def _check_fil(where: str, config: ModelConfig) -> list[str]:
    problems = []
    model_type = (
        config.parameters["model_type"].string_value if "model_type" in config.parameters else ""
    )
    if model_type not in FIL_MODEL_FILES:
        problems.append(
            f"{where}: FIL model_type {model_type!r} is not one of {sorted(FIL_MODEL_FILES)}"
        )
    names_in = [t.name for t in config.input]
    names_out = [t.name for t in config.output]
    if names_in != [MODEL_INPUT] or FIL_OUTPUT not in names_out:
        problems.append(
            f"{where}: FIL tensors must be {MODEL_INPUT!r} -> {FIL_OUTPUT!r}, "
            f"got {names_in} -> {names_out}"
        )
    if any(t.data_type != mc.TYPE_FP32 for t in (*config.input, *config.output)):
        problems.append(f"{where}: FIL inputs and outputs must be TYPE_FP32")
    return problems


def _check_onnx(where: str, config: ModelConfig, path: Path) -> list[str]:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:
        return [f"{path}: not a readable ONNX model: {exc}"]
    initializers = {i.name for i in graph.initializer}
    graph_in = {i.name for i in graph.input if i.name not in initializers}
    graph_out = {o.name for o in graph.output}
    cfg_in, cfg_out = {t.name for t in config.input}, {t.name for t in config.output}
    if cfg_in != graph_in or not cfg_out <= graph_out:
        return [
            f"{where}: config tensors {sorted(cfg_in)} -> {sorted(cfg_out)} do not match "
            f"{path.name}'s {sorted(graph_in)} -> {sorted(graph_out)}"
        ]
    return []


def _check_preprocess(where: str, config: ModelConfig, version_dir: Path) -> list[str]:
    """The extra files of a gpupipe preprocess model and its agreement with the transform spec."""
    problems = [
        f"{where}: missing {name}"
        for name in (FEATURES_MODULE_FILE, "kernels/__init__.py", "kernels/reference.py")
        if not (version_dir / name).is_file()
    ]
    try:
        spec = TransformSpec.load(version_dir / TRANSFORM_DIR)
    except Exception as exc:
        return [*problems, f"{where}: unreadable transform spec: {exc}"]
    problems += [
        f"{where}: missing {TRANSFORM_DIR}/{e.file}"
        for e in spec.entities
        if not (version_dir / TRANSFORM_DIR / e.file).is_file()
    ]
    try:
        expected = {name: t for name, t in raw_input_types(spec)}
    except ValueError as exc:
        return [*problems, f"{where}: {exc}"]
    got = {t.name: int(t.data_type) for t in config.input}
    if got != expected:
        problems.append(
            f"{where}: config inputs {got} differ from the spec's raw columns {expected}"
        )
    n = len(spec.feature_names)
    if [_tensor_sig(t) for t in config.output] != [(mc.TYPE_FP32, (n,))]:
        problems.append(f"{where}: output must be one TYPE_FP32 tensor of dims [{n}]")
    return problems


def _check_ensemble(
    name: str, config: ModelConfig, configs: Mapping[str, ModelConfig], repo: Path
) -> list[str]:
    where = f"{name}/{CONFIG_FILE}"
    steps = list(config.ensemble_scheduling.step)
    if not steps:
        return [f"{where}: ensemble has no steps"]
    problems: list[str] = []
    available = {t.name: _tensor_sig(t) for t in config.input}
    for i, step in enumerate(steps):
        at = f"{where}: step {i} ({step.model_name!r})"
        target = configs.get(step.model_name)
        if target is None:
            problems.append(f"{at}: model {step.model_name!r} is not in the repository")
            continue
        if step.model_version > 0:
            versions = version_dirs(repo / step.model_name)
            if step.model_version not in versions:
                problems.append(f"{at}: version {step.model_version} does not exist")
            elif step.model_version not in served_versions(target, versions):
                problems.append(
                    f"{at}: version {step.model_version} exists but the version policy of "
                    f"{step.model_name!r} does not serve it"
                )
        if config.max_batch_size > target.max_batch_size:
            problems.append(
                f"{at}: ensemble max_batch_size {config.max_batch_size} exceeds the model's "
                f"{target.max_batch_size}"
            )
        inputs = {t.name: _tensor_sig(t) for t in target.input if not t.optional}
        all_inputs = {t.name: _tensor_sig(t) for t in target.input}
        for model_in, tensor in step.input_map.items():
            if model_in not in all_inputs:
                problems.append(f"{at}: maps unknown model input {model_in!r}")
            elif tensor not in available:
                problems.append(
                    f"{at}: input {model_in!r} reads {tensor!r}, which nothing produced"
                )
            elif available[tensor] != all_inputs[model_in]:
                problems.append(
                    f"{at}: tensor {tensor!r} {available[tensor]} does not match model input "
                    f"{model_in!r} {all_inputs[model_in]}"
                )
        missing = sorted(set(inputs) - set(step.input_map))
        if missing:
            problems.append(f"{at}: model inputs not mapped: {missing}")
        outputs = {t.name: _tensor_sig(t) for t in target.output}
        for model_out, tensor in step.output_map.items():
            if model_out not in outputs:
                problems.append(f"{at}: maps unknown model output {model_out!r}")
            else:
                available[tensor] = outputs[model_out]
    for t in config.output:
        if t.name not in available:
            problems.append(f"{where}: ensemble output {t.name!r} is produced by no step")
        elif available[t.name] != _tensor_sig(t):
            problems.append(
                f"{where}: ensemble output {t.name!r} {_tensor_sig(t)} does not match what its "
                f"step produces {available[t.name]}"
            )
    return problems


def validate_repository(repo: Path) -> list[str]:
    """Check a model repository the way Triton will read it; returns problems ([] if none).

    Every `<model>/config.pbtxt` must parse into a ModelConfig named like its directory; every
    version directory must hold the backend's model file (and, for a gpupipe preprocess model,
    its shipped modules and transform, agreeing with the config); ensemble steps must reference
    existing, served model versions with matching tensor names, types and dims.
    """
    repo = Path(repo)
    if not repo.is_dir():
        return [f"{repo}: not a directory"]
    problems: list[str] = []
    configs: dict[str, ModelConfig] = {}
    model_dirs = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    for model_dir in model_dirs:
        path = model_dir / CONFIG_FILE
        if not path.is_file():
            problems.append(f"{model_dir.name}: no {CONFIG_FILE}")
            continue
        try:
            config = read_model_config(path)
        except text_format.ParseError as exc:
            problems.append(f"{model_dir.name}/{CONFIG_FILE}: cannot parse: {exc}")
            continue
        if config.name and config.name != model_dir.name:
            problems.append(
                f"{model_dir.name}/{CONFIG_FILE}: name {config.name!r} differs from its directory"
            )
        configs[model_dir.name] = config
    for name, config in configs.items():
        model_dir = repo / name
        where = f"{name}/{CONFIG_FILE}"
        versions = version_dirs(model_dir)
        if not versions:
            problems.append(f"{name}: no version directory")
        elif not served_versions(config, versions):
            problems.append(f"{name}: the version policy serves none of the versions {versions}")
        if config.backend == "fil":
            problems += _check_fil(where, config)
        if config.platform == "ensemble":
            problems += _check_ensemble(name, config, configs, repo)
        for v in versions:
            vdir = model_dir / str(v)
            problems += [
                f"{name}/{v}: missing {f}"
                for f in expected_files(config)
                if not (vdir / f).is_file()
            ]
            onnx_file = vdir / ONNX_MODEL_FILE
            if config.platform == "onnxruntime_onnx" and onnx_file.is_file():
                problems += _check_onnx(f"{name}/{v}", config, onnx_file)
            if config.backend == "python" and (vdir / TRANSFORM_DIR / SPEC_FILE).is_file():
                problems += _check_preprocess(f"{name}/{v}", config, vdir)
    record = repo / RECORD_FILE
    if record.is_file():
        try:
            json.loads(record.read_text())
        except json.JSONDecodeError as exc:
            problems.append(f"{RECORD_FILE}: not valid JSON: {exc}")
    return problems
