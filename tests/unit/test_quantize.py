"""INT8 calibration (explicit Q/DQ) of an exported MLP: what is kept, what is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.config import Int8Config
from tasks.quantize import (
    INT8_ONNX_FILE,
    calibrate_int8,
    calibration_rows,
    qdq_node_count,
)
from tasks.train import ONNX_INPUT, export_mlp_onnx, onnx_predict

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, test_seed: int):
    """A small MLP fit on a nonlinear rule, exported as training exports it."""
    torch.manual_seed(test_seed % 1000)
    rng = np.random.default_rng(test_seed)
    x = rng.normal(size=(12_000, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] ** 2 + rng.normal(size=len(x)) > 0.8).astype(np.float32)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(xt)[:, 0], yt).backward()
        opt.step()
    out = tmp_path_factory.mktemp("mlp")
    export_mlp_onnx(model, 8, out / "model.onnx")
    return out, x, y


def _calibrate(directory: Path, x: np.ndarray, y: np.ndarray, cfg: Int8Config | None = None):
    return calibrate_int8(
        directory, "model.onnx", ONNX_INPUT, x[:8000], x[8000:], y[8000:], onnx_predict,
        cfg or Int8Config(), 0,
    )  # fmt: skip


def test_calibrated_model_is_kept_and_close_to_the_float_model(exported) -> None:
    directory, x, y = exported
    report = _calibrate(directory, x, y)
    assert report.kept and report.reason is None and report.file == INT8_ONNX_FILE
    assert report.calibration_rows == 4096 and report.test_rows == 4000
    assert 0 < report.max_abs_diff < 0.1
    assert abs(report.auc_drop) <= 0.005
    assert qdq_node_count(directory / INT8_ONNX_FILE) >= 8  # inputs and weights of both Gemms
    assert not list(directory.glob("*.prep.onnx"))  # the pre-pass scratch file is gone


def test_a_model_that_loses_too_much_auc_is_refused_and_removed(exported) -> None:
    directory, x, y = exported
    # a tolerance no model meets (its AUC would have to rise by 1): refused, the file deleted,
    # the report kept (built unvalidated: the config itself refuses a negative tolerance)
    strict = Int8Config.model_construct(**{**Int8Config().model_dump(), "max_auc_drop": -1.0})
    report = _calibrate(directory, x, y, strict)
    assert not report.kept and report.file is None
    assert "ROC AUC fell" in str(report.reason)
    assert not (directory / INT8_ONNX_FILE).exists()
    with pytest.raises(ValueError, match="max_auc_drop"):
        Int8Config(max_auc_drop=-1.0)


def test_calibration_rows_sample_without_replacement(test_seed: int) -> None:
    x = np.arange(100, dtype=np.float32).reshape(50, 2)
    rows = calibration_rows(x, 20, test_seed)
    assert rows.shape == (20, 2) and rows.flags.c_contiguous
    assert len({tuple(r) for r in rows}) == 20
    assert calibration_rows(x, 500, test_seed).shape == (50, 2)
    with pytest.raises(ValueError, match="no training rows"):
        calibration_rows(x[:0], 10, test_seed)
