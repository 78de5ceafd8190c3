"""TensorRT plans: the reports when no engine can be built here, the optimisation profile, and
(marker `tensorrt`, where TensorRT and a GPU exist) a real INT8 build."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tasks.tensorrt_engine import batch_profile, engine_report, tensorrt_missing

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def test_no_engine_without_a_gpu_or_without_tensorrt(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    cpu = engine_report(onnx, tmp_path, "input__0", 8, (1, 64, 1024), True, on_gpu=False)
    assert not cpu.built and cpu.file is None and "without a GPU" in str(cpu.reason)
    if not HAVE_TRT:
        gpu = engine_report(onnx, tmp_path, "input__0", 8, (1, 64, 1024), True, on_gpu=True)
        assert not gpu.built and "TensorRT is not installed" in str(gpu.reason)
        assert tensorrt_missing() == gpu.reason
    assert list(tmp_path.iterdir()) == []  # nothing written either way


def test_batch_profile() -> None:
    assert batch_profile(1 << 20, 4096) == (1, 4096, 1 << 20)
    assert batch_profile(100, 4096) == (1, 100, 100)
    with pytest.raises(ValueError, match="max_batch"):
        batch_profile(0, 4096)


def test_trained_mlp_records_why_it_has_no_plan(tmp_path: Path) -> None:
    """The report lands in the bundle's JSON as plain values."""
    report = engine_report(tmp_path / "m.onnx", tmp_path, "x", 4, (1, 2, 4), False, False)
    assert report.to_json() == {
        "built": False,
        "file": None,
        "reason": report.reason,
        "tensorrt": None,
        "gpu": None,
        "batch": None,
    }


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT's Python builder")
def test_int8_engine_builds_from_the_qdq_model(tmp_path: Path) -> None:
    """Never run on this project's machines (no TensorRT builder there): a Q/DQ MLP must build
    into an INT8 plan that TensorRT can load again."""
    import numpy as np
    import tensorrt as trt
    import torch

    from tasks.config import Int8Config
    from tasks.quantize import calibrate_int8
    from tasks.train import ONNX_INPUT, export_mlp_onnx, onnx_predict

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6000, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    export_mlp_onnx(model, 8, tmp_path / "model.onnx")
    int8 = calibrate_int8(
        tmp_path, "model.onnx", ONNX_INPUT, x[:4000], x[4000:], y[4000:], onnx_predict,
        Int8Config(max_auc_drop=1.0), 0,
    )  # fmt: skip
    report = engine_report(
        tmp_path / str(int8.file), tmp_path, ONNX_INPUT, 8, (1, 64, 4096), True, True
    )
    assert report.built, report.reason
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((tmp_path / str(report.file)).read_bytes())
    assert engine is not None and engine.num_io_tensors == 2
