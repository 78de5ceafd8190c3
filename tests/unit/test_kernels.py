"""The fused preprocessing kernel (Triton) against its NumPy reference, and the reference itself
against a per-element Python loop.

Without a CUDA device the kernel runs in triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set below before the kernel module is imported). Seeds: a fixed base, overridable with
GPUPIPE_TEST_SEED, plus a per-case offset; every case prints its seed and puts it in its failure
messages.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
# before triton is first imported (not importorskip, which imports it): triton's own jitted
# library functions (tl.zeros, tl.sum) are built for the mode it finds then
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.fused_preprocess import fused_preprocess, is_available  # noqa: E402
from kernels.reference import fused_preprocess_reference  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
BASE_SEED = int(os.environ.get("GPUPIPE_TEST_SEED", "20240611"))
# float16 output: the reference rounds the same float32 value, so agreement is normally exact;
# the tolerance allows one half-precision ulp.
TOL = {"float32": {"rtol": 1e-6, "atol": 1e-6}, "float16": {"rtol": 1e-3, "atol": 1e-3}}

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (the kernel compiled, not interpreted)",
)


def case_seed(name: str) -> int:
    seed = BASE_SEED + zlib.crc32(name.encode())
    print(f"seed for {name}: {seed} (base {BASE_SEED}, GPUPIPE_TEST_SEED overrides)")
    return seed


def make_inputs(seed: int, n: int, k: int, c: int) -> dict[str, np.ndarray]:
    """Random, nonzero inputs with NaN, +-inf, code -1 and out-of-range codes sprinkled in."""
    rng = np.random.default_rng(seed)
    numeric = (rng.standard_normal((k, n)) * 3.0 + 0.5).astype(np.float32)
    if k and n:
        flat = numeric.reshape(-1)
        picks = rng.choice(flat.size, size=min(flat.size, max(3, flat.size // 10)), replace=False)
        specials = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)
        flat[picks] = specials[np.arange(picks.size) % 3]
    half_width = rng.uniform(0.5, 4.0, k).astype(np.float32)
    centre = rng.uniform(-1.0, 1.0, k).astype(np.float32)
    sizes = rng.integers(1, 12, c).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    table = rng.uniform(0.1, 2.0, int(sizes.sum())).astype(np.float32)
    table *= rng.choice([-1.0, 1.0], table.size).astype(np.float32)
    codes = np.empty((c, n), dtype=np.int32)
    for i in range(c):
        codes[i] = rng.integers(-1, sizes[i] + 3, n)  # -1, valid codes, and past-the-end codes
        if n:
            extreme = np.array([2**31 - 1, -(2**31), -5, sizes[i]], dtype=np.int32)
            idx = rng.choice(n, size=min(n, 4), replace=False)
            codes[i, idx] = extreme[: idx.size]
    return {
        "numeric": numeric,
        "codes": codes,
        "fill": rng.uniform(-2.0, 2.0, k).astype(np.float32),
        "lo": centre - half_width,
        "hi": centre + half_width,
        "mean": rng.uniform(-1.0, 1.0, k).astype(np.float32),
        "inv_std": rng.uniform(0.25, 3.0, k).astype(np.float32),
        "enc_table": table,
        "enc_offsets": offsets,
        "enc_sizes": sizes,
        "unseen": rng.uniform(-3.0, -2.5, c).astype(np.float32),
    }


def as_device(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(a.copy()).to(DEVICE) for name, a in arrays.items()}


def reference(arrays: dict[str, np.ndarray], out_dtype: str) -> np.ndarray:
    return fused_preprocess_reference(**arrays, out_dtype=np.dtype(out_dtype).type)


def loop_oracle(arrays: dict[str, np.ndarray], out_dtype: str) -> np.ndarray:
    """The semantics written out one element at a time, in float32 scalars."""
    numeric, codes = arrays["numeric"], arrays["codes"]
    k, n = numeric.shape
    c = codes.shape[0]
    out = np.zeros((n, k + c), dtype=out_dtype)
    for r in range(n):
        for j in range(k):
            x = np.float32(numeric[j, r])
            if np.isnan(x):
                x = arrays["fill"][j]
            x = min(max(x, arrays["lo"][j]), arrays["hi"][j])
            out[r, j] = (np.float32(x) - arrays["mean"][j]) * arrays["inv_std"][j]
        for i in range(c):
            code = int(codes[i, r])
            if 0 <= code < int(arrays["enc_sizes"][i]):
                out[r, k + i] = arrays["enc_table"][int(arrays["enc_offsets"][i]) + code]
            else:
                out[r, k + i] = arrays["unseen"][i]
    return out


# --- the oracle itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize(("n", "k", "c"), [(9, 3, 2), (5, 0, 2), (5, 3, 0), (1, 2, 1)])
def test_reference_matches_loop(n: int, k: int, c: int, out_dtype: str) -> None:
    seed = case_seed(f"reference-{n}-{k}-{c}-{out_dtype}")
    arrays = make_inputs(seed, n, k, c)
    got = reference(arrays, out_dtype)
    want = loop_oracle(arrays, out_dtype)
    assert got.dtype == np.dtype(out_dtype) and got.shape == (n, k + c)
    assert got.flags.c_contiguous
    np.testing.assert_allclose(got, want, **TOL[out_dtype], err_msg=f"seed {seed}")


def test_reference_special_values_explicitly() -> None:
    """Hand-checked cases: NaN fills, infinities land on the bounds, unknown codes read unseen."""
    arrays = {
        "numeric": np.array([[np.nan, np.inf, -np.inf, 1.5]], dtype=np.float32),
        "codes": np.array([[0, 2, -1, 3]], dtype=np.int32),
        "fill": np.array([0.5], np.float32),
        "lo": np.array([-1.0], np.float32),
        "hi": np.array([2.0], np.float32),
        "mean": np.array([0.25], np.float32),
        "inv_std": np.array([2.0], np.float32),
        "enc_table": np.array([7.0, 8.0, 9.0], np.float32),
        "enc_offsets": np.array([0], np.int32),
        "enc_sizes": np.array([3], np.int32),
        "unseen": np.array([-4.0], np.float32),
    }
    want = np.array([[0.5, 7.0], [3.5, 9.0], [-2.5, -4.0], [2.5, -4.0]], dtype=np.float32)
    np.testing.assert_array_equal(reference(arrays, "float32"), want)


# --- the kernel against the oracle ---------------------------------------------------------------

SHAPES = [
    (1000, 28, 4),  # the production layout, n not a multiple of the tile
    (257, 5, 3),  # width 8, one row past a tile boundary
    (300, 28, 3),  # width not a power of two
    (130, 0, 4),  # categorical only
    (130, 6, 0),  # numeric only
    (1, 3, 2),
    (1, 0, 1),
    (64, 1, 0),
]


def run_kernel(arrays: dict[str, np.ndarray], out_dtype: str, out: torch.Tensor | None = None):
    return fused_preprocess(**as_device(arrays), out_dtype=out_dtype, out=out)


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize(("n", "k", "c"), SHAPES)
def test_kernel_matches_reference(n: int, k: int, c: int, out_dtype: str) -> None:
    seed = case_seed(f"kernel-{n}-{k}-{c}-{out_dtype}")
    arrays = make_inputs(seed, n, k, c)
    want = reference(arrays, out_dtype)
    assert np.count_nonzero(want) > 0
    out = torch.full((n, k + c), float("nan"), dtype=getattr(torch, out_dtype), device=DEVICE)
    got_t = run_kernel(arrays, out_dtype, out=out)
    assert got_t is out
    got = got_t.cpu().numpy()
    assert got.dtype == np.dtype(out_dtype)
    assert not np.isnan(got).any(), f"unwritten (poisoned) elements remain, seed {seed}"
    np.testing.assert_allclose(got, want, **TOL[out_dtype], err_msg=f"seed {seed}")


@pytest.mark.parametrize("out_dtype", ["float32", torch.float16, np.float16])
def test_kernel_allocates_output(out_dtype) -> None:
    seed = case_seed(f"alloc-{out_dtype}")
    arrays = make_inputs(seed, 77, 4, 2)
    got = fused_preprocess(**as_device(arrays), out_dtype=out_dtype)
    name = "float32" if out_dtype == "float32" else "float16"
    assert got.shape == (77, 6) and got.is_contiguous() and got.device.type == DEVICE
    np.testing.assert_allclose(got.cpu().numpy(), reference(arrays, name), **TOL[name])


def test_kernel_writes_only_its_window() -> None:
    """Output as a view into a wider sentinel buffer: every target written, nothing else."""
    seed = case_seed("window")
    n, k, c = 150, 5, 2
    arrays = make_inputs(seed, n, k, c)
    sentinel = 12345.0
    buf = torch.full((n + 2, k + c + 3), sentinel, dtype=torch.float32, device=DEVICE)
    view = buf[1 : n + 1, 2 : 2 + k + c]
    run_kernel(arrays, "float32", out=view)
    got = buf.cpu().numpy()
    inside = np.zeros(got.shape, dtype=bool)
    inside[1 : n + 1, 2 : 2 + k + c] = True
    assert (got[~inside] == sentinel).all(), f"write outside the window, seed {seed}"
    np.testing.assert_allclose(got[inside].reshape(n, k + c), reference(arrays, "float32"), 1e-6)


def test_kernel_strided_inputs_and_host_params() -> None:
    """Feature rows with a stride larger than n (views of wider buffers); params as NumPy."""
    seed = case_seed("strided")
    n, k, c = 200, 6, 3
    arrays = make_inputs(seed, n, k, c)
    wide = make_inputs(seed + 1, n + 37, k, c)
    wide["numeric"][:, :n] = arrays["numeric"]
    wide["codes"][:, :n] = arrays["codes"]
    numeric = torch.from_numpy(wide["numeric"]).to(DEVICE)[:, :n]
    codes = torch.from_numpy(wide["codes"]).to(DEVICE)[:, :n]
    assert numeric.stride(0) == n + 37
    params = {k_: v for k_, v in arrays.items() if k_ not in ("numeric", "codes")}
    got = fused_preprocess(numeric, codes, **params, out_dtype="float32")
    np.testing.assert_allclose(got.cpu().numpy(), reference(arrays, "float32"), 1e-6, 1e-6)


def test_kernel_empty_and_bad_arguments() -> None:
    arrays = make_inputs(case_seed("empty"), 0, 3, 2)
    assert tuple(run_kernel(arrays, "float32").shape) == (0, 5)
    arrays = make_inputs(case_seed("bad"), 10, 3, 2)
    with pytest.raises(ValueError, match="out_dtype"):
        run_kernel(arrays, "float64")
    with pytest.raises(ValueError, match="out must be"):
        run_kernel(arrays, "float32", out=torch.empty((10, 4), device=DEVICE))


def test_is_available() -> None:
    assert is_available()


def test_module_import_is_lazy() -> None:
    """Importing the kernel module pulls in neither torch nor triton (GPU-less hosts, fast CLIs)."""
    code = (
        "import sys, kernels.fused_preprocess; "
        "assert not {'torch', 'triton'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- real device, large shapes -------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_kernel_large_on_gpu(out_dtype: str) -> None:
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the interpreter is too slow for this size")
    seed = case_seed(f"large-{out_dtype}")
    n, k, c = 3_000_017, 28, 4
    arrays = make_inputs(seed, n, k, c)
    out = torch.full((n, k + c), float("nan"), dtype=getattr(torch, out_dtype), device="cuda")
    got = run_kernel(arrays, out_dtype, out=out).cpu().numpy()
    assert not np.isnan(got).any(), f"unwritten elements, seed {seed}"
    np.testing.assert_allclose(got, reference(arrays, out_dtype), **TOL[out_dtype])


@pytest.mark.gpu
@requires_cuda
def test_kernel_accepts_cupy() -> None:
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1")
    cupy = pytest.importorskip("cupy")
    seed = case_seed("cupy")
    arrays = make_inputs(seed, 4099, 28, 4)
    got = fused_preprocess(**{name: cupy.asarray(a) for name, a in arrays.items()})
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), reference(arrays, "float32"), 1e-6, 1e-6)
