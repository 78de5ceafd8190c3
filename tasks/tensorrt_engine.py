"""TensorRT engine (plan) for an ONNX model, built where TensorRT is installed.

Written against TensorRT 10's documented Python API (`tensorrt.Builder`, `OnnxParser`,
`build_serialized_network`). Neither this project's machines nor the lent GPU machine have
TensorRT's builder libraries, so `build_engine` has never run; `engine_report` records why no
plan was built, and training carries on without one. An INT8 plan is built from the
explicitly quantized model of `tasks.quantize` (Q/DQ nodes set the precision; no calibrator),
FP16 allowed for the layers left in float. A plan only runs on the GPU model and TensorRT
version it was built with, so it is built on the training GPU and named with both.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WORKSPACE_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineReport:
    built: bool
    file: str | None
    reason: str | None
    tensorrt: str | None = None
    gpu: str | None = None
    batch: tuple[int, int, int] | None = None  # min, opt, max rows of the optimisation profile

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tensorrt_missing() -> str | None:
    """Why no engine can be built here, or None when TensorRT is importable."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'gpupipe[tensorrt]' from NVIDIA's index)"
    return None


def batch_profile(max_batch: int, preferred: int) -> tuple[int, int, int]:
    """(min, opt, max) rows for the engine's one optimisation profile."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return 1, max(1, min(preferred, max_batch)), max_batch


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    input_name: str,
    n_features: int,
    batch: tuple[int, int, int],
    int8: bool,
) -> None:
    """Parse `onnx_path` and write a serialized engine to `plan_path`.

    Raises:
        RuntimeError: the parser's errors, or a build that returned no engine.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)  # the Q/DQ nodes decide which layers run int8
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    low, opt, high = batch
    profile.set_shape(input_name, (low, n_features), (opt, n_features), (high, n_features))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT built no engine (see its log above)")
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    tmp.write_bytes(bytes(plan))
    tmp.replace(plan_path)


def engine_report(
    onnx_path: Path,
    bundle_dir: Path,
    input_name: str,
    n_features: int,
    batch: tuple[int, int, int],
    int8: bool,
    on_gpu: bool,
) -> EngineReport:
    """Build the plan into the bundle where TensorRT and a GPU are present; otherwise (or when
    the build fails) a report saying why there is none."""
    if not on_gpu:
        return EngineReport(False, None, "trained without a GPU: no engine to build for it")
    missing = tensorrt_missing()
    if missing is not None:
        return EngineReport(False, None, missing)
    import tensorrt as trt
    import torch

    gpu = torch.cuda.get_device_name()
    name = f"model.{'int8' if int8 else 'fp16'}.plan"
    try:
        build_engine(onnx_path, bundle_dir / name, input_name, n_features, batch, int8)
    except RuntimeError as exc:
        return EngineReport(False, None, str(exc), trt.__version__, gpu, batch)
    return EngineReport(True, name, None, trt.__version__, gpu, batch)
