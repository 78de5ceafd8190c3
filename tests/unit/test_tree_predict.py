"""The tree-ensemble kernel (Triton), its NumPy reference and the complete-tree packing, against
XGBoost's own predictions.

The reference and the packing run on any machine. Without a CUDA device the kernel runs in
triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set below before the kernel module is
imported), on small forests; the `gpu` tests run the compiled kernel at production size. Seeds:
a fixed base, overridable with GPUPIPE_TEST_SEED, plus a per-case offset; every case prints its
seed and puts it in its failure messages.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib
from functools import cache
from typing import Any

import numpy as np
import pytest

xgb = pytest.importorskip("xgboost")

HAVE_KERNEL_DEPS = all(importlib.util.find_spec(m) is not None for m in ("torch", "triton"))
if HAVE_KERNEL_DEPS:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.reference import tree_predict_reference  # noqa: E402
from kernels.tree_predict import (  # noqa: E402
    MAX_DEPTH,
    CompleteForest,
    best_config,
    forest_to_device,
    pack_complete_forest,
    tree_predict,
)
from tasks.xgboost_onnx import complete_forest  # noqa: E402
from tests.xgboost_probes import threshold_probes  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
BASE_SEED = int(os.environ.get("GPUPIPE_TEST_SEED", "20261123"))
# Probabilities: XGBoost adds the base margin first and rounds its sigmoid differently, so
# agreement with it is to a few float32 ulps; the kernel against the reference is exact in the
# interpreter and a few ulps compiled (approximate exp and division).
ATOL = 1e-6
N_FEATURES = 6

requires_kernel = pytest.mark.skipif(not HAVE_KERNEL_DEPS, reason="needs torch and triton")
requires_cuda = pytest.mark.skipif(
    not (HAVE_KERNEL_DEPS and torch.cuda.is_available()),
    reason="needs a CUDA device (the kernel compiled, not interpreted)",
)


def case_seed(name: str) -> int:
    seed = BASE_SEED + zlib.crc32(name.encode())
    print(f"seed for {name}: {seed} (base {BASE_SEED}, GPUPIPE_TEST_SEED overrides)")
    return seed


def random_matrix(seed: int, n: int, k: int = N_FEATURES) -> np.ndarray:
    """Normal values with NaN (each node's default branch), whole NaN rows, +-inf and the
    largest finite floats sprinkled in."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k)).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = np.nan
    specials = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38], np.float32)
    x[: min(n, 5)] = specials[: min(n, 5), None]
    picks = rng.random(x.shape) < 0.03
    x[picks] = rng.choice(specials, size=int(picks.sum()))
    return x


def train_data(seed: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels that need several features and react to missingness, so trees use NaN branches."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k)).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = np.nan
    z = np.nan_to_num(x)
    signal = z[:, 0] + 0.5 * z[:, 1] * np.isnan(x[:, 2]) + np.sin(3 * z[:, 3]) - z[:, 4] * z[:, 5]
    y = (signal + 0.3 * rng.normal(size=n) > 0.2).astype(np.float32)
    return x, y


@cache
def train(
    max_depth: int = 5,
    rounds: int = 20,
    seed: int = 0,
    objective: str = "binary:logistic",
    n_features: int = N_FEATURES,
    **params: Any,
) -> Any:
    """A real booster trained on small random data (cached per argument set)."""
    x, y = train_data(BASE_SEED % 1000 + seed, 3000, n_features)
    if objective == "multi:softprob":
        y = (y + (np.nan_to_num(x[:, 3]) > 0)).astype(np.float32)
        params["num_class"] = 3
    params = {"objective": objective, "max_depth": max_depth, "tree_method": "hist", **params}
    return xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=rounds)


def model_json(booster: Any) -> dict[str, Any]:
    return json.loads(bytes(booster.save_raw(raw_format="json")))


def leaves_by_tree(booster: Any) -> list[list[tuple[np.float32, int]]]:
    """(value, depth) of every leaf reachable from each tree's root, from the model itself."""
    trees = []
    for tree in model_json(booster)["learner"]["gradient_booster"]["model"]["trees"]:
        left, right = tree["left_children"], tree["right_children"]
        leaves, frontier = [], [(0, 0)]
        while frontier:
            node, d = frontier.pop()
            if left[node] == -1:
                leaves.append((np.float32(tree["split_conditions"][node]), d))
            else:
                frontier += [(left[node], d + 1), (right[node], d + 1)]
        trees.append(leaves)
    return trees


def as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # +-3e38 become +-inf in float16
        return x.astype(dtype)


def hand_forest(leaf_value: float = -0.75) -> CompleteForest:
    """Two trees by hand. Tree 0: root splits feature 1 at 0.5 (NaN right); its left child is a
    leaf (`leaf_value`) at depth 1, its right child splits feature 0 at -2 (NaN left) into
    leaves 0.25 and 1.5. Node ids are not breadth-first (XGBoost's are not either). Tree 1: a
    single leaf, 0.125."""
    return pack_complete_forest(
        tree_ids=[0, 0, 0, 0, 0, 1],
        node_ids=[0, 4, 1, 2, 3, 0],
        is_leaf=[False, False, True, True, True, True],
        feature_ids=[1, 0, 0, 0, 0, 0],
        thresholds=[0.5, -2.0, leaf_value, 0.25, 1.5, 0.125],
        left=[1, 2, 0, 0, 0, 0],
        right=[4, 3, 0, 0, 0, 0],
        default_left=[False, True, False, False, False, False],
        base_margin=0.5,
        n_features=2,
    )


def hand_expected(x: np.ndarray, leaf_value: float = -0.75) -> np.ndarray:
    """`hand_forest`'s probabilities, written out one row at a time in float32 scalars."""
    out = np.empty(len(x), np.float32)
    for r, (x0, x1) in enumerate(x.astype(np.float32)):
        if np.isnan(x1) or not x1 < np.float32(0.5):
            value = np.float32(0.25) if (np.isnan(x0) or x0 < np.float32(-2.0)) else 1.5
        else:
            value = np.float32(leaf_value)
        margin = np.float32(np.float32(value) + np.float32(0.125)) + np.float32(0.5)
        out[r] = np.float32(1) / (np.float32(1) + np.exp(-margin))
    return out


HAND_X = np.array(
    [
        [0.0, 0.5],  # on the root's threshold: right
        [0.0, np.nextafter(np.float32(0.5), np.float32(-1))],  # just below: left
        [-2.0, np.nan],  # root NaN goes right; -2 on the threshold: right
        [np.nextafter(np.float32(-2), np.float32(-3)), 1.0],  # just below -2: left
        [np.nan, np.inf],  # +inf is not below 0.5: right; NaN goes left
        [np.inf, -np.inf],  # -inf is below 0.5: left (x0 unused)
        [-np.inf, 7.0],  # -inf below -2: left
        [np.nan, np.nan],
    ],
    dtype=np.float32,
)


# --- the packing ---------------------------------------------------------------------------------


def test_pack_fills_a_shallow_leafs_subtree_and_keeps_the_splits() -> None:
    f = hand_forest()
    assert (f.depth, f.n_trees, f.n_features, f.base_margin) == (2, 2, 2, 0.5)
    for name in ("feature", "threshold", "default_left", "leaf"):
        assert getattr(f, name).flags.c_contiguous
    # tree 0: root, then the pass-through node under the depth-1 leaf, then the split
    assert f.feature[0].tolist() == [1, 0, 0]
    assert f.threshold[0].tolist() == [0.5, 0.0, -2.0]
    assert f.default_left[0].tolist() == [0, 1, 1]
    assert f.leaf[0].tolist() == [-0.75, -0.75, 0.25, 1.5]
    # tree 1, a single leaf: three pass-through nodes whose four leaves all hold it
    assert f.feature[1].tolist() == [0, 0, 0] and f.default_left[1].tolist() == [1, 1, 1]
    assert f.leaf[1].tolist() == [0.125] * 4


def test_pack_shallow_leaves_of_a_real_model_cover_their_subtrees() -> None:
    booster = train(max_depth=8, rounds=10)
    trees = leaves_by_tree(booster)
    depths = np.array([d for leaves in trees for _, d in leaves])
    forest = complete_forest(booster, N_FEATURES)
    assert forest.depth == depths.max() == 8
    assert (depths < forest.depth).sum() > 10, "no shallow leaves: the case is not exercised"
    # each tree's complete leaves hold exactly its leaf values, a depth-d leaf 2**(8-d) times
    for t, leaves in enumerate(trees):
        want: dict[float, int] = {}
        for value, d in leaves:
            want[float(value)] = want.get(float(value), 0) + 2 ** (8 - d)
        packed, counts = np.unique(forest.leaf[t], return_counts=True)
        assert dict(zip(packed.tolist(), counts.tolist(), strict=True)) == want, f"tree {t}"


def test_pack_refuses_deep_empty_and_malformed_forests() -> None:
    depth = MAX_DEPTH + 1
    # a chain: node 2i is split, its left child 2i+1 a leaf, its right child the next split
    n = 2 * depth + 1
    chain = {
        "tree_ids": np.zeros(n, np.int64),
        "node_ids": np.arange(n),
        "is_leaf": np.arange(n) % 2 == 1,
        "feature_ids": np.zeros(n, np.int64),
        "thresholds": np.zeros(n, np.float32),
        "left": np.where(np.arange(n) % 2 == 0, np.arange(n) + 1, 0),
        "right": np.where(np.arange(n) % 2 == 0, np.arange(n) + 2, 0),
        "default_left": np.zeros(n, bool),
    }
    chain["is_leaf"][-1] = True
    with pytest.raises(ValueError, match=f"depth {depth} exceeds"):
        pack_complete_forest(**chain, base_margin=0.0, n_features=1)
    shorter = {k: v[:-2] for k, v in chain.items()}  # depth 12 packs
    shorter["is_leaf"][-1] = True
    assert pack_complete_forest(**shorter, base_margin=0.0, n_features=1).depth == MAX_DEPTH
    empty = {k: v[:0] for k, v in chain.items()}
    with pytest.raises(ValueError, match="no trees"):
        pack_complete_forest(**empty, base_margin=0.0, n_features=1)
    with pytest.raises(ValueError, match="feature"):
        pack_complete_forest(
            **{**chain, "feature_ids": chain["node_ids"]}, base_margin=0.0, n_features=3
        )
    with pytest.raises(ValueError, match="missing node"):
        pack_complete_forest(
            **{**chain, "right": chain["right"] + 100}, base_margin=0.0, n_features=1
        )
    with pytest.raises(ValueError, match="revisit"):
        pack_complete_forest(**{**chain, "right": chain["left"]}, base_margin=0.0, n_features=1)


def test_complete_forest_refuses_what_the_kernel_cannot_score() -> None:
    with pytest.raises(ValueError, match="multi:softprob"):
        complete_forest(train(objective="multi:softprob", rounds=3), N_FEATURES)
    with pytest.raises(ValueError, match="dart"):
        complete_forest(train(booster="dart", rate_drop=0.1, rounds=3), N_FEATURES)
    with pytest.raises(ValueError, match="feature"):
        complete_forest(train(rounds=3), 2)  # splits on features >= 2
    x = np.random.default_rng(case_seed("deep")).uniform(0, 1, (4000, 1)).astype(np.float32)
    stripes = (np.floor(x[:, 0] * 200) % 2).astype(np.float32)  # 200 stripes: deep trees
    params = {"max_depth": 16, "min_child_weight": 0, "lambda": 0, "max_bin": 1024}
    deep = xgb.train(
        {"objective": "binary:logistic", "tree_method": "hist", **params},
        xgb.DMatrix(x, label=stripes),
        num_boost_round=2,
    )
    with pytest.raises(ValueError, match=r"depth \d+ exceeds the kernel's MAX_DEPTH 12"):
        complete_forest(deep, 1)


def test_complete_forest_refuses_categorical_splits() -> None:
    rng = np.random.default_rng(case_seed("categorical"))
    x = np.column_stack([rng.integers(0, 6, 2000), rng.normal(size=2000)]).astype(np.float32)
    y = np.isin(x[:, 0], [1, 4]).astype(np.float32)
    dtrain = xgb.DMatrix(x, label=y, feature_types=["c", "q"], enable_categorical=True)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "tree_method": "hist"}, dtrain, 3
    )
    with pytest.raises(ValueError, match="categorical"):
        complete_forest(booster, 2)


# --- the reference against XGBoost ---------------------------------------------------------------


@pytest.mark.parametrize(("max_depth", "base_score"), [(1, None), (3, 0.3), (8, None), (8, 0.025)])
def test_reference_equals_xgboost(max_depth: int, base_score: float | None) -> None:
    params = {} if base_score is None else {"base_score": base_score}
    booster = train(max_depth=max_depth, rounds=30, **params)
    forest = complete_forest(booster, N_FEATURES)
    assert forest.depth == max_depth
    seed = case_seed(f"reference-{max_depth}-{base_score}")
    x = random_matrix(seed, 3000)
    got = tree_predict_reference(x, forest)
    assert got.dtype == np.float32 and got.shape == (3000,)
    np.testing.assert_allclose(
        got, booster.inplace_predict(x), rtol=0, atol=ATOL, err_msg=f"seed {seed}"
    )
    finite = np.where(np.isinf(x), np.sign(x) * np.float32(3e38), x)  # DMatrix refuses inf
    np.testing.assert_allclose(
        tree_predict_reference(finite, forest),
        booster.predict(xgb.DMatrix(finite)),
        rtol=0,
        atol=ATOL,
        err_msg=f"seed {seed}",
    )


@pytest.mark.parametrize("max_depth", [3, 8])
def test_reference_on_the_thresholds_equals_xgboost(max_depth: int) -> None:
    """XGBoost goes left only when x < threshold: inputs exactly on every split point and one
    float step either side land in the same leaves."""
    booster = train(max_depth=max_depth, rounds=30)
    seed = case_seed(f"thresholds-{max_depth}")
    x = threshold_probes(booster, seed, N_FEATURES)
    assert len(x) > 100
    got = tree_predict_reference(x, complete_forest(booster, N_FEATURES))
    np.testing.assert_allclose(got, booster.inplace_predict(x), rtol=0, atol=ATOL)
    np.testing.assert_allclose(got, booster.predict(xgb.DMatrix(x)), rtol=0, atol=ATOL)


def test_reference_on_a_hand_built_forest() -> None:
    """Exact values: ties go right, NaN follows each node's default, +-inf compare as numbers,
    the shallow leaf and the single-leaf tree count once each."""
    forest = hand_forest()
    np.testing.assert_array_equal(tree_predict_reference(HAND_X, forest), hand_expected(HAND_X))
    np.testing.assert_array_equal(
        tree_predict_reference(HAND_X.astype(np.float16), forest),
        hand_expected(HAND_X.astype(np.float16)),
    )


# --- the kernel against the reference ------------------------------------------------------------


def run_kernel(x: np.ndarray, forest: CompleteForest, **kwargs: Any) -> np.ndarray:
    got = tree_predict(torch.from_numpy(x).to(DEVICE), forest_to_device(forest, DEVICE), **kwargs)
    assert got.dtype == torch.float32 and got.device.type == DEVICE
    return got.cpu().numpy()


@requires_kernel
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("n", "max_depth"), [(300, 5), (129, 1), (1, 3)])
def test_kernel_matches_reference(n: int, max_depth: int, dtype: str) -> None:
    """Tail rows (n not a multiple of the block), NaN, +-inf, float16 input upcast on load."""
    booster = train(max_depth=max_depth, rounds=20)
    forest = complete_forest(booster, N_FEATURES)
    seed = case_seed(f"kernel-{n}-{max_depth}-{dtype}")
    x = as_dtype(random_matrix(seed, n), dtype)
    got = run_kernel(x, forest)
    np.testing.assert_allclose(
        got, tree_predict_reference(x, forest), rtol=0, atol=ATOL, err_msg=f"seed {seed}"
    )


@requires_kernel
def test_kernel_on_the_thresholds_and_hand_built_forest() -> None:
    booster = train(max_depth=5, rounds=20)
    forest = complete_forest(booster, N_FEATURES)
    x = threshold_probes(booster, case_seed("kernel-thresholds"), N_FEATURES)
    got = run_kernel(x, forest)
    np.testing.assert_allclose(got, tree_predict_reference(x, forest), rtol=0, atol=ATOL)
    np.testing.assert_allclose(got, booster.inplace_predict(x), rtol=0, atol=ATOL)
    got = run_kernel(HAND_X, hand_forest())
    np.testing.assert_allclose(got, hand_expected(HAND_X), rtol=0, atol=ATOL)


@requires_kernel
def test_kernel_strided_inputs_and_out() -> None:
    """A column window of a wider matrix, a feature-major view, and a caller's output."""
    forest = complete_forest(train(max_depth=4, rounds=10), N_FEATURES)
    seed = case_seed("kernel-strided")
    x = random_matrix(seed, 200)
    want = tree_predict_reference(x, forest)
    wide = torch.zeros((200, N_FEATURES + 5), device=DEVICE)
    wide[:, 2 : 2 + N_FEATURES] = torch.from_numpy(x)
    device_forest = forest_to_device(forest, DEVICE)
    window = wide[:, 2 : 2 + N_FEATURES]
    np.testing.assert_allclose(tree_predict(window, device_forest).cpu(), want, 0, ATOL)
    feature_major = torch.from_numpy(x.T.copy()).to(DEVICE).T
    assert feature_major.stride() == (1, 200)
    sentinel = 12345.0
    buf = torch.full((200 + 300,), sentinel, device=DEVICE)
    out = buf[:200]  # the tail block's masked lanes must not write past it
    assert tree_predict(feature_major, device_forest, out=out) is out
    np.testing.assert_allclose(out.cpu(), want, 0, ATOL, err_msg=f"seed {seed}")
    assert (buf[200:] == sentinel).all(), f"write past the output, seed {seed}"


@requires_kernel
def test_kernel_empty_and_bad_arguments() -> None:
    forest = forest_to_device(hand_forest(), DEVICE)
    assert tuple(tree_predict(torch.zeros((0, 2), device=DEVICE), forest).shape) == (0,)
    with pytest.raises(ValueError, match=r"x must be \(n, 2\)"):
        tree_predict(torch.zeros((4, 3), device=DEVICE), forest)
    with pytest.raises(ValueError, match="out must be"):
        tree_predict(torch.zeros((4, 2), device=DEVICE), forest, out=torch.empty(5, device=DEVICE))
    with pytest.raises(TypeError, match="forest_to_device"):
        tree_predict(torch.zeros((4, 2), device=DEVICE), hand_forest())


def test_module_import_is_lazy() -> None:
    """Importing the kernel module pulls in neither torch nor triton (GPU-less hosts, fast CLIs)."""
    code = (
        "import sys, kernels.tree_predict, tasks.xgboost_onnx; "
        "assert not {'torch', 'triton'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- real device, production size ----------------------------------------------------------------

GPU_ROWS = (1 << 20) + 3  # the autotuned launch, and a tail past every block size
GPU_FEATURES = 32


@cache
def production_model() -> tuple[Any, CompleteForest]:
    """200 trees of depth 8 on 32 features (trained on the CPU: any xgboost build will do)."""
    x, y = train_data(BASE_SEED % 1000, 20_000, GPU_FEATURES)
    params = {"objective": "binary:logistic", "max_depth": 8, "tree_method": "hist"}
    booster = xgb.train(params, xgb.DMatrix(x, label=y), 200)
    forest = complete_forest(booster, GPU_FEATURES)
    assert (forest.n_trees, forest.depth) == (200, 8)
    return booster, forest


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_kernel_large_on_gpu_matches_reference(dtype: str) -> None:
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the interpreter is too slow for this size")
    _, forest = production_model()
    seed = case_seed(f"large-{dtype}")
    x = as_dtype(random_matrix(seed, GPU_ROWS, GPU_FEATURES), dtype)
    out = torch.full((GPU_ROWS,), float("nan"), device="cuda")
    got = tree_predict(torch.from_numpy(x).cuda(), forest_to_device(forest, "cuda"), out=out)
    np.testing.assert_allclose(
        got.cpu().numpy(), tree_predict_reference(x, forest), 0, ATOL, err_msg=f"seed {seed}"
    )
    print(f"autotuner's choice: {best_config()}")


@pytest.mark.gpu
@requires_cuda
def test_kernel_large_on_gpu_matches_xgboost_inplace_predict() -> None:
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1")
    cupy = pytest.importorskip("cupy")
    if not xgb.build_info().get("USE_CUDA"):
        pytest.skip("this xgboost was built without CUDA")
    booster, forest = production_model()
    booster = booster.copy()
    booster.set_param({"device": "cuda"})  # else xgboost warns and predicts through a DMatrix
    seed = case_seed("large-xgboost")
    x = cupy.asarray(random_matrix(seed, GPU_ROWS, GPU_FEATURES))
    got = tree_predict(x, forest_to_device(forest, "cuda"))  # a CuPy array in, torch out
    want = cupy.asarray(booster.inplace_predict(x)).reshape(-1)
    np.testing.assert_allclose(
        got.cpu().numpy(), cupy.asnumpy(want), rtol=0, atol=ATOL, err_msg=f"seed {seed}"
    )


@pytest.mark.gpu
@requires_cuda
def test_kernel_accepts_cupy_and_hands_back_by_dlpack() -> None:
    """The scorer's path: a CuPy matrix in, the torch result back to CuPy without a copy."""
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1")
    cupy = pytest.importorskip("cupy")
    forest = complete_forest(train(max_depth=5, rounds=20), N_FEATURES)
    seed = case_seed("cupy")
    x = random_matrix(seed, 4099)
    got = tree_predict(cupy.asarray(x), forest_to_device(forest, "cuda"))
    probs = cupy.from_dlpack(got)
    assert probs.data.ptr == got.data_ptr() and probs.dtype == cupy.float32
    np.testing.assert_allclose(
        cupy.asnumpy(probs), tree_predict_reference(x, forest), 0, ATOL, err_msg=f"seed {seed}"
    )
