"""Fused preprocessing kernel (Triton): feature-major columns in, row-major model input out.

One pass over memory: each program loads a [BLOCK_N rows x K_PAD features] tile whose loads are
coalesced along rows (each feature's values are contiguous in the input), applies the per-feature
transform in registers, and stores the tile row-major, so the transpose costs no extra trip to
DRAM (Triton moves the tile between the load and store layouts through shared memory).
Semantics are those of `kernels.reference.fused_preprocess_reference`, the oracle for the tests.

Nothing is imported from torch or triton until the kernel is first used, so this module imports on
machines without a GPU or without triton. The kernel is built (jit-decorated) on first use rather
than at import because triton picks compiled-vs-interpreted at decoration time, and
`TRITON_INTERPRET=1` may be set after this module was imported.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# Bound to `triton.language` by `_build_kernels`; the kernel body resolves `tl` from this module's
# globals when triton compiles or interprets it.
tl: Any = None

# (BLOCK_N, num_warps) tried by the autotuner on a GPU. A [BLOCK_N x 32] float32 tile is
# BLOCK_N * 128 bytes each way; 16-64 KiB tiles keep enough bytes in flight per SM to saturate
# HBM while leaving shared memory for several programs per SM.
AUTOTUNE_CONFIGS: tuple[tuple[int, int], ...] = (
    (64, 4),
    (128, 4),
    (128, 8),
    (256, 4),
    (256, 8),
    (512, 8),
)
# Fixed tile for interpreter mode, where autotuning would only cost time, and for small problems
# on a GPU, where launch overhead dominates and a tuning pass per size bucket would not pay off.
FIXED_CONFIG: tuple[int, int] = (128, 4)
AUTOTUNE_MIN_ROWS = 1 << 20
# Keep the autotuner's choice per key in Triton's on-disk cache, so a new process (each scoring
# worker, each `gpupipe run`) reads it instead of timing every configuration again.
AUTOTUNE_CACHE_RESULTS = True

_OUT_DTYPES = {"float32": "float32", "float16": "float16"}
_KERNELS: dict[str, Any] = {}


def _fused_preprocess_kernel(
    num_ptr,
    codes_ptr,
    fill_ptr,
    lo_ptr,
    hi_ptr,
    mean_ptr,
    inv_std_ptr,
    table_ptr,
    offsets_ptr,
    sizes_ptr,
    unseen_ptr,
    out_ptr,
    n,
    stride_num,
    stride_codes,
    stride_out,
    n_bucket,
    K_NUM: tl.constexpr,
    K_CAT: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IDX64: tl.constexpr,
):
    # n_bucket is unused in the body: it is only an autotune key, so that a tiny first call does
    # not pin the tile choice for large ones.
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    if IDX64:
        rows = rows.to(tl.int64)
    cols = tl.arange(0, K_PAD)
    row_ok = rows < n
    is_num = cols < K_NUM
    is_cat = (cols >= K_NUM) & (cols < K_NUM + K_CAT)
    cat_col = cols - K_NUM
    rows2 = rows[:, None]
    row_ok2 = row_ok[:, None]

    # Per-feature parameters: one small vector per program, broadcast over the rows.
    fill = tl.load(fill_ptr + cols, mask=is_num, other=0.0)[None, :]
    lo = tl.load(lo_ptr + cols, mask=is_num, other=0.0)[None, :]
    hi = tl.load(hi_ptr + cols, mask=is_num, other=0.0)[None, :]
    mean = tl.load(mean_ptr + cols, mask=is_num, other=0.0)[None, :]
    inv_std = tl.load(inv_std_ptr + cols, mask=is_num, other=0.0)[None, :]
    enc_off = tl.load(offsets_ptr + cat_col, mask=is_cat, other=0)[None, :]
    enc_size = tl.load(sizes_ptr + cat_col, mask=is_cat, other=0)[None, :]
    unseen = tl.load(unseen_ptr + cat_col, mask=is_cat, other=0.0)[None, :]

    # Numeric: NaN -> fill, clip (inf lands on the bounds), standardise. NaN propagation in the
    # clip matches np.clip should a fill value itself be NaN.
    x = tl.load(
        num_ptr + cols[None, :] * stride_num + rows2,
        mask=row_ok2 & is_num[None, :],
        other=0.0,
    ).to(tl.float32)
    x = tl.where(x != x, fill, x)
    x = tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, tl.PropagateNan.ALL)
    y = (x - mean) * inv_std

    # Categorical: table lookup for codes in [0, size), `unseen` for -1 and out-of-range codes.
    code = tl.load(
        codes_ptr + cat_col[None, :] * stride_codes + rows2,
        mask=row_ok2 & is_cat[None, :],
        other=-1,
    )
    valid = (code >= 0) & (code < enc_size)
    enc = tl.load(table_ptr + (enc_off + code), mask=valid & row_ok2, other=0.0)
    v = tl.where(valid, enc, unseen)

    res = tl.where(is_num[None, :], y, v)
    tl.store(
        out_ptr + rows2 * stride_out + cols[None, :],
        res.to(out_ptr.dtype.element_ty),
        mask=row_ok2 & (cols < K_NUM + K_CAT)[None, :],
    )


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def is_available() -> bool:
    """True when the kernels here can run: triton and torch importable, and a CUDA device or
    TRITON_INTERPRET=1 (triton's CPU interpreter). A broken torch install answers False, so
    callers fall back to CuPy/NumPy rather than fail."""
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None:
        return False
    if _interpret():
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _build_kernels(interpret: bool) -> dict[str, Any]:
    """jit (and, on a GPU, autotune) the kernel for the current mode; cached per mode."""
    mode = "interpret" if interpret else "compiled"
    if mode in _KERNELS:
        return _KERNELS[mode]
    global tl
    import triton
    import triton.language as language

    tl = language
    jitted = triton.jit(_fused_preprocess_kernel, do_not_specialize=["n_bucket"])
    kernels: dict[str, Any] = {"plain": jitted}
    if not interpret:
        kernels["tuned"] = triton.autotune(
            configs=[
                triton.Config({"BLOCK_N": b}, num_warps=w, num_stages=1)
                for b, w in AUTOTUNE_CONFIGS
            ],
            key=["K_NUM", "K_CAT", "IDX64", "n_bucket"],
            cache_results=AUTOTUNE_CACHE_RESULTS,
        )(jitted)
    _KERNELS[mode] = kernels
    return kernels


def best_config() -> dict[str, Any] | None:
    """The autotuner's choice for the most recent GPU launch, or None before any: for reports."""
    tuned = _KERNELS.get("compiled", {}).get("tuned")
    if tuned is None or getattr(tuned, "best_config", None) is None:
        return None
    cfg = tuned.best_config
    return {"BLOCK_N": cfg.kwargs.get("BLOCK_N"), "num_warps": cfg.num_warps}


def _to_torch(x: Any) -> torch.Tensor:
    """Wrap an array without copying where possible (CuPy via __cuda_array_interface__ / DLPack)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return torch.as_tensor(x, device="cuda")
    if hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
        return torch.from_dlpack(x)
    return torch.as_tensor(np.asarray(x))


def _out_torch_dtype(out_dtype: Any) -> torch.dtype:
    import torch

    if isinstance(out_dtype, torch.dtype):
        name = str(out_dtype).removeprefix("torch.")
    else:
        name = np.dtype(out_dtype).name
    if name not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32 or float16, got {out_dtype!r}")
    return getattr(torch, name)


def _vec(x: Any, length: int, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    import torch

    t = _to_torch(x).reshape(-1).to(device=device, dtype=dtype).contiguous()
    if t.numel() < length:
        raise ValueError(f"{name} has {t.numel()} entries, need {length}")
    # Never hand triton an empty tensor: its data pointer may be null even though no lane reads it.
    return t if t.numel() else torch.zeros(1, dtype=dtype, device=device)


def fused_preprocess(
    numeric: Any,
    codes: Any,
    fill: Any,
    lo: Any,
    hi: Any,
    mean: Any,
    inv_std: Any,
    enc_table: Any,
    enc_offsets: Any,
    enc_sizes: Any,
    unseen: Any,
    out_dtype: Any = "float32",
    out: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Run the fused preprocessing kernel; same semantics as `fused_preprocess_reference`.

    Args:
        numeric: (k, n) float32, feature-major (each feature's n values contiguous). Torch CUDA
            tensors, CuPy arrays or anything with __cuda_array_interface__ / DLPack; CPU torch
            tensors under TRITON_INTERPRET=1. Other float dtypes are converted to float32.
        codes: (c, n) int32 category codes, feature-major.
        fill, lo, hi, mean, inv_std: (k,) float32 per numeric feature.
        enc_table: concatenated per-category float32 encodings; category i owns
            enc_table[enc_offsets[i] : enc_offsets[i] + enc_sizes[i]].
        enc_offsets, enc_sizes: (c,) int32. unseen: (c,) float32 value for unknown codes.
        out_dtype: torch.float32/float16, "float32"/"float16" or the NumPy dtypes.
        out: optional (n, k + c) destination with unit column stride (row stride may be larger,
            e.g. a view into a wider buffer); returned when given.
        block_n, num_warps: fix the tile instead of autotuning (benchmarks, experiments).

    Returns:
        (n, k + c) torch tensor on the inputs' device, row-major, numeric features first.
    """
    import torch

    num_t = _to_torch(numeric)
    codes_t = _to_torch(codes)
    if num_t.ndim != 2 or codes_t.ndim != 2:
        raise ValueError("numeric must be (k, n) and codes (c, n); use shape (0, n) for none")
    k, n = int(num_t.shape[0]), int(num_t.shape[1])
    c = int(codes_t.shape[0])
    if k and c and int(codes_t.shape[1]) != n:
        raise ValueError(f"numeric has {n} rows but codes has {codes_t.shape[1]}")
    if not k:
        n = int(codes_t.shape[1])
    width = k + c
    device = num_t.device if k else codes_t.device
    interpret = _interpret()
    if device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"fused_preprocess needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run "
            "triton's interpreter on CPU tensors"
        )
    dtype = _out_torch_dtype(out_dtype)

    if out is None:
        out = torch.empty((n, width), dtype=dtype, device=device)
    else:
        if tuple(out.shape) != (n, width) or out.dtype != dtype or out.device != device:
            raise ValueError(
                f"out must be ({n}, {width}) {dtype} on {device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        if width > 1 and out.stride(1) != 1:
            raise ValueError("out must have unit column stride")
    if n == 0 or width == 0:
        return out

    if k:
        num_t = num_t.to(device=device, dtype=torch.float32)
        if num_t.stride(1) != 1:
            num_t = num_t.contiguous()
        stride_num = int(num_t.stride(0))
    else:
        num_t, stride_num = torch.zeros(1, dtype=torch.float32, device=device), 0
    if c:
        codes_t = codes_t.to(device=device, dtype=torch.int32)
        if codes_t.stride(1) != 1:
            codes_t = codes_t.contiguous()
        stride_codes = int(codes_t.stride(0))
    else:
        codes_t, stride_codes = torch.zeros(1, dtype=torch.int32, device=device), 0
    f32, i32 = torch.float32, torch.int32
    params = (
        _vec(fill, k, f32, device, "fill"),
        _vec(lo, k, f32, device, "lo"),
        _vec(hi, k, f32, device, "hi"),
        _vec(mean, k, f32, device, "mean"),
        _vec(inv_std, k, f32, device, "inv_std"),
        _vec(enc_table, 0, f32, device, "enc_table"),
        _vec(enc_offsets, c, i32, device, "enc_offsets"),
        _vec(enc_sizes, c, i32, device, "enc_sizes"),
        _vec(unseen, c, f32, device, "unseen"),
    )
    stride_out = int(out.stride(0)) if n > 1 else width
    # Largest element offset any lane forms; int32 arithmetic is cheaper when it fits.
    max_off = max(stride_num * max(k, 1), stride_codes * max(c, 1), stride_out * n) + width
    idx64 = max_off >= 2**31 - 1

    kernels = _build_kernels(interpret)
    args = (num_t, codes_t, *params, out, n, stride_num, stride_codes, stride_out, n.bit_length())
    meta = {"K_NUM": k, "K_CAT": c, "K_PAD": 1 << (width - 1).bit_length(), "IDX64": idx64}
    tune = not interpret and n >= AUTOTUNE_MIN_ROWS
    launch_rows(kernels, n, args, meta, device, "BLOCK_N", FIXED_CONFIG, (block_n, num_warps), tune)
    return out


def launch_rows(
    kernels: dict[str, Any],
    n: int,
    args: tuple[Any, ...],
    meta: dict[str, Any],
    device: torch.device,
    block_key: str,
    fixed_config: tuple[int, int],
    tile: tuple[int | None, int | None],
    tune: bool,
) -> None:
    """Launch a kernel over cdiv(n, block) programs of `block_key` rows each: the autotuned
    kernel (`kernels["tuned"]`) when `tune` and no tile is given, else the plain one with the
    tile's (block, num_warps), `fixed_config` filling what the tile leaves out."""
    import torch

    block, num_warps = tile
    if not tune or block is not None or num_warps is not None:
        bn = block or fixed_config[0]
        nw = num_warps or fixed_config[1]
        launch = kernels["plain"][(triton_cdiv(n, bn),)]
        extra: dict[str, Any] = {block_key: bn, "num_warps": nw}
    else:
        launch = kernels["tuned"][lambda m: (triton_cdiv(n, m[block_key]),)]
        extra = {}
    # Triton's autotuner keeps unguarded per-key state: dask's threaded scheduler calling this
    # from several threads raced inside it on a 2-GPU host. Tuning happens once per size bucket,
    # and a launch is microseconds, so one lock for every kernel costs nothing measurable.
    with _LAUNCH_LOCK:
        if device.type == "cuda":
            with torch.cuda.device(device):
                launch(*args, **meta, **extra)
        else:
            launch(*args, **meta, **extra)


_LAUNCH_LOCK = threading.Lock()


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division (triton.cdiv without importing triton)."""
    return -(-a // b)


def jit_with_combine(
    cache: dict[str, Any],
    interpret: bool,
    combine: Any,
    kernel: Any,
    do_not_specialize: list[str],
) -> tuple[Any, Any, Any]:
    """(triton.language, jitted `combine`, jitted `kernel`) for the current mode, made once per
    mode into `cache`. For kernels that reduce with their own combine function: triton's own
    reductions are built for the mode triton found when first imported, which the interpreter
    cannot call if that was compiled mode. The caller binds its module's `tl` and combine names
    to the first two before launching."""
    import triton
    import triton.language as language

    mode = "interpret" if interpret else "compiled"
    if mode not in cache:
        cache[mode] = (
            triton.jit(combine),
            triton.jit(kernel, do_not_specialize=do_not_specialize),
        )
    jitted_combine, jitted_kernel = cache[mode]
    return language, jitted_combine, jitted_kernel
