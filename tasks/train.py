"""Training: XGBoost (hist, early stopping) and a PyTorch MLP on the transformed features, their
ONNX exports, parity checks between native and ONNX, and test-split metrics."""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from tasks.backend import Backend
from tasks.bundle import BUNDLE_FILE as BUNDLE_FILE  # re-exported with the bundle's layout
from tasks.bundle import TRANSFORM_DIR as TRANSFORM_DIR
from tasks.bundle import read_bundle_json as read_bundle_json
from tasks.config import MLPConfig, ModelConfig, XGBoostConfig
from tasks.etl import EtlOutput
from tasks.gpu_features import to_host

log = logging.getLogger(__name__)

ModelKind = Literal["xgboost", "mlp"]
ONNX_FILE = "model.onnx"
XGB_FILE = "model.ubj"
MLP_WEIGHTS_FILE = "mlp_weights.npz"
ONNX_INPUT = "input__0"
ONNX_OUTPUT = "probability"
PARITY_ROWS = 20_000


@dataclass(frozen=True)
class SplitData:
    """One split: NumPy arrays on CPU, CuPy arrays (device-resident) on GPU."""

    features: Any
    target: Any
    ids: npt.NDArray[Any]


@dataclass
class TrainedModel:
    """One trained model written as a self-contained bundle directory (no pickle)."""

    kind: ModelKind
    bundle_dir: Path
    metrics: dict[str, float]
    params: dict[str, Any]
    parity_max_abs_diff: float
    extra: dict[str, Any] = field(default_factory=dict)


def read_split(
    etl: EtlOutput,
    split: str,
    feature_names: list[str],
    target: str,
    id_col: str,
    backend: Backend | None = None,
) -> SplitData:
    """Load one split's features as a float32 matrix, target and ids.

    On GPU the parquet is read by cuDF and the arrays are CuPy: the data stays on the device.
    """
    if backend is not None and backend.device == "gpu":
        import cudf

        frame = cudf.read_parquet(
            str(etl.features_dir(split)), columns=[*feature_names, target, id_col]
        )
        return SplitData(
            features=frame[feature_names].to_cupy(dtype="float32"),
            target=frame[target].to_cupy(dtype="float32"),
            ids=frame[id_col].to_numpy(),
        )
    frame = pd.read_parquet(etl.features_dir(split))
    return SplitData(
        features=np.ascontiguousarray(frame[feature_names].to_numpy(np.float32)),
        target=frame[target].to_numpy(np.float32),
        ids=frame[id_col].to_numpy(),
    )


def classification_metrics(y: npt.NDArray[Any], p: npt.NDArray[Any]) -> dict[str, float]:
    """ROC AUC, PR AUC (average precision) and log loss; AUCs are NaN on a single-class split."""
    from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    single = len(np.unique(y)) < 2
    return {
        "roc_auc": float("nan") if single else float(roc_auc_score(y, p)),
        "pr_auc": float("nan") if single else float(average_precision_score(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "rows": float(len(y)),
        "positive_rate": float(y.mean()) if len(y) else float("nan"),
    }


def onnx_predict(onnx_path: Path, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Positive-class probability from an exported model with ONNX Runtime on CPU."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(features, np.float32)})[0]
    return np.asarray(out, np.float32).reshape(-1)


def check_parity(native: npt.NDArray[Any], onnx: npt.NDArray[Any], atol: float, what: str) -> float:
    diff = (
        float(np.max(np.abs(np.asarray(native, np.float64) - np.asarray(onnx, np.float64))))
        if len(native)
        else 0.0
    )
    if not diff <= atol:
        raise AssertionError(
            f"{what}: ONNX and native predictions differ by {diff:.3g} > atol {atol:g}"
        )
    return diff


def copy_transform(etl: EtlOutput, bundle_dir: Path) -> None:
    """The transform travels with the model: a bundle is scored with exactly its own features."""
    dest = bundle_dir / TRANSFORM_DIR
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(etl.transform_dir, dest)


def write_bundle_json(bundle_dir: Path, payload: dict[str, Any]) -> None:
    (bundle_dir / BUNDLE_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))


# ---------------------------------------------------------------- XGBoost


def xgboost_params(cfg: XGBoostConfig, backend: Backend, seed: int) -> dict[str, Any]:
    return {
        "objective": "binary:logistic",
        "eval_metric": ["logloss", "aucpr"],
        "tree_method": "hist",
        "device": backend.xgboost_device,
        "max_depth": cfg.max_depth,
        "learning_rate": cfg.learning_rate,
        "subsample": cfg.subsample,
        "colsample_bytree": cfg.colsample_bytree,
        "max_bin": cfg.max_bin,
        "seed": seed,
    }


def fit_xgboost(
    train: SplitData, valid: SplitData, cfg: XGBoostConfig, backend: Backend, seed: int
) -> Any:
    """Train a booster with early stopping on the validation split."""
    import xgboost as xgb

    params = xgboost_params(cfg, backend, seed)
    x_train, x_valid = _to_device(train.features, backend), _to_device(valid.features, backend)
    dtrain = xgb.QuantileDMatrix(x_train, label=train.target, max_bin=cfg.max_bin)
    dvalid = xgb.QuantileDMatrix(x_valid, label=valid.target, ref=dtrain)
    return xgb.train(
        params,
        dtrain,
        num_boost_round=cfg.n_estimators,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=cfg.early_stopping_rounds,
        verbose_eval=False,
    )


def active_dask_client() -> Any | None:
    """The distributed client in scope (a cluster the caller opened), if any."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def fit_xgboost_dask(
    client: Any,
    etl: EtlOutput,
    feature_names: list[str],
    target: str,
    cfg: XGBoostConfig,
    backend: Backend,
    seed: int,
) -> Any:
    """Train across every worker of a dask cluster (one per GPU with dask-cuda) with
    `xgboost.dask`; the data is read by the workers and never gathered on the client."""
    import dask
    import dask.dataframe as dd
    from xgboost import dask as dxgb

    workers = len(client.scheduler_info().get("workers", {}))
    with dask.config.set({"dataframe.backend": backend.dataframe_backend}):
        cols = [*feature_names, target]
        train = dd.read_parquet(str(etl.features_dir("train")), columns=cols)
        valid = dd.read_parquet(str(etl.features_dir("valid")), columns=cols)
    if train.npartitions < workers:
        train = train.repartition(npartitions=workers)
    # left lazy: DaskQuantileDMatrix persists what it needs; an explicit client.persist here
    # lost its futures ("lost dependencies") on a 2-GPU LocalCUDACluster
    dtrain = dxgb.DaskQuantileDMatrix(
        client, train[feature_names], train[target], max_bin=cfg.max_bin
    )
    dvalid = dxgb.DaskQuantileDMatrix(client, valid[feature_names], valid[target], ref=dtrain)
    out = dxgb.train(
        client,
        xgboost_params(cfg, backend, seed),
        dtrain,
        num_boost_round=cfg.n_estimators,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=cfg.early_stopping_rounds,
        verbose_eval=False,
    )
    return out["booster"]


def trim_to_best(booster: Any) -> Any:
    """Keep the trees up to the early-stopping best iteration, so every consumer of the saved
    model (FIL, ONNX, in-process scoring) predicts the same thing."""
    best = getattr(booster, "best_iteration", None)
    if best is None:
        return booster
    trimmed = booster[: best + 1]
    trimmed.set_attr(best_iteration=str(best))
    return trimmed


def xgboost_predict(booster: Any, features: Any) -> npt.NDArray[np.float32]:
    out = booster.inplace_predict(features)
    return to_host(out).astype(np.float32, copy=False)


def export_xgboost_onnx(booster: Any, n_features: int, path: Path) -> None:
    """Convert the booster (trees up to the best iteration) to an ONNX TreeEnsemble model."""
    import onnx
    from onnxmltools.convert import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    booster.feature_names = None
    model = convert_xgboost(
        booster, initial_types=[(ONNX_INPUT, FloatTensorType([None, n_features]))], target_opset=15
    )
    model = _select_positive_class(model)
    onnx.save_model(model, str(path))


def _select_positive_class(model: Any) -> Any:
    """Append a Gather so the graph outputs P(class 1) as `probability` with shape [batch, 1]."""
    from onnx import TensorProto, helper

    graph = model.graph
    probs = next(o.name for o in graph.output if "prob" in o.name)
    idx = helper.make_tensor("positive_class_index", TensorProto.INT64, [1], [1])
    graph.initializer.append(idx)
    graph.node.append(
        helper.make_node("Gather", [probs, "positive_class_index"], [ONNX_OUTPUT], axis=1)
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, [None, 1]))
    return model


def train_xgboost(
    etl: EtlOutput,
    feature_names: list[str],
    target: str,
    id_col: str,
    cfg: ModelConfig,
    backend: Backend,
    out_dir: Path,
    seed: int,
) -> TrainedModel:
    """Fit, save UBJ + ONNX, check parity on test rows, compute test metrics."""
    train, valid, test = (
        read_split(etl, s, feature_names, target, id_col, backend)
        for s in ("train", "valid", "test")
    )
    client = active_dask_client()
    workers = len(client.scheduler_info().get("workers", {})) if client is not None else 0
    started = time.perf_counter()
    if workers > 1:
        log.info("xgboost: training on the %s-worker dask cluster", workers)
        booster = fit_xgboost_dask(client, etl, feature_names, target, cfg.xgboost, backend, seed)
    else:
        booster = fit_xgboost(train, valid, cfg.xgboost, backend, seed)
    fit_seconds = time.perf_counter() - started
    booster = trim_to_best(booster)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_transform(etl, out_dir)
    booster.save_model(str(out_dir / XGB_FILE))
    export_xgboost_onnx(booster, len(feature_names), out_dir / ONNX_FILE)
    p_test = xgboost_predict(booster, _to_device(test.features, backend))
    sample = slice(0, PARITY_ROWS)
    p_onnx = onnx_predict(out_dir / ONNX_FILE, to_host(test.features[sample]))
    diff = check_parity(p_test[sample], p_onnx, cfg.onnx_parity_atol, "xgboost")
    y_test = to_host(test.target)
    metrics = classification_metrics(y_test, p_test)
    best = int(booster.attr("best_iteration") or booster.num_boosted_rounds() - 1)
    params = {
        **xgboost_params(cfg.xgboost, backend, seed),
        "best_iteration": best,
        "dask_workers": workers if workers > 1 else 0,
    }
    importance = booster.get_score(importance_type="gain")
    named = {
        feature_names[int(k[1:])]: float(v) for k, v in importance.items() if k.startswith("f")
    }
    write_bundle_json(
        out_dir,
        {
            "kind": "xgboost",
            "native_file": XGB_FILE,
            "onnx_file": ONNX_FILE,
            "onnx_input": ONNX_INPUT,
            "onnx_output": ONNX_OUTPUT,
            "feature_names": feature_names,
            "threshold": cfg.threshold,
            "best_iteration": best,
            "backend": backend.device,
            "parity_max_abs_diff": diff,
            "parity_atol": cfg.onnx_parity_atol,
            "metrics": metrics,
        },
    )
    return TrainedModel(
        "xgboost",
        out_dir,
        metrics,
        params,
        diff,
        extra={
            "importance": named,
            "y_test": y_test,
            "p_test": p_test,
            "fit_seconds": fit_seconds,
        },
    )


# ---------------------------------------------------------------- MLP


def build_mlp(n_features: int, hidden: list[int]) -> Any:
    import torch

    layers: list[Any] = []
    width = n_features
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


def fit_mlp(train: SplitData, valid: SplitData, cfg: MLPConfig, backend: Backend, seed: int) -> Any:
    """Mini-batch Adam on BCE; keeps the epoch with the best validation log loss."""
    import torch

    torch.manual_seed(seed)
    device = torch.device(backend.torch_device)
    rng = np.random.default_rng(seed)
    n = min(len(train.target), cfg.max_train_rows)
    rows = torch.as_tensor(rng.permutation(len(train.target))[:n], device=device)
    # torch reads NumPy and CuPy (via __cuda_array_interface__) without a host round trip
    # cuDF hands over column-major matrices; gathering mini-batch rows from one is a strided
    # gather per step, so make the training matrix row-major once
    x = torch.as_tensor(train.features, device=device).contiguous()[rows]
    y = torch.as_tensor(train.target, device=device)[rows]
    xv = torch.as_tensor(valid.features, device=device).contiguous()
    yv = torch.as_tensor(valid.target, device=device)
    model = build_mlp(x.shape[1], cfg.hidden).to(device)
    # one fused kernel per step on CUDA instead of several per parameter tensor: the MLP is small,
    # so its steps are bound by kernel launches
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, fused=device.type == "cuda")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best_loss, best_state = float("inf"), None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]).squeeze(1), y[idx])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            vloss = float(loss_fn(model(xv).squeeze(1), yv))
        if vloss < best_loss:
            best_loss = vloss
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.cpu().eval()


def mlp_predict(model: Any, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(np.ascontiguousarray(features, np.float32)))
        return torch.sigmoid(logits).squeeze(1).numpy().astype(np.float32)


def export_mlp_onnx(model: Any, n_features: int, path: Path) -> None:
    """Export MLP + sigmoid with a dynamic batch axis."""
    import torch

    wrapped = torch.nn.Sequential(model, torch.nn.Sigmoid()).eval()
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated but exact for a plain MLP and needs no onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (torch.zeros(2, n_features),),
            str(path),
            dynamo=False,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            opset_version=17,
        )


def train_mlp(
    etl: EtlOutput,
    feature_names: list[str],
    target: str,
    id_col: str,
    cfg: ModelConfig,
    backend: Backend,
    out_dir: Path,
    seed: int,
) -> TrainedModel:
    train, valid, test = (
        read_split(etl, s, feature_names, target, id_col, backend)
        for s in ("train", "valid", "test")
    )
    started = time.perf_counter()
    model = fit_mlp(train, valid, cfg.mlp, backend, seed)
    fit_seconds = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_transform(etl, out_dir)
    np.savez(out_dir / MLP_WEIGHTS_FILE, **{k: v.numpy() for k, v in model.state_dict().items()})
    export_mlp_onnx(model, len(feature_names), out_dir / ONNX_FILE)
    test_features = to_host(test.features)
    p_test = mlp_predict(model, test_features)
    sample = slice(0, PARITY_ROWS)
    p_onnx = onnx_predict(out_dir / ONNX_FILE, test_features[sample])
    diff = check_parity(p_test[sample], p_onnx, cfg.onnx_parity_atol, "mlp")
    y_test = to_host(test.target)
    metrics = classification_metrics(y_test, p_test)
    params = {**cfg.mlp.model_dump(), "device": backend.torch_device, "seed": seed}
    write_bundle_json(
        out_dir,
        {
            "kind": "mlp",
            "native_file": MLP_WEIGHTS_FILE,
            "onnx_file": ONNX_FILE,
            "onnx_input": ONNX_INPUT,
            "onnx_output": ONNX_OUTPUT,
            "feature_names": feature_names,
            "hidden": cfg.mlp.hidden,
            "threshold": cfg.threshold,
            "backend": backend.device,
            "parity_max_abs_diff": diff,
            "parity_atol": cfg.onnx_parity_atol,
            "metrics": metrics,
        },
    )
    return TrainedModel(
        "mlp",
        out_dir,
        metrics,
        params,
        diff,
        extra={"y_test": y_test, "p_test": p_test, "fit_seconds": fit_seconds},
    )


def _to_device(features: Any, backend: Backend) -> Any:
    if backend.device == "gpu":
        import cupy

        return cupy.asarray(features)
    return features
