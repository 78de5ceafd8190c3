"""INT8 calibration of the MLP's ONNX model with explicit quantization (Q/DQ).

TensorRT 10 builds INT8 engines from QuantizeLinear/DequantizeLinear pairs placed in the graph
(explicit quantization; its implicit calibrators are deprecated), and ONNX Runtime runs the same
graph on CPU, so one file serves both and can be checked here. The scales are calibrated with ONNX
Runtime on rows of the training split: activations per tensor, weights per output channel, both
symmetric int8 (zero point 0, as TensorRT requires); biases stay float.

The quantized model is kept only if it scores the test split close enough to the float model:
the ROC AUC may drop by at most `Int8Config.max_auc_drop`. Its report (calibration rows, method,
largest probability difference, both AUCs, why it was refused) goes into the bundle either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tasks.config import Int8Config
from tasks.gpu_features import to_host

INT8_ONNX_FILE = "model.int8.onnx"
CALIBRATION_BATCH = 256


@dataclass(frozen=True)
class Int8Report:
    """What calibration produced and how the INT8 model compares with the float one."""

    kept: bool
    file: str | None
    method: str
    calibration_rows: int
    test_rows: int
    max_abs_diff: float
    roc_auc_float: float
    roc_auc_int8: float
    auc_drop: float
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def calibration_rows(
    features: npt.NDArray[np.float32], rows: int, seed: int
) -> npt.NDArray[np.float32]:
    """Up to `rows` training rows drawn without replacement (all of them when fewer)."""
    n = len(features)
    if n == 0:
        raise ValueError("no training rows to calibrate INT8 scales on")
    take = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    # taken where the rows are (device or host), then copied: only the sample crosses to host
    return np.ascontiguousarray(to_host(features[take]), np.float32)


def _batches(
    input_name: str, rows: npt.NDArray[np.float32]
) -> Iterator[dict[str, npt.NDArray[np.float32]]]:
    for start in range(0, len(rows), CALIBRATION_BATCH):
        yield {input_name: rows[start : start + CALIBRATION_BATCH]}


def quantize_qdq(
    float_model: Path,
    int8_model: Path,
    input_name: str,
    calibration: npt.NDArray[np.float32],
    method: str,
) -> None:
    """Write `int8_model`: `float_model` with Q/DQ pairs around its Gemm/MatMul inputs and
    weights, scales from running `calibration` through it (`method`: minmax, percentile or
    entropy, ONNX Runtime's calibrators)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }

    class Rows(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = _batches(input_name, calibration)

        def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
            return next(self._it, None)

    # ONNX Runtime's recommended pre-pass (shape inference, graph clean-up) into a scratch file
    prepared = int8_model.with_name(int8_model.name + ".prep.onnx")
    try:
        quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_model),
            Rows(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Gemm", "MatMul"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            # biases stay float: TensorRT's explicit quantization takes Q/DQ on the inputs and
            # weights of a Gemm and fuses a float bias itself
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
            },
        )
    finally:
        prepared.unlink(missing_ok=True)


def qdq_node_count(model_path: Path) -> int:
    """QuantizeLinear + DequantizeLinear nodes in a model (0 for a float model)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def calibrate_int8(
    bundle_dir: Path,
    float_file: str,
    input_name: str,
    train_features: npt.NDArray[np.float32],
    test_features: npt.NDArray[np.float32],
    y_test: npt.NDArray[Any],
    predict: Any,
    cfg: Int8Config,
    seed: int,
) -> Int8Report:
    """Calibrate, compare on the first `cfg.check_rows` test rows, and keep `INT8_ONNX_FILE` in
    the bundle only if the AUC drop is within `cfg.max_auc_drop` (a refused file is deleted).

    `predict(model_path, features)` scores an ONNX file (ONNX Runtime, CPU).
    """
    from tasks.metrics import classification_metrics

    rows = calibration_rows(train_features, cfg.calibration_rows, seed)
    out = bundle_dir / INT8_ONNX_FILE
    quantize_qdq(bundle_dir / float_file, out, input_name, rows, cfg.method)
    if qdq_node_count(out) == 0:
        out.unlink(missing_ok=True)
        raise RuntimeError(f"{out}: calibration inserted no QuantizeLinear/DequantizeLinear")
    test_features = test_features[: cfg.check_rows]
    y_test = y_test[: cfg.check_rows]
    p_float = predict(bundle_dir / float_file, test_features)
    p_int8 = predict(out, test_features)
    auc_float = classification_metrics(y_test, p_float)["roc_auc"]
    auc_int8 = classification_metrics(y_test, p_int8)["roc_auc"]
    drop = auc_float - auc_int8
    reason = None
    if not drop <= cfg.max_auc_drop:  # NaN AUCs refuse too
        reason = (
            f"ROC AUC fell {drop:.4f} (float {auc_float:.4f}, int8 {auc_int8:.4f}), "
            f"more than {cfg.max_auc_drop}"
        )
        out.unlink(missing_ok=True)
    return Int8Report(
        kept=reason is None,
        file=INT8_ONNX_FILE if reason is None else None,
        method=cfg.method,
        calibration_rows=len(rows),
        test_rows=len(test_features),
        max_abs_diff=float(np.max(np.abs(p_float - p_int8))) if len(p_float) else 0.0,
        roc_auc_float=auc_float,
        roc_auc_int8=auc_int8,
        auc_drop=drop,
        reason=reason,
    )
