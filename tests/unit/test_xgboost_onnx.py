"""The XGBoost -> ONNX converter against XGBoost's own predictions (ONNX Runtime, CPU)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tasks.xgboost_onnx import _reachable, base_margin, tree_nodes, xgboost_to_onnx
from tests.xgboost_probes import threshold_probes

N_FEATURES = 6


def train(objective: str = "binary:logistic", seed: int = 0, **params: Any) -> Any:
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4000, N_FEATURES)).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = np.nan  # missing values take each node's default branch
    signal = np.nan_to_num(x[:, 0]) + 0.5 * np.nan_to_num(x[:, 1]) * np.isnan(x[:, 2])
    y = (signal + 0.3 * rng.normal(size=len(x)) > 0.2).astype(np.float32)
    if objective == "multi:softprob":
        y = (y + (x[:, 3] > 0)).astype(np.float32)
        params["num_class"] = 3
    dtrain = xgb.DMatrix(x, label=y)
    params = {"objective": objective, "max_depth": 5, "tree_method": "hist", **params}
    return xgb.train(params, dtrain, num_boost_round=30)


def onnx_probs(booster: Any, x: np.ndarray) -> np.ndarray:
    import onnx
    import onnxruntime as ort

    model = xgboost_to_onnx(booster, N_FEATURES, "features", "probability")
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"features": x})
    assert out.shape == (len(x), 1) and out.dtype == np.float32
    return out[:, 0]


@pytest.mark.parametrize("seed", [0, 1])
def test_onnx_equals_xgboost_on_random_and_missing_values(seed: int) -> None:
    import xgboost as xgb

    booster = train(seed=seed, base_score=0.3 if seed else None)
    rng = np.random.default_rng(seed + 10)
    x = rng.normal(size=(3000, N_FEATURES)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[:20] = np.nan  # whole rows missing
    x[20:40, 1] = 3e38  # XGBoost refuses inf; the largest floats take the same branches
    x[40:60, 0] = -3e38
    want = booster.predict(xgb.DMatrix(x))
    np.testing.assert_allclose(onnx_probs(booster, x), want, rtol=0, atol=1e-6)


def test_a_value_equal_to_the_threshold_goes_right_as_in_xgboost() -> None:
    """XGBoost goes left only when x < threshold; inputs placed exactly on every split point
    (and one float step either side) must land in the same leaves."""
    import xgboost as xgb

    booster = train()
    x = threshold_probes(booster, 5, N_FEATURES)
    assert len(x) > 100
    np.testing.assert_allclose(
        onnx_probs(booster, x), booster.predict(xgb.DMatrix(x)), rtol=0, atol=1e-6
    )


def test_only_binary_logistic_gbtree_converts() -> None:
    multi = train("multi:softprob")
    with pytest.raises(ValueError, match="multi:softprob"):
        xgboost_to_onnx(multi, N_FEATURES, "features", "probability")
    dart = train(booster="dart", rate_drop=0.1)
    with pytest.raises(ValueError, match="dart"):
        xgboost_to_onnx(dart, N_FEATURES, "features", "probability")
    with pytest.raises(ValueError, match="feature"):
        xgboost_to_onnx(train(), 2, "features", "probability")  # splits on features >= 2


@pytest.mark.parametrize(("stored", "p"), [("[3E-1]", 0.3), ("5E-1", 0.5), ("[2.5E-2]", 0.025)])
def test_base_margin_is_the_logit_of_base_score(stored: str, p: float) -> None:
    model = {"learner": {"learner_model_param": {"base_score": stored}}}
    assert base_margin(model) == pytest.approx(np.log(p / (1 - p)), abs=1e-12)
    with pytest.raises(ValueError, match="probability"):
        base_margin({"learner": {"learner_model_param": {"base_score": "[1E0]"}}})


def test_nodes_unreachable_from_the_root_are_left_out() -> None:
    # root 0 -> (1, 2); node 3 is a deleted remnant that no node points to
    left = np.array([1, -1, -1, 4])
    right = np.array([2, -1, -1, 5])
    assert _reachable(left, right).tolist() == [True, True, True, False]
    tree = {
        "left_children": left.tolist(),
        "right_children": right.tolist(),
        "split_indices": [0, 0, 0, 99],
        "split_conditions": [0.5, -1.0, 2.0, 0.0],
        "default_left": [1, 0, 0, 0],
        "split_type": [0, 0, 0, 0],
    }
    nodes = tree_nodes([tree], n_features=1)  # feature 99 of the remnant is never checked
    assert nodes.node_ids.tolist() == [0, 1, 2]
    assert nodes.is_leaf.tolist() == [False, True, True]
    assert nodes.thresholds.tolist() == [0.5, -1.0, 2.0]
    assert nodes.default_left.tolist() == [True, False, False]
