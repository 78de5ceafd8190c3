"""The string-match kernel (Triton) against its NumPy reference, on Arrow string buffers; on CPU in
triton's interpreter (TRITON_INTERPRET=1, set below before the kernel module is imported)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.reference import string_positions_reference  # noqa: E402
from kernels.string_match import (  # noqa: E402
    MAX_KEY_BYTES,
    MAX_KEYS,
    fits,
    pack_keys,
    string_positions,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KEYS = ["web", "pos", "atm", "mobile", "", "ünï", "a" * 20]


def _strings(seed: int, n: int) -> list[str]:
    """Keys, their prefixes and extensions, other strings, long strings and non-ASCII text."""
    rng = np.random.default_rng(seed)
    pool = [*KEYS, "we", "webs", "WEB", "mobil", "mobile ", "ün", "a" * 19, "a" * 21, "x" * 90]
    pool += ["".join(rng.choice(list("abcü"), size=int(rng.integers(0, 9)))) for _ in range(20)]
    return [pool[i] for i in rng.integers(0, len(pool), size=n)]


def _buffers(array: pa.Array) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(offsets, chars, row_base) of an Arrow string array, as tensors on DEVICE."""
    _, offsets, chars = array.buffers()
    kind = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets_np = np.frombuffer(offsets, kind)
    chars_np = np.frombuffer(chars, np.uint8) if chars is not None else np.zeros(0, np.uint8)
    return (
        torch.as_tensor(offsets_np.copy(), device=DEVICE),
        torch.as_tensor(chars_np.copy(), device=DEVICE),
        array.offset,
    )


def _match(array: pa.Array, keys: list[str]) -> np.ndarray:
    offsets, chars, base = _buffers(array)
    packed, lengths = pack_keys(keys)
    got = string_positions(offsets, chars, packed, lengths, len(array), base)
    assert got.dtype == torch.int32
    return got.cpu().numpy()


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300])
@pytest.mark.parametrize("large", [False, True])
def test_kernel_matches_reference(test_seed: int, n: int, large: bool) -> None:
    values = _strings(test_seed + n, n)
    array = pa.array(values, pa.large_string() if large else pa.string())
    got = _match(array, KEYS)
    offsets, chars, _ = _buffers(array)
    want = string_positions_reference(offsets.cpu().numpy(), chars.cpu().numpy(), KEYS, n)
    np.testing.assert_array_equal(got, want)
    # and the reference is what a Python dictionary lookup gives
    np.testing.assert_array_equal(want, [KEYS.index(v) if v in KEYS else -1 for v in values])


def test_a_sliced_column_starts_at_its_row_base(test_seed: int) -> None:
    values = _strings(test_seed, 200)
    array = pa.array(values).slice(37, 100)
    assert array.offset == 37
    want = [KEYS.index(v) if v in KEYS else -1 for v in values[37:137]]
    np.testing.assert_array_equal(_match(array, KEYS), want)


def test_every_row_empty_and_no_key_empty() -> None:
    array = pa.array([""] * 50)
    np.testing.assert_array_equal(_match(array, ["a", "b"]), np.full(50, -1))
    np.testing.assert_array_equal(_match(array, ["a", ""]), np.full(50, 1))


def test_key_widths_and_limits() -> None:
    packed, lengths = pack_keys(["ab", "ü"])
    assert packed.shape == (2, 4) and lengths.tolist() == [2, 2]
    assert packed[1, :2].tobytes() == "ü".encode()
    assert pack_keys(["x" * 17])[0].shape == (1, 32)
    longest = "k" * MAX_KEY_BYTES
    assert fits([longest]) and not fits([longest + "k"])
    assert fits([str(i) for i in range(MAX_KEYS)]) and not fits(
        [str(i) for i in range(MAX_KEYS + 1)]
    )
    assert not fits([])
    array = pa.array(["x", longest, longest + "k"])
    np.testing.assert_array_equal(_match(array, ["x", longest]), [0, 1, -1])


def test_bad_buffers_are_refused() -> None:
    packed, lengths = pack_keys(["a"])
    offsets = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    chars = torch.zeros(0, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="offsets cannot hold"):
        string_positions(offsets, chars, packed, lengths, 3)
    with pytest.raises(ValueError, match="int32 or int64"):
        string_positions(offsets.float(), chars, packed, lengths, 2)
    with pytest.raises(ValueError, match="packed keys"):
        string_positions(offsets, chars, packed[:, :3], lengths, 2)
