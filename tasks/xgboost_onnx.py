"""A binary XGBoost booster as an ONNX `TreeEnsembleRegressor` that outputs P(class 1).

Read from the booster's own JSON model with NumPy (no text dump, no per-node Python objects):
200 trees of depth 8 convert in 0.08 s on a 2-core CPU. onnxmltools' converter took 1.1 s for
them on the H100 machine, a quarter of the GPU training stage
(bench/results/2026-11-23_h100_profile_train_stage_xgboost.json). The graph: the trees' leaf
values summed onto the base margin, then a Sigmoid, with XGBoost's split rule (go left when
x < threshold; a missing value follows each node's default direction).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from kernels.tree_predict import CompleteForest

ML_DOMAIN = "ai.onnx.ml"
ML_OPSET = 3
ONNX_OPSET = 15
LEAF = -1  # XGBoost's child index of a leaf


@dataclass(frozen=True)
class TreeNodes:
    """Every reachable node of every tree, flat and in tree order (ONNX TreeEnsemble layout)."""

    tree_ids: npt.NDArray[np.int64]
    node_ids: npt.NDArray[np.int64]
    is_leaf: npt.NDArray[np.bool_]
    feature_ids: npt.NDArray[np.int64]
    thresholds: npt.NDArray[np.float32]  # split condition; the leaf value on leaves
    left: npt.NDArray[np.int64]
    right: npt.NDArray[np.int64]
    default_left: npt.NDArray[np.bool_]


def base_margin(model: Mapping[str, Any]) -> float:
    """The logistic objective's starting margin: logit of the stored base_score."""
    raw = str(model["learner"]["learner_model_param"]["base_score"]).strip("[]")
    values = [float(v) for v in raw.split(",")]
    if len(values) != 1:
        raise ValueError(f"expected one base_score for a binary model, got {values}")
    p = values[0]
    if not 0.0 < p < 1.0:
        raise ValueError(f"base_score {p} is not a probability in (0, 1)")
    return math.log(p / (1.0 - p))


def check_binary_gbtree(model: Mapping[str, Any]) -> None:
    """Only what gpupipe trains converts: gbtree, binary:logistic, one target, numeric splits."""
    learner = model["learner"]
    objective = learner["objective"]["name"]
    if objective != "binary:logistic":
        raise ValueError(f"XGBoost objective {objective!r}: only binary:logistic converts")
    booster = learner["gradient_booster"]["name"]
    if booster != "gbtree":
        raise ValueError(f"XGBoost booster {booster!r}: only gbtree converts")
    targets = int(learner["learner_model_param"].get("num_target", "1"))
    if targets != 1:
        raise ValueError(f"XGBoost model with {targets} targets: only one converts")


def _reachable(left: npt.NDArray[np.int64], right: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Nodes reachable from the root (node 0); a pruned tree may keep deleted nodes."""
    seen = np.zeros(len(left), dtype=bool)
    frontier = np.array([0])
    while frontier.size:
        seen[frontier] = True
        children = np.concatenate([left[frontier], right[frontier]])
        frontier = children[(children != LEAF) & ~seen[np.maximum(children, 0)]]
    return seen


def tree_nodes(trees: Sequence[Mapping[str, Any]], n_features: int) -> TreeNodes:
    """Flatten the JSON trees; raises on categorical splits or out-of-range features."""
    parts: list[tuple[npt.NDArray[Any], ...]] = []
    for t, tree in enumerate(trees):
        left = np.asarray(tree["left_children"], np.int64)
        right = np.asarray(tree["right_children"], np.int64)
        if any(int(s) != 0 for s in tree.get("split_type", [])):
            raise ValueError(f"tree {t} has categorical splits; only numeric splits convert")
        keep = _reachable(left, right)
        ids = np.flatnonzero(keep)
        leaf = left[ids] == LEAF
        features = np.where(leaf, 0, np.asarray(tree["split_indices"], np.int64)[ids])
        if features.size and features.max() >= n_features:
            raise ValueError(
                f"tree {t} splits on feature {int(features.max())}; the model has {n_features}"
            )
        parts.append(
            (
                np.full(ids.size, t, np.int64),
                ids,
                leaf,
                features,
                np.asarray(tree["split_conditions"], np.float32)[ids],
                np.where(leaf, 0, left[ids]),
                np.where(leaf, 0, right[ids]),
                np.asarray(tree["default_left"], np.int64)[ids].astype(bool),
            )
        )
    if not parts:
        raise ValueError("the XGBoost model has no trees")
    columns = [np.concatenate(c) for c in zip(*parts, strict=True)]
    return TreeNodes(*columns)


def tree_ensemble_model(
    nodes: TreeNodes, margin: float, n_features: int, input_name: str, output_name: str
) -> Any:
    """ONNX model: float input [batch, n_features] -> P(class 1) as float [batch, 1]."""
    from onnx import TensorProto, helper

    branch = ~nodes.is_leaf
    leaves = nodes.is_leaf
    trees = helper.make_node(
        "TreeEnsembleRegressor",
        [input_name],
        ["margin"],
        domain=ML_DOMAIN,
        n_targets=1,
        aggregate_function="SUM",
        base_values=[margin],
        post_transform="NONE",  # ONNX Runtime skips LOGISTIC on a regressor: Sigmoid below
        nodes_treeids=nodes.tree_ids.tolist(),
        nodes_nodeids=nodes.node_ids.tolist(),
        nodes_featureids=nodes.feature_ids.tolist(),
        nodes_modes=["BRANCH_LT" if b else "LEAF" for b in branch.tolist()],
        # leaves carry their value in target_weights; a branch's threshold is its split
        nodes_values=np.where(branch, nodes.thresholds, 0).astype(np.float32).tolist(),
        nodes_truenodeids=nodes.left.tolist(),
        nodes_falsenodeids=nodes.right.tolist(),
        nodes_missing_value_tracks_true=(nodes.default_left & branch).astype(np.int64).tolist(),
        target_treeids=nodes.tree_ids[leaves].tolist(),
        target_nodeids=nodes.node_ids[leaves].tolist(),
        target_ids=[0] * int(leaves.sum()),
        target_weights=nodes.thresholds[leaves].tolist(),
    )
    sigmoid = helper.make_node("Sigmoid", ["margin"], [output_name])
    graph = helper.make_graph(
        [trees, sigmoid],
        "xgboost_binary",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [None, 1])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", ONNX_OPSET),
            helper.make_opsetid(ML_DOMAIN, ML_OPSET),
        ],
        producer_name="gpupipe",
    )
    model.ir_version = 8  # what ONNX Runtime releases of the last years all load
    return model


def binary_forest(booster: Any, n_features: int) -> tuple[TreeNodes, float]:
    """A binary:logistic booster's reachable nodes (all its trees) and base margin, read from
    its JSON model; raises ValueError on anything `check_binary_gbtree` or `tree_nodes` refuse."""
    model = json.loads(bytes(booster.save_raw(raw_format="json")))
    check_binary_gbtree(model)
    nodes = tree_nodes(model["learner"]["gradient_booster"]["model"]["trees"], n_features)
    return nodes, base_margin(model)


def xgboost_to_onnx(booster: Any, n_features: int, input_name: str, output_name: str) -> Any:
    """Convert a binary:logistic booster (all its trees) to an ONNX model."""
    nodes, margin = binary_forest(booster, n_features)
    return tree_ensemble_model(nodes, margin, n_features, input_name, output_name)


def complete_forest(booster: Any, n_features: int) -> CompleteForest:
    """A binary:logistic booster (all its trees) packed for `kernels.tree_predict`: complete
    trees of the forest's depth, the base margin and the feature count.

    Raises:
        ValueError: what the ONNX conversion refuses (another objective or booster, several
            targets, categorical splits, features past n_features), and forests deeper than
            `kernels.tree_predict.MAX_DEPTH`: XGBoost's predictor scores those.
    """
    from kernels.tree_predict import pack_complete_forest

    nodes, margin = binary_forest(booster, n_features)
    return pack_complete_forest(
        nodes.tree_ids,
        nodes.node_ids,
        nodes.is_leaf,
        nodes.feature_ids,
        nodes.thresholds,
        nodes.left,
        nodes.right,
        nodes.default_left,
        base_margin=margin,
        n_features=n_features,
    )
