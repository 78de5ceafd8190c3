"""The drift-counting kernel (Triton) against its NumPy reference; on CPU in triton's interpreter
(TRITON_INTERPRET=1, set below before the kernel module is imported)."""

from __future__ import annotations

import importlib.util
import itertools
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
# before triton is first imported: its library functions (tl.sum) are built for the mode it
# finds then, and the interpreter cannot call ones built for compilation
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.bin_counts import at_least_counts, padded_edges  # noqa: E402
from kernels.reference import at_least_counts_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int, n: int, k: int) -> tuple[np.ndarray, list[list[float]]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k)).astype(np.float32)
    x[rng.random((n, k)) < 0.05] = np.nan
    x[: min(n, 3), 0] = np.inf
    x[3:6, :] = 0.25  # values equal to an edge count as at least that edge
    edges = [sorted(rng.normal(size=int(rng.integers(0, 9))).tolist()) for _ in range(k)]
    edges[0] = [0.25] + ([1.0] if k > 1 else [])
    return x, edges


@pytest.mark.parametrize(("n", "k"), [(300, 5), (257, 1), (64, 33), (0, 3)])
def test_kernel_matches_reference(test_seed: int, n: int, k: int) -> None:
    x, edges = _case(test_seed + n + k, n, k)
    got = at_least_counts(torch.as_tensor(x, device=DEVICE), edges)
    np.testing.assert_array_equal(got, at_least_counts_reference(x, edges))


def test_strided_columns_and_no_edges_at_all(test_seed: int) -> None:
    x, _ = _case(test_seed, 200, 6)
    view = torch.as_tensor(x, device=DEVICE)[:, ::2]  # every other column: a strided view
    edges: list[list[float]] = [[], [], []]
    got = at_least_counts(view, edges)
    assert got.shape == (3, 1)
    np.testing.assert_array_equal(got, at_least_counts_reference(x[:, ::2], edges))


def test_padded_edges_and_shape_errors() -> None:
    assert padded_edges([[1.0], [0.0, 2.0]]).tolist() == [[1.0, np.inf], [0.0, 2.0]]
    assert padded_edges([[], []]).shape == (2, 0)
    with pytest.raises(ValueError, match="matrix"):
        at_least_counts(torch.zeros(4, 2, device=DEVICE), [[0.0]])


@pytest.mark.parametrize("offsets", [[0, 300], [0, 1, 299, 300], [0, 0, 120, 120, 300]])
def test_segments_count_each_row_range_on_its_own(test_seed: int, offsets: list[int]) -> None:
    x, edges = _case(test_seed + len(offsets), 300, 4)
    got = at_least_counts(torch.as_tensor(x, device=DEVICE), edges, offsets)
    assert got.shape == (len(offsets) - 1, 4, max(len(e) for e in edges) + 1)
    for s, (a, b) in enumerate(itertools.pairwise(offsets)):
        np.testing.assert_array_equal(got[s], at_least_counts_reference(x[a:b], edges))


@pytest.mark.parametrize("offsets", [[0, 299], [1, 300], [0, 200, 100, 300], [0]])
def test_segments_must_cover_the_rows_in_order(offsets: list[int]) -> None:
    x, edges = _case(0, 300, 2)
    with pytest.raises(ValueError, match="offsets"):
        at_least_counts(torch.as_tensor(x, device=DEVICE), edges, offsets)


def test_segments_longer_than_one_program_are_summed_across_programs(test_seed: int) -> None:
    """Rows past one program's share (ROWS_PER_PROGRAM) are counted by the next programs, whose
    partial counts add up; a segment ending inside a program's share stops there."""
    from kernels.bin_counts import ROWS_PER_PROGRAM

    n = 2 * ROWS_PER_PROGRAM + 77
    x, edges = _case(test_seed, n, 3)
    offsets = [0, ROWS_PER_PROGRAM + 5, n]
    got = at_least_counts(torch.as_tensor(x, device=DEVICE), edges, offsets)
    for s, (a, b) in enumerate(itertools.pairwise(offsets)):
        np.testing.assert_array_equal(got[s], at_least_counts_reference(x[a:b], edges))


@pytest.mark.parametrize(
    "tile",
    [
        {"col_block": 8},
        {"col_block": 16, "sub_rows": 4, "rows_per_program": 64},
        {"sub_rows": 16, "num_warps": 2},
    ],
)
def test_other_tiles_count_the_same(test_seed: int, tile: dict[str, int]) -> None:
    """Column blocks (a third grid axis) and other tile sizes, as the benchmark sweeps them."""
    x, edges = _case(test_seed, 300, 33)
    got = at_least_counts(torch.as_tensor(x, device=DEVICE), edges, [0, 100, 300], tile)
    np.testing.assert_array_equal(got[0], at_least_counts_reference(x[:100], edges))
    np.testing.assert_array_equal(got[1], at_least_counts_reference(x[100:], edges))
