"""Publishing to a Triton model repository, without a server: configs, layout, validation,
crash safety, and parity of the served path (wire encoding -> preprocess model.py -> published
model files) with in-process scoring of the same raw rows.

The bundles are trained by the project's own code on the session's generated dataset (seed in
the report header). Triton's `triton_python_backend_utils` exists only inside the server, so the
Python-backend test below injects a minimal test double of it (`FakeTritonUtils`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

import tasks.publish as publish
from tasks.bundle import LoadedBundle
from tasks.etl import EtlOutput, load_transform
from tasks.numpy_features import transform_raw
from tasks.publish import (
    CONFIG_FILE,
    RECORD_FILE,
    ServingNames,
    build_configs,
    config_text,
    encode_column,
    encode_raw_inputs,
    ensemble_config,
    fil_config,
    onnx_config,
    preprocess_config,
    publish_bundle,
    raw_input_types,
    read_model_config,
    served_versions,
    triton_type_for_dtype,
    validate_repository,
)
from tasks.spec import TransformSpec
from tests.triton_support import raw_rows_with_edge_cases

BATCHING = {"max_batch_size": 4096, "preferred_batch_sizes": [256, 1024], "max_queue_delay_us": 100}
PARITY_ROWS = 400
ATOL = 1e-5


@pytest.fixture(scope="module")
def trained(small_bundles: tuple[EtlOutput, dict[str, Path]]) -> tuple[EtlOutput, dict[str, Path]]:
    """The shared small bundles (tests/conftest.py)."""
    return small_bundles


@pytest.fixture(scope="module")
def bundles(trained: tuple[EtlOutput, dict[str, Path]]) -> dict[str, Path]:
    return trained[1]


@pytest.fixture(scope="module")
def spec(bundles: dict[str, Path]) -> TransformSpec:
    return TransformSpec.load(bundles["xgboost"] / "transform")


@pytest.fixture(scope="module")
def raw_rows(trained: tuple[EtlOutput, dict[str, Path]], spec: TransformSpec) -> dict[str, Any]:
    return raw_rows_with_edge_cases(trained[0].raw_test_dir, spec, PARITY_ROWS)


def publish_both(bundles: dict[str, Path], repo: Path, version: int = 1) -> dict[str, Any]:
    return {
        kind: publish_bundle(path, repo, f"gpupipe-{kind}", version, **BATCHING)
        for kind, path in bundles.items()
    }


@pytest.fixture(scope="module")
def repo(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both bundles published at version 1 (read-only for the tests that use it)."""
    root = tmp_path_factory.mktemp("repo") / "model_repo"
    publish_both(bundles, root)
    return root


def repo_snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for directories), publish leftovers excluded."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(publish._is_leftover(part) for part in rel.parts):
            continue
        out[rel.as_posix()] = path.read_bytes() if path.is_file() else None
    return out


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if publish._is_leftover(p.name)]


def load_preprocess_module(path: Path, alias: str) -> types.ModuleType:
    module_spec = importlib.util.spec_from_file_location(alias, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    # keep the shared published repository free of __pycache__ directories
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module


# ---------------------------------------------------------------- wire types and configs


@pytest.mark.parametrize(
    ("dtype", "timestamp", "expected"),
    [
        ("int64", False, mc.TYPE_INT64),
        ("int32", False, mc.TYPE_INT32),
        ("float64", False, mc.TYPE_FP64),
        ("float32", False, mc.TYPE_FP32),
        ("bool", False, mc.TYPE_BOOL),
        ("str", False, mc.TYPE_STRING),
        ("string", False, mc.TYPE_STRING),
        ("object", False, mc.TYPE_STRING),
        ("datetime64[us]", True, mc.TYPE_INT64),
        ("datetime64[ns]", False, mc.TYPE_INT64),
        ("Int64", False, mc.TYPE_FP64),
        ("Float32", False, mc.TYPE_FP64),
    ],
)
def test_raw_dtypes_map_to_triton_types(dtype: str, timestamp: bool, expected: int) -> None:
    assert triton_type_for_dtype(dtype, timestamp=timestamp) == expected


def test_unmappable_dtypes_and_lossy_encodings_are_refused() -> None:
    with pytest.raises(ValueError, match="no Triton equivalent"):
        triton_type_for_dtype("complex128")
    with pytest.raises(ValueError, match="missing or fractional"):
        encode_column(np.array([1.0, np.nan]), mc.TYPE_INT64, "card_id")
    strings = encode_column(np.array(["a", None, np.nan, "é"], dtype=object), mc.TYPE_STRING)
    assert strings.shape == (4, 1)
    assert strings.ravel().tolist() == [b"a", b"", b"", "é".encode()]
    ts = np.array(["2026-01-01T00:00:01", "NaT"], dtype="datetime64[us]")
    assert encode_column(ts, mc.TYPE_INT64).ravel().tolist() == [
        1_767_225_601_000_000,
        np.iinfo(np.int64).min,
    ]


def test_encoded_rows_are_what_tritonclient_sends_for_the_config(
    raw_rows: dict[str, Any], spec: TransformSpec
) -> None:
    """Every encoded column is accepted by InferInput under the datatype the config declares."""
    from tritonclient.grpc import InferInput

    from tasks.publish import protocol_datatype

    wire = encode_raw_inputs(raw_rows, spec)
    n = len(raw_rows[spec.id_column])
    for name, data_type in raw_input_types(spec):
        item = InferInput(name, [n, 1], protocol_datatype(data_type))
        item.set_data_from_numpy(wire[name])
        assert item.datatype() == protocol_datatype(data_type)
    assert {protocol_datatype(t) for _, t in raw_input_types(spec)} == {
        "INT64",
        "INT32",
        "FP64",
        "BYTES",
    }


def test_configs_round_trip_with_the_right_fields(spec: TransformSpec) -> None:
    n = len(spec.feature_names)
    fil = fil_config("m", n, 0.3, instance_kind="gpu", versions=[2, 1], **_builder_batching())
    onnx = onnx_config("o", n, instance_kind="cpu", **_builder_batching())
    pre = preprocess_config("m-preprocess", spec, instances=2, **_builder_batching())
    ens = ensemble_config("m-ensemble", pre, fil, 2)
    for config in (fil, onnx, pre, ens):
        parsed = text_format.Parse(config_text(config), mc.ModelConfig())
        assert parsed == config

    assert fil.backend == "fil" and fil.max_batch_size == 4096
    assert [(t.name, t.data_type, list(t.dims)) for t in fil.input] == [
        ("input__0", mc.TYPE_FP32, [n])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in fil.output] == [
        ("output__0", mc.TYPE_FP32, [2])
    ]
    params = {k: v.string_value for k, v in fil.parameters.items()}
    assert params == {
        "model_type": "xgboost_ubj",
        "is_classifier": "true",
        "predict_proba": "true",
        "threshold": "0.3",
    }
    assert list(fil.dynamic_batching.preferred_batch_size) == [256, 1024]
    assert fil.dynamic_batching.max_queue_delay_microseconds == 100
    assert fil.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert list(fil.version_policy.specific.versions) == [1, 2]

    assert onnx.platform == "onnxruntime_onnx"
    assert [(t.name, list(t.dims)) for t in onnx.output] == [("probability", [1])]
    assert onnx.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    auto = onnx_config("o", n, instance_kind="auto", **_builder_batching())
    assert auto.instance_group[0].kind == mc.ModelInstanceGroup.KIND_AUTO
    assert "kind" not in config_text(auto)

    assert pre.backend == "python"
    assert [t.name for t in pre.input] == spec.raw_columns
    types_by_name = {t.name: t.data_type for t in pre.input}
    assert types_by_name["channel"] == mc.TYPE_STRING
    assert types_by_name["timestamp"] == mc.TYPE_INT64
    assert types_by_name["amount"] == mc.TYPE_FP64
    assert types_by_name["mcc"] == mc.TYPE_INT32
    assert all(list(t.dims) == [1] for t in pre.input)
    assert [(t.name, list(t.dims)) for t in pre.output] == [("input__0", [n])]
    assert pre.instance_group[0].count == 2

    assert ens.platform == "ensemble"
    assert [t.name for t in ens.input] == spec.raw_columns
    assert [(t.name, list(t.dims)) for t in ens.output] == [("output__0", [2])]
    steps = ens.ensemble_scheduling.step
    assert [(s.model_name, s.model_version) for s in steps] == [("m-preprocess", 2), ("m", 2)]
    assert dict(steps[0].output_map) == {"input__0": "features"}
    assert dict(steps[1].input_map) == {"input__0": "features"}


def _builder_batching() -> dict[str, Any]:
    return {
        "max_batch_size": BATCHING["max_batch_size"],
        "preferred_batch_sizes": BATCHING["preferred_batch_sizes"],
        "max_queue_delay_us": BATCHING["max_queue_delay_us"],
    }


def test_bad_instance_kind_and_batch_size_are_refused(spec: TransformSpec) -> None:
    with pytest.raises(ValueError, match="instance kind"):
        onnx_config("o", 3, instance_kind="tpu", **_builder_batching())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch_size"):
        onnx_config("o", 3, max_batch_size=0, preferred_batch_sizes=[], max_queue_delay_us=0)


# ---------------------------------------------------------------- layout and validation


def test_publish_writes_triton_layout_that_validates(repo: Path, spec: TransformSpec) -> None:
    assert validate_repository(repo) == []
    expected = {
        "gpupipe-xgboost/1/xgboost.ubj",
        "gpupipe-mlp/1/model.onnx",
        "gpupipe-xgboost-preprocess/1/model.py",
        "gpupipe-xgboost-preprocess/1/numpy_features.py",
        "gpupipe-xgboost-preprocess/1/kernels/__init__.py",
        "gpupipe-xgboost-preprocess/1/kernels/reference.py",
        "gpupipe-xgboost-preprocess/1/transform/transform_spec.json",
        *(f"gpupipe-mlp-preprocess/1/transform/{e.file}" for e in spec.entities),
    }
    files = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    assert expected <= files
    assert (repo / "gpupipe-mlp-ensemble" / "1").is_dir()
    for kind in ("xgboost", "mlp"):
        for name in ServingNames.for_model(f"gpupipe-{kind}").all():
            config = read_model_config(repo / name / CONFIG_FILE)
            assert config.name == name
    record = json.loads((repo / RECORD_FILE).read_text())
    assert {k: v["version"] for k, v in record["models"].items()} == {
        "gpupipe-xgboost": 1,
        "gpupipe-mlp": 1,
    }
    assert record["models"]["gpupipe-mlp"]["ensemble"] == "gpupipe-mlp-ensemble"
    assert leftovers(repo) == []


def _break_ensemble_step(root: Path) -> None:
    path = root / "gpupipe-xgboost-ensemble" / CONFIG_FILE
    config = read_model_config(path)
    config.ensemble_scheduling.step[1].model_name = "gpupipe-nonexistent"
    path.write_text(config_text(config))


def _break_tensor_name(root: Path) -> None:
    path = root / "gpupipe-mlp-ensemble" / CONFIG_FILE
    config = read_model_config(path)
    step = config.ensemble_scheduling.step[1]
    del step.input_map["input__0"]
    step.input_map["input__0"] = "feature_vector"
    path.write_text(config_text(config))


def _unpin_served_version(root: Path) -> None:
    path = root / "gpupipe-xgboost" / CONFIG_FILE
    config = read_model_config(path)
    del config.version_policy.specific.versions[:]
    config.version_policy.specific.versions.append(7)
    path.write_text(config_text(config))


def _remove_model_file(root: Path) -> None:
    (root / "gpupipe-xgboost" / "1" / "xgboost.ubj").unlink()


def _garble_config(root: Path) -> None:
    (root / "gpupipe-mlp" / CONFIG_FILE).write_text('name: "gpupipe-mlp"\ninput {{ oops')


def _drop_shipped_kernel(root: Path) -> None:
    (root / "gpupipe-mlp-preprocess" / "1" / "kernels" / "reference.py").unlink()


def _wrong_feature_count(root: Path) -> None:
    path = root / "gpupipe-xgboost-preprocess" / CONFIG_FILE
    config = read_model_config(path)
    config.output[0].dims[0] += 1
    path.write_text(config_text(config))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (
            _break_ensemble_step,
            "gpupipe-xgboost-ensemble/config.pbtxt: step 1 ('gpupipe-nonexistent'): model "
            "'gpupipe-nonexistent' is not in the repository",
        ),
        (_break_tensor_name, "reads 'feature_vector', which nothing produced"),
        (_unpin_served_version, "does not serve it"),
        (_remove_model_file, "gpupipe-xgboost/1: missing xgboost.ubj"),
        (_garble_config, "gpupipe-mlp/config.pbtxt: cannot parse"),
        (_drop_shipped_kernel, "gpupipe-mlp-preprocess/1: missing kernels/reference.py"),
        (_wrong_feature_count, "output must be one TYPE_FP32 tensor"),
    ],
)
def test_validation_reports_broken_repositories(
    repo: Path, tmp_path: Path, breakage: Callable[[Path], None], message: str
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    breakage(broken)
    problems = validate_repository(broken)
    assert any(message in p for p in problems), problems


def test_served_versions_follow_the_version_policy() -> None:
    config = mc.ModelConfig()
    assert served_versions(config, [1, 3, 2]) == {3}
    config.version_policy.latest.num_versions = 2
    assert served_versions(config, [1, 3, 2]) == {2, 3}
    config.version_policy.specific.versions.extend([1, 5])
    assert served_versions(config, [1, 3, 2]) == {1}


# ---------------------------------------------------------------- parity of the served path


@pytest.mark.parametrize("kind", ["xgboost", "mlp"])
def test_ensemble_path_matches_in_process_scoring(
    repo: Path, bundles: dict[str, Path], raw_rows: dict[str, Any], kind: str
) -> None:
    """Raw rows -> Triton wire arrays -> preprocess model.py's decoding and the shipped transform
    -> the published model file, against LoadedBundle.predict_raw on the same rows."""
    names = ServingNames.for_model(f"gpupipe-{kind}")
    version_dir = repo / names.preprocess / "1"
    module = load_preprocess_module(version_dir / "model.py", f"preprocess_{kind}_under_test")
    bundle = LoadedBundle.load(bundles[kind], scorer="xgboost" if kind == "xgboost" else "onnx")

    wire = encode_raw_inputs(raw_rows, bundle.spec)
    assert wire["channel"].dtype == object and wire["timestamp"].dtype == np.int64
    decoded = module.decode_inputs(wire, bundle.spec.timestamp_column)
    assert decoded["timestamp"].dtype == np.dtype("datetime64[us]")
    assert np.isnat(decoded["timestamp"][-1]) and decoded["channel"][-4] is None
    spec_dict = json.loads((version_dir / "transform" / "transform_spec.json").read_text())
    _, lookups = load_transform(version_dir / "transform")
    features = module.features_for_batches([decoded], spec_dict, lookups, transform_raw)[0]
    np.testing.assert_array_equal(features, bundle.features(raw_rows))

    if kind == "xgboost":
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(str(repo / names.model / "1" / "xgboost.ubj"))
        served = booster.inplace_predict(features)
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(
            str(repo / names.model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        served = session.run(["probability"], {"input__0": features})[0][:, 0]
    expected = bundle.predict_raw(raw_rows)
    assert len(expected) == PARITY_ROWS + 5
    np.testing.assert_allclose(served, expected, rtol=0, atol=ATOL)


class FakeTritonUtils:
    """Test double of `triton_python_backend_utils`, the module that only exists inside Triton's
    Python-backend stub: just the calls preprocess_model.py makes."""

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self._name, self._array = name, np.asarray(array)

        def name(self) -> str:
            return self._name

        def as_numpy(self) -> np.ndarray:
            return self._array

    class TritonError:
        def __init__(self, message: str) -> None:
            self._message = message

        def message(self) -> str:
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors: list[Any], error: Any = None) -> None:
            self._outputs, self._error = output_tensors, error

        def output_tensors(self) -> list[Any]:
            return self._outputs

        def has_error(self) -> bool:
            return self._error is not None

        def error(self) -> Any:
            return self._error

    class InferenceRequest:
        def __init__(self, tensors: list[Any]) -> None:
            self.tensors = {t.name(): t for t in tensors}

    @staticmethod
    def get_input_tensor_by_name(request: Any, name: str) -> Any:
        return request.tensors.get(name)

    @classmethod
    def as_module(cls) -> types.ModuleType:
        module = types.ModuleType("triton_python_backend_utils")
        for attr in ("Tensor", "TritonError", "InferenceResponse", "get_input_tensor_by_name"):
            setattr(module, attr, getattr(cls, attr))
        return module


@pytest.fixture
def fake_triton(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inject the test double; undo what model.py's initialize does to sys.path/sys.modules."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", FakeTritonUtils.as_module())
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", sys.dont_write_bytecode)
    yield
    sys.modules.pop("numpy_features", None)


def initialize_args(repo: Path, name: str) -> dict[str, str]:
    """The arguments Triton passes to initialize (model_config as the JSON of the config)."""
    config = read_model_config(repo / name / CONFIG_FILE)
    return {
        "model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
        "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
        "model_repository": str(repo / name),
        "model_version": "1",
        "model_name": name,
    }


def test_preprocess_model_serves_requests_under_a_fake_triton(
    repo: Path, bundles: dict[str, Path], raw_rows: dict[str, Any], fake_triton: None
) -> None:
    name = ServingNames.for_model("gpupipe-mlp").preprocess
    module = load_preprocess_module(repo / name / "1" / "model.py", "preprocess_fake_triton")
    model = module.TritonPythonModel()
    model.initialize(initialize_args(repo, name))
    bundle = LoadedBundle.load(bundles["mlp"], scorer="onnx")
    wire = encode_raw_inputs(raw_rows, bundle.spec)

    def request(rows: slice, drop: str | None = None) -> Any:
        tensors = [
            FakeTritonUtils.Tensor(col, arr[rows]) for col, arr in wire.items() if col != drop
        ]
        return FakeTritonUtils.InferenceRequest(tensors)

    cuts = [slice(0, 150), slice(150, 151), slice(151, None)]
    responses = model.execute(
        [request(cuts[0]), request(cuts[1], drop="amount"), *map(request, cuts[1:])]
    )
    assert len(responses) == 4
    assert responses[1].has_error() and "missing input 'amount'" in responses[1].error().message()
    expected = bundle.features(raw_rows)
    got = [r.output_tensors()[0] for i, r in enumerate(responses) if i != 1]
    assert all(t.name() == "input__0" for t in got)
    np.testing.assert_array_equal(np.concatenate([t.as_numpy() for t in got]), expected)
    model.finalize()


def test_preprocess_version_dir_runs_on_its_own_copies(repo: Path, tmp_path: Path) -> None:
    """In a fresh interpreter, model.py imports numpy_features and kernels from its version
    directory, nothing from gpupipe's `tasks` package, and writes no bytecode there."""
    name = ServingNames.for_model("gpupipe-xgboost").preprocess
    version_dir = (repo / name / "1").resolve()
    script = """
import importlib.util, json, sys, types
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
spec = importlib.util.spec_from_file_location("model", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.dont_write_bytecode = True  # how the stub loads model.py is not what is tested here
spec.loader.exec_module(module)
sys.dont_write_bytecode = False
module.TritonPythonModel().initialize({"model_config": sys.argv[2]})
import numpy_features, kernels.reference
print(json.dumps({
    "numpy_features": numpy_features.__file__,
    "reference": kernels.reference.__file__,
    "tasks": sorted(m for m in sys.modules if m == "tasks" or m.startswith("tasks.")),
}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(version_dir / "model.py"),
            initialize_args(repo, name)["model_config"],
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(seen["numpy_features"]).resolve().parent == version_dir
    assert Path(seen["reference"]).resolve().parent == version_dir / "kernels"
    assert seen["tasks"] == []
    # importing the shipped modules must not change the directory Triton polls
    assert not list(version_dir.rglob("__pycache__"))


# ---------------------------------------------------------------- atomicity and republishing


def test_crash_while_staging_leaves_the_previous_repository_intact(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "repo"
    publish_bundle(bundles["xgboost"], root, "gpupipe-xgboost", 1, **BATCHING)
    before = repo_snapshot(root)
    real_copy = publish._copy_file
    calls = {"n": 0}

    def copy_then_crash(src: Path, dst: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # midway through the preprocess model's files
            raise OSError("simulated crash while copying")
        real_copy(src, dst)

    monkeypatch.setattr(publish, "_copy_file", copy_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        publish_bundle(bundles["xgboost"], root, "gpupipe-xgboost", 2, **BATCHING)

    assert repo_snapshot(root) == before
    assert not list(root.glob("*/2"))
    assert [p.name.startswith(".staging-2-") for p in leftovers(root)] == [True]
    assert validate_repository(root) == []

    monkeypatch.setattr(publish, "_copy_file", real_copy)
    done = publish_bundle(bundles["xgboost"], root, "gpupipe-xgboost", 2, **BATCHING)
    assert set(done.outcomes.values()) == {"new"}
    assert leftovers(root) == []
    assert validate_repository(root) == []
    ensemble = read_model_config(root / "gpupipe-xgboost-ensemble" / CONFIG_FILE)
    assert {s.model_version for s in ensemble.ensemble_scheduling.step} == {2}


def test_crash_before_configs_keeps_serving_the_previous_version(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version dirs are in place but no config names them yet: Triton still serves version 1."""
    root = tmp_path / "repo"
    publish_bundle(bundles["mlp"], root, "gpupipe-mlp", 1, **BATCHING)
    configs_before = {p: p.read_bytes() for p in root.glob(f"*/{CONFIG_FILE}")}

    def crash(path: Path, data: bytes) -> bool:
        raise OSError("simulated crash before the configs")

    monkeypatch.setattr(publish, "_write_atomic", crash)
    with pytest.raises(OSError, match="simulated crash"):
        publish_bundle(bundles["mlp"], root, "gpupipe-mlp", 2, **BATCHING)
    assert {p: p.read_bytes() for p in root.glob(f"*/{CONFIG_FILE}")} == configs_before
    for name in ServingNames.for_model("gpupipe-mlp").all():
        config = read_model_config(root / name / CONFIG_FILE)
        assert served_versions(config, publish.version_dirs(root / name)) == {1}
    assert validate_repository(root) == []


def test_republishing_a_version_is_a_no_op_or_a_whole_replacement(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "repo"
    publish_bundle(bundles["xgboost"], root, "gpupipe-xgboost", 1, **BATCHING)
    before = repo_snapshot(root)
    again = publish_bundle(bundles["xgboost"], root, "gpupipe-xgboost", 1, **BATCHING)
    assert set(again.outcomes.values()) == {"unchanged"}
    after = repo_snapshot(root)
    assert {k: v for k, v in after.items() if k != RECORD_FILE} == {
        k: v for k, v in before.items() if k != RECORD_FILE
    }

    changed = tmp_path / "bundle-new-threshold"
    shutil.copytree(bundles["xgboost"], changed)
    meta = json.loads((changed / "bundle.json").read_text())
    (changed / "bundle.json").write_text(json.dumps({**meta, "threshold": 0.25}))
    replaced = publish_bundle(changed, root, "gpupipe-xgboost", 1, **BATCHING)
    assert replaced.outcomes == {
        "gpupipe-xgboost-preprocess": "unchanged",
        "gpupipe-xgboost": "replaced",
        "gpupipe-xgboost-ensemble": "unchanged",
    }
    config = read_model_config(root / "gpupipe-xgboost" / CONFIG_FILE)
    assert config.parameters["threshold"].string_value == "0.25"
    assert json.loads((root / "gpupipe-xgboost/1/bundle.json").read_text())["threshold"] == 0.25
    assert leftovers(root) == []
    assert validate_repository(root) == []


def test_rollback_to_an_older_version_serves_that_version(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "repo"
    for version in (1, 2, 1):
        publish_bundle(bundles["mlp"], root, "gpupipe-mlp", version, **BATCHING)
    names = ServingNames.for_model("gpupipe-mlp")
    ensemble = read_model_config(root / names.ensemble / CONFIG_FILE)
    assert [s.model_version for s in ensemble.ensemble_scheduling.step] == [1, 1]
    model = read_model_config(root / names.model / CONFIG_FILE)
    # the one switched away from stays loaded while the ensemble moves over
    assert served_versions(model, publish.version_dirs(root / names.model)) == {1, 2}
    history = json.loads((root / RECORD_FILE).read_text())["models"]["gpupipe-mlp"]["history"]
    assert [h["version"] for h in history] == [1, 2, 1]
    assert validate_repository(root) == []


def test_publish_refuses_bad_arguments(bundles: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="version must be an integer >= 1"):
        publish_bundle(bundles["mlp"], tmp_path / "r", "gpupipe-mlp", 0, **BATCHING)
    with pytest.raises(ValueError, match="Triton model name"):
        publish_bundle(bundles["mlp"], tmp_path / "r", "../escape", 1, **BATCHING)
    broken = tmp_path / "bundle"
    shutil.copytree(bundles["mlp"], broken)
    spec = json.loads((broken / "transform/transform_spec.json").read_text())
    channel = next(c for c in spec["categorical"] if c["name"] == "channel")
    channel["vocabulary"][0] = ""
    (broken / "transform/transform_spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="empty string as a category"):
        publish_bundle(broken, tmp_path / "r", "gpupipe-mlp", 1, **BATCHING)


def test_build_configs_picks_the_backend_from_the_bundle_kind(spec: TransformSpec) -> None:
    names = ServingNames.for_model("m")
    for kind, backend in (("xgboost", "fil"), ("mlp", "")):
        configs = build_configs(
            names, spec, {"kind": kind, "threshold": 0.5}, 3, {"m": [3, 2]}, **_builder_batching()
        )
        assert list(configs) == ["m-preprocess", "m", "m-ensemble"]
        assert configs["m"].backend == backend
        assert list(configs["m"].version_policy.specific.versions) == [2, 3]
        assert not configs["m-preprocess"].HasField("version_policy")
    assert raw_input_types(spec)[0] == (spec.id_column, mc.TYPE_INT64)
