"""Choosing the compute backend (cuDF on an NVIDIA GPU, pandas on CPU) once, explicitly."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Literal

from tasks.config import DeviceChoice

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The requested device cannot be used on this machine."""


@dataclass(frozen=True)
class Backend:
    """The resolved backend: `gpu` means cuDF dataframes, CuPy arrays and CUDA XGBoost."""

    device: Literal["cpu", "gpu"]
    reason: str

    @property
    def dataframe_backend(self) -> Literal["pandas", "cudf"]:
        return "cudf" if self.device == "gpu" else "pandas"

    @property
    def xgboost_device(self) -> str:
        return "cuda" if self.device == "gpu" else "cpu"

    @property
    def torch_device(self) -> str:
        return "cuda" if self.device == "gpu" else "cpu"


def probe_gpu() -> tuple[bool, str]:
    """Whether cuDF, CuPy and at least one CUDA device are usable, and why not if not."""
    missing = [m for m in ("cudf", "cupy", "dask_cudf") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            False,
            f"GPU packages not installed: {', '.join(missing)} (pip install 'gpupipe[gpu]')",
        )
    try:
        count = visible_gpus()
    except Exception as exc:  # CUDA driver errors come in many types
        return False, f"no usable CUDA device: {exc}"
    if count == 0:
        return False, "no CUDA device visible"
    return True, f"{count} CUDA device(s) with cuDF"


def visible_gpus() -> int:
    """CUDA devices this process can see (CUDA_VISIBLE_DEVICES applied); raises without CUDA."""
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


def free_device_bytes() -> int:
    """Free memory on the current CUDA device; raises without CUDA."""
    import cupy

    return int(cupy.cuda.runtime.memGetInfo()[0])


def use_async_device_memory() -> bool:
    """Route RMM allocations (cuDF's, in this process) through CUDA's stream-ordered pool
    (`cudaMallocAsync`) unless a memory resource was already chosen (a dask-cuda worker's RMM
    settings, or the caller's own). Returns whether it changed the resource.

    With RMM's default resource every cuDF column is a `cudaMalloc` and a synchronizing
    `cudaFree`: on an H100 that made the scoring transform 2-5x slower per 1M rows
    (bench/results/2026-11-23_h100_profile_batched*.json). The async pool also hands memory back
    to the driver, so XGBoost's and PyTorch's own allocators in the same process still find it.
    Used by scoring workers and the in-memory GPU ETL: 20M rows took 1.07-1.17 s with it against
    1.14-1.44 s without, alternating processes on one H100
    (bench/results/2026-12-06_h100_profile_gpu_etl_memory_*.json). An older ETL, which waited on
    the device per statistic, measured slower with it (numeric fits 0.46 -> 2.1 s,
    bench/results/2026-11-23_h100_bench_pipeline_20M_warm_v4.json).
    """
    import rmm

    if type(rmm.mr.get_current_device_resource()) is not rmm.mr.CudaMemoryResource:
        return False
    rmm.mr.set_current_device_resource(rmm.mr.CudaAsyncMemoryResource())
    log.info("RMM: cudaMallocAsync memory resource for this process")
    return True


def resolve_backend(choice: DeviceChoice | str) -> Backend:
    """Resolve `auto | cpu | gpu` to a backend; `gpu` without a usable GPU is an error."""
    if choice not in ("auto", "cpu", "gpu"):
        raise BackendError(f"device must be 'auto', 'cpu' or 'gpu', got {choice!r}")
    if choice == "cpu":
        return Backend("cpu", "device = 'cpu' requested")
    ok, why = probe_gpu()
    if choice == "gpu":
        if not ok:
            raise BackendError(f"device = 'gpu' requested but {why}")
        return Backend("gpu", f"device = 'gpu' requested; {why}")
    backend = Backend("gpu", f"auto: {why}") if ok else Backend("cpu", f"auto: {why}")
    log.info("backend: %s (%s)", backend.device, backend.reason)
    return backend
