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
        import cupy

        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDA driver errors come in many types
        return False, f"no usable CUDA device: {exc}"
    if count == 0:
        return False, "no CUDA device visible"
    return True, f"{count} CUDA device(s) with cuDF"


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
