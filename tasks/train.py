"""Training: XGBoost (hist, early stopping) and a PyTorch MLP on the transformed features, their
ONNX exports, parity checks between native and ONNX, and test-split metrics."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable
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
from tasks.metrics import classification_metrics as classification_metrics  # re-exported

log = logging.getLogger(__name__)

ModelKind = Literal["xgboost", "mlp"]
ONNX_FILE = "model.onnx"
XGB_FILE = "model.ubj"
MLP_WEIGHTS_FILE = "mlp_weights.npz"
ONNX_INPUT = "input__0"
ONNX_OUTPUT = "probability"
PARITY_ROWS = 20_000
MLP_PREDICT_ROWS = 1 << 20


@dataclass(frozen=True)
class SplitData:
    """One split: NumPy arrays on CPU, CuPy arrays (device-resident) on GPU."""

    features: Any
    target: Any


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
    backend: Backend | None = None,
) -> SplitData:
    """Load one split's features as a float32 matrix and its target; only those columns are read.

    On GPU the parquet is read by cuDF and the arrays are CuPy: the data stays on the device.
    """
    if backend is not None and backend.device == "gpu":
        import cudf

        frame = cudf.read_parquet(str(etl.features_dir(split)), columns=[*feature_names, target])
        return SplitData(
            features=frame[feature_names].to_cupy(dtype="float32"),
            target=frame[target].to_cupy(dtype="float32"),
        )
    frame = pd.read_parquet(etl.features_dir(split), columns=[*feature_names, target])
    return SplitData(
        features=np.ascontiguousarray(frame[feature_names].to_numpy(np.float32)),
        target=frame[target].to_numpy(np.float32),
    )


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


@dataclass(frozen=True)
class SplitEvaluation:
    """A trained model on its test split: metrics, host copies of the scores and labels, and the
    largest difference between ONNX Runtime's output and the native model's."""

    metrics: dict[str, float]
    p_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.float32]
    parity_max_abs_diff: float


def evaluate_on_test(
    test: SplitData, scored: Any, onnx_path: Path, atol: float, what: str
) -> SplitEvaluation:
    """Metrics of the native model's test scores `scored`, computed where they are (on the device
    on GPU), then the exported model checked against them on the first PARITY_ROWS rows."""
    metrics = classification_metrics(test.target, scored)
    p_test, y_test = to_host(scored), to_host(test.target)
    sample = slice(0, PARITY_ROWS)
    p_onnx = onnx_predict(onnx_path, to_host(test.features[sample]))
    diff = check_parity(p_test[sample], p_onnx, atol, what)
    return SplitEvaluation(metrics, p_test, y_test, diff)


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


def xgboost_predict(booster: Any, features: Any) -> Any:
    """Positive-class probability where the features are: NumPy in, NumPy out; CuPy in, CuPy out."""
    return booster.inplace_predict(features).astype("float32", copy=False)


def export_xgboost_onnx(booster: Any, n_features: int, path: Path) -> None:
    """Write the booster (trees up to the best iteration) as an ONNX TreeEnsemble model whose
    output is P(class 1), shape [batch, 1] (`tasks.xgboost_onnx`)."""
    import onnx

    from tasks.xgboost_onnx import xgboost_to_onnx

    onnx.save_model(xgboost_to_onnx(booster, n_features, ONNX_INPUT, ONNX_OUTPUT), str(path))


def train_xgboost(
    etl: EtlOutput,
    feature_names: list[str],
    target: str,
    cfg: ModelConfig,
    backend: Backend,
    out_dir: Path,
    seed: int,
) -> TrainedModel:
    """Fit, save UBJ + ONNX, check parity on test rows, compute test metrics."""
    train, valid, test = (
        read_split(etl, s, feature_names, target, backend) for s in ("train", "valid", "test")
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
    scored = xgboost_predict(booster, _to_device(test.features, backend))
    ev = evaluate_on_test(test, scored, out_dir / ONNX_FILE, cfg.onnx_parity_atol, "xgboost")
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
            "parity_max_abs_diff": ev.parity_max_abs_diff,
            "parity_atol": cfg.onnx_parity_atol,
            "metrics": ev.metrics,
        },
    )
    return TrainedModel(
        "xgboost",
        out_dir,
        ev.metrics,
        params,
        ev.parity_max_abs_diff,
        extra={
            "importance": named,
            "y_test": ev.y_test,
            "p_test": ev.p_test,
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


def prior_log_odds(positive_rate: float) -> float:
    """log(p / (1 - p)) of the training positive rate, p kept inside (1e-6, 1 - 1e-6)."""
    p = min(max(positive_rate, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


def set_output_bias(model: Any, positive_rate: float) -> None:
    """Start the MLP's output at the training positive rate (its last layer's bias at the
    rate's log odds). From a bias of 0 (p = 0.5 for every row) the first tens of steps on 1%
    positives only push every output down, hardest for the unusual rows that the positives
    are, and the ranking inverts meanwhile. On 200k generated rows (1% positives, 34 steps of
    4096, Adam at 1e-3) test ROC AUC went 0.66 at initialisation -> 0.19 after the epoch from a
    bias of 0, and -> 0.86 from the rate's log odds."""
    import torch

    with torch.no_grad():
        model[-1].bias.fill_(prior_log_odds(positive_rate))


def epoch_batches(order: Any, batch_size: int) -> Any:
    """One epoch's row indices as [steps, batch_size]: the shuffled order cut into batches, the last
    one topped up from the start of the order. Every row is used each epoch, and every step has the
    same shape, which a step captured as a CUDA graph needs."""
    import torch

    n = int(order.shape[0])
    steps = -(-n // batch_size)
    positions = torch.arange(steps * batch_size, device=order.device) % n
    return order[positions].view(steps, batch_size)


TrainStep = Callable[[Any], None]


def eager_train_step(model: Any, opt: Any, x: Any, y: Any) -> TrainStep:
    """One Adam step on the BCE of the rows `idx` of (x, y)."""
    import torch

    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(idx: Any) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]).squeeze(1), y[idx]).backward()
        opt.step()

    return step


class CudaGraphTrainStep:
    """A training step replayed from a CUDA graph: one launch per step instead of the many kernel
    launches and the Python autograd work of an eager step, which bound a small MLP on a GPU.

    The first `warmup` calls run the step eagerly on a side stream (lazy initialisation and the
    optimizer's state happen there, as capture requires); they are real training steps. The next
    call captures the step reading its rows from a fixed index buffer, and every call from then on
    copies its indices into that buffer and replays the graph. The optimizer must be capturable."""

    def __init__(self, step: TrainStep, batch_size: int, device: Any, warmup: int = 3) -> None:
        import torch

        self._torch = torch
        self._step = step
        self._warmup_left = warmup
        self._idx = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self._graph: Any = None

    def __call__(self, idx: Any) -> None:
        torch = self._torch
        if self._warmup_left:
            self._warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(idx)
            torch.cuda.current_stream().wait_stream(side)
            return
        self._idx.copy_(idx)
        if self._graph is None:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._step(self._idx)
        self._graph.replay()


def fit_mlp(
    train: SplitData,
    valid: SplitData,
    cfg: MLPConfig,
    backend: Backend,
    seed: int,
    cuda_graph: bool = True,
) -> Any:
    """Mini-batch Adam on BCE; keeps the epoch with the best validation log loss. On CUDA each
    step replays a captured CUDA graph unless `cuda_graph` is False (same steps, launched eagerly)."""
    import torch

    torch.manual_seed(seed)
    device = torch.device(backend.torch_device)
    on_cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(seed)
    n = min(len(train.target), cfg.max_train_rows)
    rows = torch.randperm(len(train.target), generator=gen, device=device)[:n]
    # torch reads NumPy and CuPy (via __cuda_array_interface__) without a host round trip
    # cuDF hands over column-major matrices; gathering mini-batch rows from one is a strided
    # gather per step, so make the training matrix row-major once
    x = torch.as_tensor(train.features, device=device).contiguous()[rows]
    y = torch.as_tensor(train.target, device=device)[rows]
    xv = torch.as_tensor(valid.features, device=device).contiguous()
    yv = torch.as_tensor(valid.target, device=device)
    model = build_mlp(x.shape[1], cfg.hidden)
    set_output_bias(model, float(y.float().mean()))
    model = model.to(device)
    use_graph = on_cuda and cuda_graph
    # fused: one kernel per step for all parameters; capturable: its step count stays on the
    # device, so the step can be captured in a CUDA graph
    opt = torch.optim.Adam(
        model.parameters(), lr=cfg.learning_rate, fused=on_cuda, capturable=use_graph
    )
    eager = eager_train_step(model, opt, x, y)
    step = CudaGraphTrainStep(eager, cfg.batch_size, device) if use_graph else eager
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best_loss, best_state = float("inf"), None
    for _epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen, device=device)
        for idx in epoch_batches(order, cfg.batch_size):
            step(idx)
        model.eval()
        with torch.no_grad():
            vloss = float(loss_fn(model(xv).squeeze(1), yv))
        if vloss < best_loss:
            best_loss = vloss
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.cpu().eval()


def mlp_predict(model: Any, features: Any) -> Any:
    """Positive-class probability where the features are: NumPy in, NumPy out (torch on the CPU);
    CuPy in, CuPy out (a copy of the model on CUDA). Scored in chunks of MLP_PREDICT_ROWS rows."""
    import torch

    on_cuda = hasattr(features, "__cuda_array_interface__")
    device = torch.device("cuda" if on_cuda else "cpu")
    net = copy.deepcopy(model).to(device) if on_cuda else model
    x = torch.as_tensor(features, device=device, dtype=torch.float32)
    with torch.no_grad():
        out = torch.cat(
            [
                torch.sigmoid(net(x[start : start + MLP_PREDICT_ROWS])).squeeze(1)
                for start in range(0, x.shape[0], MLP_PREDICT_ROWS)
            ]
            or [torch.empty(0, device=device)]
        )
    if on_cuda:
        import cupy

        return cupy.from_dlpack(out)
    return out.numpy()


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


def mlp_engine(out_dir: Path, n_features: int, int8: Any, backend: Backend) -> Any:
    """A TensorRT plan of the MLP (INT8 from the kept Q/DQ model, else FP16), or the report of
    why there is none (`tasks.tensorrt_engine`)."""
    from tasks.tensorrt_engine import batch_profile, engine_report

    quantized = int8 is not None and int8.kept
    source = out_dir / (int8.file if quantized else ONNX_FILE)
    return engine_report(
        source,
        out_dir,
        ONNX_INPUT,
        n_features,
        batch_profile(MLP_PREDICT_ROWS, 4096),
        quantized,
        backend.device == "gpu",
    )


def train_mlp(
    etl: EtlOutput,
    feature_names: list[str],
    target: str,
    cfg: ModelConfig,
    backend: Backend,
    out_dir: Path,
    seed: int,
) -> TrainedModel:
    train, valid, test = (
        read_split(etl, s, feature_names, target, backend) for s in ("train", "valid", "test")
    )
    started = time.perf_counter()
    model = fit_mlp(train, valid, cfg.mlp, backend, seed)
    fit_seconds = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_transform(etl, out_dir)
    np.savez(out_dir / MLP_WEIGHTS_FILE, **{k: v.numpy() for k, v in model.state_dict().items()})
    export_mlp_onnx(model, len(feature_names), out_dir / ONNX_FILE)
    scored = mlp_predict(model, test.features)
    ev = evaluate_on_test(test, scored, out_dir / ONNX_FILE, cfg.onnx_parity_atol, "mlp")
    int8 = None
    if cfg.int8.enabled:
        from tasks.quantize import calibrate_int8

        int8 = calibrate_int8(
            out_dir,
            ONNX_FILE,
            ONNX_INPUT,
            train.features,
            to_host(test.features[: cfg.int8.check_rows]),
            ev.y_test,
            onnx_predict,
            cfg.int8,
            seed,
        )
        log.info("MLP INT8 (Q/DQ): %s", int8)
    engine = mlp_engine(out_dir, len(feature_names), int8, backend)
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
            "parity_max_abs_diff": ev.parity_max_abs_diff,
            "parity_atol": cfg.onnx_parity_atol,
            "metrics": ev.metrics,
            "int8": int8.to_json() if int8 is not None else None,
            "tensorrt": engine.to_json(),
        },
    )
    return TrainedModel(
        "mlp",
        out_dir,
        ev.metrics,
        params,
        ev.parity_max_abs_diff,
        extra={"y_test": ev.y_test, "p_test": ev.p_test, "fit_seconds": fit_seconds},
    )


def _to_device(features: Any, backend: Backend) -> Any:
    if backend.device == "gpu":
        import cupy

        return cupy.asarray(features)
    return features
