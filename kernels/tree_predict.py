"""Tree-ensemble inference kernel (Triton): a binary:logistic XGBoost forest scored on the GPU
without XGBoost's predictor.

Measured, not used by scoring: on an H100 (2026-11-23, 20M rows x 33 features, 200 trees of
depth 8; bench/bench_tree_predict.py, bench/results/*_bench_tree_predict_20M.json) its best
tile scores 136M rows/s against 212M for XGBoost's own `inplace_predict`, 0.64x, with results
within 1.8e-7. In the scoring worker pipeline it made no difference either (39.4M rows/s against
37.4-41.6M). Batch scoring therefore keeps XGBoost's predictor; the kernel stays as a tested
starting point (a layout that keeps each tree's nodes in shared memory is the next thing to try).

The forest is packed as complete binary trees of one depth D (`CompleteForest`): node i's
children are 2i+1 and 2i+2, so a row's walk down a tree is D gathers and no pointer chasing, and
a leaf shallower than D becomes a subtree whose leaves all hold its value. Each program takes
BLOCK rows, loops over the trees at run time and unrolls the D levels (D is a compile-time
constant): per level it gathers the node's split record (one 8-byte load: threshold bits and
feature id with the default direction, `DeviceForest.nodes`), then the row's value of that
feature from the row-major matrix, which stays in L1/L2 across the trees.

Semantics are XGBoost's and those of `kernels.reference.tree_predict_reference`, the oracle for
the tests: go left when x < threshold (float32), a NaN follows the node's default direction,
+-inf compare as numbers; leaf values summed in float32 in tree order from 0.0, then the base
margin, then 1 / (1 + exp(-margin)).

Like `kernels.fused_preprocess`, nothing from torch or triton is imported until first use, and
the kernel is jit-decorated then, so `TRITON_INTERPRET=1` set after this import still counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from kernels.fused_preprocess import _interpret, _to_torch, is_available, launch_rows

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_DEPTH",
    "CompleteForest",
    "DeviceForest",
    "forest_to_device",
    "is_available",
    "pack_complete_forest",
    "packed_nodes",
    "tree_predict",
]

tl: Any = None  # bound to triton.language by _build_kernels, as in kernels.fused_preprocess

# Deepest forest packed: a complete tree of depth 12 is 4095 split records (32 KiB) and 4096
# leaves per tree, already mostly pass-through nodes for XGBoost's usual depths. Deeper models
# keep XGBoost's predictor.
MAX_DEPTH = 12

# (BLOCK rows, num_warps) tried by the autotuner on a GPU. The walk is a chain of dependent
# gathers, so latency is hidden by many resident warps (one or two rows per thread keep the
# registers per thread low) rather than by wide tiles; a block's rows (BLOCK * n_features * 4
# bytes, 16 KiB for 128 rows of 32 features) should stay cache-resident across all the trees.
AUTOTUNE_CONFIGS: tuple[tuple[int, int], ...] = (
    (64, 2),
    (128, 2),
    (128, 4),
    (256, 4),
    (256, 8),
    (512, 8),
)
# One row per thread: the interpreter's tile, and a GPU's for small batches, where a tuning pass
# per size bucket would not pay off.
FIXED_CONFIG: tuple[int, int] = (128, 4)
AUTOTUNE_MIN_ROWS = 1 << 20
AUTOTUNE_CACHE_RESULTS = True  # the tuner's choice kept in Triton's on-disk cache

_KERNELS: dict[str, Any] = {}


@dataclass(frozen=True)
class CompleteForest:
    """A forest as complete binary trees of one depth, on the host.

    Tree t's internal node i (breadth-first, children 2i+1 and 2i+2) sends x to the left child
    when x[feature[t, i]] < threshold[t, i], a NaN to the left when default_left[t, i] != 0;
    leaf[t, j] is the value of the j-th node of depth `depth`, left to right. Pass-through nodes
    (below a leaf shallower than `depth`) have feature 0, threshold 0 and leaves that all hold
    that leaf's value.
    """

    feature: npt.NDArray[np.int32]  # [T, 2**depth - 1]
    threshold: npt.NDArray[np.float32]  # [T, 2**depth - 1]
    default_left: npt.NDArray[np.int8]  # [T, 2**depth - 1], 1 = a NaN goes left
    leaf: npt.NDArray[np.float32]  # [T, 2**depth]
    depth: int
    base_margin: float  # added to the leaves' sum before the sigmoid
    n_features: int

    @property
    def n_trees(self) -> int:
        return int(self.leaf.shape[0])

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"CompleteForest.depth {self.depth} is outside 1..{MAX_DEPTH}")
        if self.n_trees < 1 or self.n_features < 1:
            raise ValueError("CompleteForest needs at least one tree and one feature")
        internal = (self.n_trees, (1 << self.depth) - 1)
        want = {
            "feature": (np.int32, internal),
            "threshold": (np.float32, internal),
            "default_left": (np.int8, internal),
            "leaf": (np.float32, (self.n_trees, 1 << self.depth)),
        }
        for name, (dtype, shape) in want.items():
            a = getattr(self, name)
            if a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
                raise ValueError(
                    f"CompleteForest.{name} must be C-contiguous {np.dtype(dtype)} {shape}, "
                    f"got {a.dtype} {a.shape}"
                )
        # the kernel gathers x[row, feature] unchecked: an id past the matrix reads other memory
        if self.feature.min() < 0 or self.feature.max() >= self.n_features:
            raise ValueError(f"CompleteForest.feature has ids outside [0, {self.n_features})")


@dataclass(frozen=True)
class DeviceForest:
    """A `CompleteForest` as torch tensors on one device, made once by `forest_to_device`.

    nodes[t, i] packs internal node i's split in one int64 so a level is one load: the low 32
    bits are the float32 threshold's bits, the high 32 bits feature * 2 + default_left.
    """

    nodes: torch.Tensor  # int64 [T, 2**depth - 1]
    leaf: torch.Tensor  # float32 [T, 2**depth]
    depth: int
    base_margin: float
    n_features: int

    @property
    def n_trees(self) -> int:
        return int(self.leaf.shape[0])

    @property
    def device(self) -> torch.device:
        return self.leaf.device


# --- packing -------------------------------------------------------------------------------------


def _node_index(
    tree_ids: npt.NDArray[np.int64], node_ids: npt.NDArray[np.int64], n_trees: int
) -> npt.NDArray[np.int64]:
    """[T, max node id + 1] table: (tree, node id) -> position in the flat arrays, -1 where none."""
    index = np.full((n_trees, int(node_ids.max()) + 1), -1, np.int64)
    index[tree_ids, node_ids] = np.arange(tree_ids.size)
    return index


def _children(
    index: npt.NDArray[np.int64],
    trees: npt.NDArray[np.int64],
    child_ids: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """Flat positions of the given children; raises on a child id its tree does not hold."""
    ok = (child_ids >= 0) & (child_ids < index.shape[1])
    found = np.where(ok, index[trees, np.where(ok, child_ids, 0)], -1)
    if (found < 0).any():
        bad = int(np.flatnonzero(found < 0)[0])
        raise ValueError(f"tree {int(trees[bad])} points to a missing node {int(child_ids[bad])}")
    return found


def _walk(
    index: npt.NDArray[np.int64],
    is_leaf: npt.NDArray[np.bool_],
    left: npt.NDArray[np.int64],
    right: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Every node reachable from the roots: (flat position, depth, breadth-first position in a
    complete tree), level by level over all trees at once. Positions are only meaningful up to
    depth MAX_DEPTH (they overflow int64 past depth 62); deeper forests are refused anyway."""
    n_trees = index.shape[0]
    trees = np.arange(n_trees)
    flat = index[:, 0]
    if (flat < 0).any():
        raise ValueError(f"tree {int(np.flatnonzero(flat < 0)[0])} has no root (node 0)")
    pos = np.zeros(n_trees, np.int64)
    out_flat, out_depth, out_pos = [], [], []
    depth = 0
    seen = np.zeros(is_leaf.size, bool)
    while flat.size:
        if seen[flat].any() or np.unique(flat).size < flat.size:
            raise ValueError("the trees' child links revisit a node (a cycle or a shared child)")
        seen[flat] = True
        out_flat.append(flat)
        out_depth.append(np.full(flat.size, depth, np.int64))
        out_pos.append(pos)
        split = ~is_leaf[flat]
        trees, flat, pos = trees[split], flat[split], pos[split]
        trees = np.concatenate([trees, trees])
        flat = _children(index, trees, np.concatenate([left[flat], right[flat]]))
        pos = np.concatenate([2 * pos + 1, 2 * pos + 2])
        depth += 1
    return np.concatenate(out_flat), np.concatenate(out_depth), np.concatenate(out_pos)


def pack_complete_forest(
    tree_ids: npt.ArrayLike,
    node_ids: npt.ArrayLike,
    is_leaf: npt.ArrayLike,
    feature_ids: npt.ArrayLike,
    thresholds: npt.ArrayLike,
    left: npt.ArrayLike,
    right: npt.ArrayLike,
    default_left: npt.ArrayLike,
    *,
    base_margin: float,
    n_features: int,
) -> CompleteForest:
    """Pack flat per-node arrays (the layout of `tasks.xgboost_onnx.TreeNodes`) into complete
    trees of the forest's depth (at least 1, so a tree that is one leaf has one pass-through
    split).

    Args:
        tree_ids: tree of each node, trees numbered 0..T-1, every one with a node 0 (its root).
        node_ids: id of each node within its tree; left/right refer to these ids.
        is_leaf: True on leaves; their `thresholds` entry is the leaf value.
        feature_ids, thresholds, default_left: the split of each internal node.
        base_margin: margin added to the leaves' sum. n_features: columns of the input.

    Raises:
        ValueError: an empty forest, a depth above MAX_DEPTH, a feature id outside
            [0, n_features), or children that do not exist.
    """
    tree = np.asarray(tree_ids, np.int64).reshape(-1)
    columns = [
        np.asarray(a).reshape(-1)
        for a in (node_ids, is_leaf, feature_ids, thresholds, left, right, default_left)
    ]
    if any(c.size != tree.size for c in columns):
        raise ValueError("the per-node arrays differ in length")
    if not tree.size:
        raise ValueError("the forest has no trees")
    node = columns[0].astype(np.int64)
    leaf = columns[1].astype(bool)
    feature = columns[2].astype(np.int64)
    value = columns[3].astype(np.float32)
    lchild, rchild = columns[4].astype(np.int64), columns[5].astype(np.int64)
    dleft = columns[6].astype(bool)
    if tree.min() < 0 or node.min() < 0:
        raise ValueError("tree and node ids must be non-negative")
    if n_features < 1:
        raise ValueError(f"n_features must be at least 1, got {n_features}")
    split_features = feature[~leaf]
    if split_features.size and (split_features.min() < 0 or split_features.max() >= n_features):
        raise ValueError(f"a split uses a feature outside [0, {n_features})")

    n_trees = int(tree.max()) + 1
    flat, depth_of, pos = _walk(_node_index(tree, node, n_trees), leaf, lchild, rchild)
    depth = max(1, int(depth_of.max()))
    if depth > MAX_DEPTH:
        raise ValueError(f"forest depth {depth} exceeds the kernel's MAX_DEPTH {MAX_DEPTH}")

    n_internal = (1 << depth) - 1
    out_feature = np.zeros((n_trees, n_internal), np.int32)
    out_threshold = np.zeros((n_trees, n_internal), np.float32)
    out_default = np.ones((n_trees, n_internal), np.int8)
    out_leaf = np.zeros((n_trees, 1 << depth), np.float32)
    trees = tree[flat]
    splits = ~leaf[flat]
    at = (trees[splits], pos[splits])
    out_feature[at] = feature[flat[splits]]
    out_threshold[at] = value[flat[splits]]
    out_default[at] = dleft[flat[splits]]
    for d in np.unique(depth_of[~splits]).tolist():
        # a leaf at depth d covers the 2**(D-d) depth-D positions below it: the first is
        # 2**(D-d) * (pos + 1) - 1, minus the 2**D - 1 internal positions before the leaves
        these = ~splits & (depth_of == d)
        span = 1 << (depth - d)
        first = span * (pos[these] + 1) - (1 << depth)
        cols = first[:, None] + np.arange(span)[None, :]
        out_leaf[trees[these][:, None], cols] = value[flat[these]][:, None]
    return CompleteForest(
        feature=out_feature,
        threshold=out_threshold,
        default_left=out_default,
        leaf=out_leaf,
        depth=depth,
        base_margin=float(base_margin),
        n_features=int(n_features),
    )


def packed_nodes(forest: CompleteForest) -> npt.NDArray[np.int64]:
    """The int64 split records of `DeviceForest.nodes`, built on the host."""
    bits = forest.threshold.view(np.uint32).astype(np.int64)
    high = forest.feature.astype(np.int64) * 2 + (forest.default_left != 0)
    return np.ascontiguousarray((high << 32) | bits)


def forest_to_device(forest: CompleteForest, device: Any) -> DeviceForest:
    """Copy the packed forest to `device` (a torch device or its name) once, for many calls of
    `tree_predict`."""
    import torch

    dev = torch.device(device)
    return DeviceForest(
        nodes=torch.from_numpy(packed_nodes(forest)).to(dev),
        leaf=torch.from_numpy(forest.leaf.copy()).to(dev),
        depth=forest.depth,
        base_margin=forest.base_margin,
        n_features=forest.n_features,
    )


# --- the kernel ----------------------------------------------------------------------------------


def _tree_predict_kernel(
    x_ptr,
    nodes_ptr,
    leaf_ptr,
    out_ptr,
    n,
    n_trees,
    stride_row,
    stride_col,
    base_margin,
    n_features,
    n_bucket,
    layout,
    DEPTH: tl.constexpr,
    BLOCK: tl.constexpr,
    IDX64: tl.constexpr,
):
    # n_features, n_bucket and layout are unused in the body: they are autotune keys only (the
    # best tile of a row-major matrix need not be that of a feature-major one).
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    if IDX64:
        rows = rows.to(tl.int64)
    row_ok = rows < n
    x_rows = x_ptr + rows * stride_row
    n_internal = (1 << DEPTH) - 1
    acc = tl.full([BLOCK], 0.0, tl.float32)
    tree_nodes = nodes_ptr
    tree_leaves = leaf_ptr - n_internal  # indexed by the depth-DEPTH node's position
    # A while loop, not `range(n_trees)`: triton 3.6's interpreter turns a scalar argument into
    # a loop bound through a 1-element array, which NumPy >= 2.4 refuses (triton-lang/triton
    # issue 9171). Compiled, it is the same runtime loop over the trees.
    trees_left = n_trees
    while trees_left > 0:
        node = tl.full([BLOCK], 0, tl.int32)
        for _ in tl.static_range(DEPTH):
            # Every lane's node index is in range (tail rows too), so these loads need no mask.
            record = tl.load(tree_nodes + node)
            threshold = record.to(tl.int32).to(tl.float32, bitcast=True)
            split = (record >> 32).to(tl.int32)
            x = tl.load(x_rows + (split >> 1) * stride_col, mask=row_ok, other=0.0)
            x = x.to(tl.float32)
            go_left = (x < threshold) | ((x != x) & ((split & 1) != 0))
            node = 2 * node + 2 - go_left.to(tl.int32)
        acc += tl.load(tree_leaves + node)
        tree_nodes += n_internal
        tree_leaves += n_internal + 1
        trees_left -= 1
    margin = acc + base_margin
    prob = 1.0 / (1.0 + tl.exp(-margin))
    tl.store(out_ptr + rows, prob, mask=row_ok)


def _build_kernels(interpret: bool) -> dict[str, Any]:
    """jit (and, on a GPU, autotune) the kernel for the current mode; cached per mode."""
    mode = "interpret" if interpret else "compiled"
    if mode in _KERNELS:
        return _KERNELS[mode]
    global tl
    import triton
    import triton.language as language

    tl = language
    jitted = triton.jit(
        _tree_predict_kernel,
        do_not_specialize=["n", "n_trees", "n_features", "n_bucket", "layout"],
    )
    kernels: dict[str, Any] = {"plain": jitted}
    if not interpret:
        kernels["tuned"] = triton.autotune(
            configs=[
                triton.Config({"BLOCK": b}, num_warps=w, num_stages=1) for b, w in AUTOTUNE_CONFIGS
            ],
            key=["n_features", "DEPTH", "IDX64", "n_bucket", "layout"],
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
    return {"BLOCK": cfg.kwargs.get("BLOCK"), "num_warps": cfg.num_warps}


def _input_matrix(x: Any, forest: DeviceForest) -> torch.Tensor:
    """x as a 2-D float32/float16 tensor on the forest's device (other dtypes become float32,
    as XGBoost reads them)."""
    import torch

    t = _to_torch(x)
    if t.ndim != 2 or int(t.shape[1]) != forest.n_features:
        raise ValueError(f"x must be (n, {forest.n_features}), got {tuple(t.shape)}")
    if t.device != forest.device:
        raise ValueError(f"x is on {t.device} but the forest on {forest.device}")
    if t.dtype not in (torch.float32, torch.float16):
        t = t.to(torch.float32)
    return t


def tree_predict(
    x: Any,
    forest: DeviceForest,
    out: torch.Tensor | None = None,
    *,
    block: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """P(class 1) of each row of x under the forest; same semantics as `tree_predict_reference`.

    Args:
        x: (n, n_features) float32 or float16 matrix (others are converted to float32) on the
            forest's device: a torch CUDA tensor, CuPy array or anything with
            __cuda_array_interface__ / DLPack; CPU torch tensors under TRITON_INTERPRET=1.
            Any strides. Row-major keeps each row's features in one cache line; feature-major
            (x.T contiguous) makes the lanes of a warp that split on the same feature read one
            cache line (`bench/bench_tree_predict.py` times both).
        forest: from `forest_to_device`.
        out: optional float32 (n,) destination on the same device; returned when given.
        block, num_warps: fix the tile instead of autotuning (experiments).

    Returns:
        float32 (n,) torch tensor of probabilities on the forest's device.
    """
    import torch

    if not isinstance(forest, DeviceForest):
        raise TypeError(f"forest must be a DeviceForest (forest_to_device), got {type(forest)}")
    interpret = _interpret()
    if forest.device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"tree_predict needs a forest on a CUDA device (got {forest.device}); set "
            "TRITON_INTERPRET=1 to run triton's interpreter on CPU tensors"
        )
    mat = _input_matrix(x, forest)
    n = int(mat.shape[0])
    device = forest.device
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=device)
    elif tuple(out.shape) != (n,) or out.dtype != torch.float32 or out.device != device:
        raise ValueError(
            f"out must be ({n},) float32 on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    elif n > 1 and out.stride(0) != 1:
        raise ValueError("out must be contiguous")
    if n == 0:
        return out

    stride_row, stride_col = int(mat.stride(0)), int(mat.stride(1))
    max_off = n * abs(stride_row) + forest.n_features * abs(stride_col)
    idx64 = max_off >= 2**31 - 1
    args = (
        mat,
        forest.nodes,
        forest.leaf,
        out,
        n,
        forest.n_trees,
        stride_row,
        stride_col,
        float(np.float32(forest.base_margin)),
        forest.n_features,
        n.bit_length(),
        int(stride_col != 1),  # 0: each row's features adjacent; 1: e.g. feature-major
    )
    meta = {"DEPTH": forest.depth, "IDX64": idx64}
    kernels = _build_kernels(interpret)
    tune = not interpret and n >= AUTOTUNE_MIN_ROWS
    launch_rows(kernels, n, args, meta, device, "BLOCK", FIXED_CONFIG, (block, num_warps), tune)
    return out
