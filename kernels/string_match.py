"""Exact match of a strings column against a few keys (Triton): each row's position among the
keys, or -1, in one pass over the column's Arrow-layout buffers (offsets and UTF-8 bytes).

A categorical feature's vocabulary is a handful of strings (a payment channel, a country), and
looking every row up through a general index (cuDF's `Index.get_indexer`, a hash join) costed
60% of the scoring transform on an H100 (bench/results/2026-12-06_h100_profile_transform_steps*).
Here each program takes BLOCK_N rows, loads their first MAX_LEN bytes as one [BLOCK_N, MAX_LEN]
tile (bytes past a row's end read as 0), and compares the tile with every key at run time: a row
matches key k when its length equals the key's and every byte of the tile equals the key's
zero-padded bytes. A row longer than MAX_LEN bytes matches nothing, because no key is longer.

Semantics are those of `kernels.reference.string_positions_reference`, the oracle for the tests:
byte equality of UTF-8 strings, which is string equality. Missing values are the caller's to
mask (a null row's bytes are whatever its offsets say, usually none).

Like `kernels.fused_preprocess`, nothing from torch or triton is imported until first use.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from kernels.fused_preprocess import (
    _interpret,
    _to_torch,
    is_available,
    jit_with_combine,
    triton_cdiv,
)

if TYPE_CHECKING:
    import torch

tl: Any = None  # bound to triton.language by _build, as in kernels.fused_preprocess
# Bound by _build to `_bit_or` jitted for the current mode (see kernels.bin_counts: triton's own
# reductions are built for the mode triton found when first imported).
_row_or: Any = None

# Beyond these a per-key pass costs more than a general index lookup would save: callers use
# `fits` and keep their general lookup for larger vocabularies.
MAX_KEYS = 64
MAX_KEY_BYTES = 64
# 0.025-0.030 ms per 1M rows on an H100, the best of 7 tiles (bench/bench_transform_kernels.py)
BLOCK_N = 256
NUM_WARPS = 4
_MIN_WIDTH = 4
_KERNELS: dict[str, Any] = {}
_LOCK = threading.Lock()

__all__ = ["MAX_KEYS", "MAX_KEY_BYTES", "fits", "is_available", "pack_keys", "string_positions"]


def _bit_or(a, b):
    return a | b


def _string_positions_kernel(
    offsets_ptr,
    chars_ptr,
    keys_ptr,
    key_lengths_ptr,
    out_ptr,
    n,
    row_base,
    n_keys,
    MAX_LEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < n
    start = tl.load(offsets_ptr + row_base + rows, mask=ok, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + row_base + rows + 1, mask=ok, other=0).to(tl.int64)
    length = end - start
    cols = tl.arange(0, MAX_LEN)
    inside = ok[:, None] & (cols[None, :] < length[:, None])
    text = tl.load(chars_ptr + start[:, None] + cols[None, :], mask=inside, other=0).to(tl.int32)
    pos = tl.full([BLOCK_N], -1, tl.int32)
    # A while loop, not `range(n_keys)`, for triton's interpreter (see kernels.tree_predict)
    k = 0
    while k < n_keys:
        key = tl.load(keys_ptr + k * MAX_LEN + cols).to(tl.int32)
        key_length = tl.load(key_lengths_ptr + k).to(tl.int64)
        differs = tl.reduce(text ^ key[None, :], 1, _row_or)
        pos = tl.where((differs == 0) & (length == key_length), k, pos)
        k += 1
    tl.store(out_ptr + rows, pos, mask=ok)


def _build(interpret: bool) -> Any:
    global tl, _row_or
    # one compiled kernel per key width: the row count, the slice's start and the number of keys
    # change from call to call and would otherwise be specialised on
    tl, _row_or, kernel = jit_with_combine(
        _KERNELS, interpret, _bit_or, _string_positions_kernel, ["n", "row_base", "n_keys"]
    )
    return kernel


def fits(keys: Sequence[str]) -> bool:
    """Whether `string_positions` takes these keys: 1 to MAX_KEYS keys of at most
    MAX_KEY_BYTES bytes of UTF-8 each."""
    return 0 < len(keys) <= MAX_KEYS and all(len(k.encode("utf-8")) <= MAX_KEY_BYTES for k in keys)


def pack_keys(keys: Sequence[str]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int32]]:
    """Keys as the kernel reads them: (n_keys, width) uint8 UTF-8 bytes zero-padded to a power
    of two width, and each key's length in bytes."""
    encoded = [k.encode("utf-8") for k in keys]
    longest = max((len(b) for b in encoded), default=0)
    width = max(_MIN_WIDTH, 1 << max(longest - 1, 0).bit_length())
    packed = np.zeros((len(encoded), width), np.uint8)
    for i, b in enumerate(encoded):
        packed[i, : len(b)] = np.frombuffer(b, np.uint8)
    return packed, np.asarray([len(b) for b in encoded], np.int32)


def string_positions(
    offsets: Any,
    chars: Any,
    packed_keys: Any,
    key_lengths: Any,
    n: int,
    row_base: int = 0,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """Position of each of `n` strings among the keys, -1 where none matches (int32 tensor).

    Args:
        offsets: int32 or int64 Arrow offsets; row i is bytes offsets[row_base + i] to
            offsets[row_base + i + 1] of `chars`. CuPy/torch on a GPU, CPU arrays with
            TRITON_INTERPRET=1.
        chars: uint8 bytes of the column (may be empty when every string is).
        packed_keys, key_lengths: `pack_keys` of the keys, on the same device or the host.
        n: rows to match; row_base: the first row's index into `offsets` (a sliced column).
        block_n, num_warps: the tile, for benchmarks.
    """
    import torch

    offsets_t = _to_torch(offsets)
    if offsets_t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be int32 or int64, got {offsets_t.dtype}")
    if n < 0 or row_base < 0 or offsets_t.numel() < row_base + n + 1:
        raise ValueError(
            f"{offsets_t.numel()} offsets cannot hold rows {row_base} to {row_base + n}"
        )
    keys_t = _to_torch(packed_keys)
    width = int(keys_t.shape[1]) if keys_t.dim() == 2 else 0
    if keys_t.dim() != 2 or width < _MIN_WIDTH or width & (width - 1):
        raise ValueError(
            f"packed keys must be (keys, power of two >= 4), got {tuple(keys_t.shape)}"
        )
    interpret = _interpret()
    device = torch.device("cpu") if interpret else offsets_t.device
    offsets_t = offsets_t.to(device)
    chars_t = _to_torch(chars).reshape(-1).to(device=device, dtype=torch.uint8)
    if chars_t.numel() == 0:
        chars_t = torch.zeros(1, dtype=torch.uint8, device=device)  # every load is masked
    keys_t = keys_t.to(device=device, dtype=torch.uint8).contiguous()
    lengths_t = _to_torch(key_lengths).to(device=device, dtype=torch.int32).contiguous()
    n_keys = int(keys_t.shape[0])
    out = torch.full((n,), -1, dtype=torch.int32, device=device)
    if n and n_keys:
        kernel = _build(interpret)
        args = (offsets_t, chars_t, keys_t, lengths_t, out, n, row_base, n_keys)
        with _LOCK:
            launch = kernel[(triton_cdiv(n, block_n),)]
            if device.type == "cuda":
                with torch.cuda.device(device):
                    launch(*args, MAX_LEN=width, BLOCK_N=block_n, num_warps=num_warps)
            else:
                launch(*args, MAX_LEN=width, BLOCK_N=block_n, num_warps=num_warps)
    return out
