"""A model bundle loaded for scoring: transform spec + lookups + the model behind a small
`Scorer` interface (XGBoost in-process or ONNX Runtime in-process; Triton comes later)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from tasks.gpu_features import to_host
from tasks.numpy_features import transform_raw
from tasks.spec import Lookups, TransformSpec, load_transform

BUNDLE_FILE = "bundle.json"
TRANSFORM_DIR = "transform"


def read_bundle_json(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / BUNDLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a gpupipe model bundle")
    return dict(json.loads(path.read_text()))


ScorerKind = Literal["xgboost", "onnx"]


class Scorer(Protocol):
    """Maps the model's float32 input matrix (n, n_features) to P(positive), shape (n,)."""

    def predict_proba(self, features: Any) -> npt.NDArray[np.float32]: ...


@dataclass
class XGBoostScorer:
    booster: Any

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> XGBoostScorer:
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(str(path))
        booster.set_param({"device": device, "nthread": 0})
        return cls(booster)

    def predict_proba(self, features: Any) -> npt.NDArray[np.float32]:
        out = self.booster.inplace_predict(features)
        return to_host(out).astype(np.float32, copy=False).reshape(-1)


@dataclass
class OnnxScorer:
    session: Any
    input_name: str
    output_name: str

    @classmethod
    def load(cls, path: Path, input_name: str, output_name: str, threads: int = 0) -> OnnxScorer:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return cls(sess, input_name, output_name)

    def predict_proba(self, features: Any) -> npt.NDArray[np.float32]:
        x = np.ascontiguousarray(features, np.float32)
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, np.float32).reshape(-1)


@dataclass
class LoadedBundle:
    """Everything needed to score raw rows the way training defined."""

    directory: Path
    meta: dict[str, Any]
    spec: TransformSpec
    spec_dict: dict[str, Any]
    lookups: Lookups
    scorer: Scorer

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @classmethod
    def load(
        cls, directory: Path, scorer: ScorerKind = "xgboost", device: str = "cpu"
    ) -> LoadedBundle:
        meta = read_bundle_json(directory)
        spec, lookups = load_transform(directory / TRANSFORM_DIR)
        return cls(
            directory,
            meta,
            spec,
            spec.model_dump(),
            lookups,
            load_scorer(directory, meta, scorer, device),
        )

    def features(self, raw: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        return transform_raw(raw, self.spec_dict, self.lookups)

    def predict_raw(self, raw: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        """Raw columns (name -> array) -> P(positive) per row."""
        return self.scorer.predict_proba(self.features(raw))


def scorer_mismatch(directory: Path, meta: Mapping[str, Any], kind: str) -> str | None:
    """Why the `kind` of scorer cannot score this bundle, or None when it can: `xgboost` needs
    an XGBoost bundle, `onnx` scores any bundle (every bundle carries its ONNX model)."""
    if kind not in ("xgboost", "onnx"):
        return f"unknown scorer {kind!r} (expected 'xgboost' or 'onnx')"
    if kind == "xgboost" and meta["kind"] != "xgboost":
        return (
            f"{directory}: scorer 'xgboost' needs an XGBoost bundle, this one is "
            f"{meta['kind']!r}; use scorer 'onnx'"
        )
    return None


def check_scorer(directory: Path, kind: str, meta: Mapping[str, Any] | None = None) -> None:
    """Raise ValueError when the `kind` of scorer cannot score the bundle in `directory` (its
    bundle.json, or `meta` when already read). The flow checks on the driver before any worker
    loads the bundle; `load_scorer` checks again where it loads."""
    problem = scorer_mismatch(
        directory, read_bundle_json(directory) if meta is None else meta, kind
    )
    if problem is not None:
        raise ValueError(problem)


def load_scorer(
    directory: Path, meta: Mapping[str, Any], kind: ScorerKind, device: str = "cpu"
) -> Scorer:
    """The in-process scorer of a bundle; `xgboost` needs an XGBoost bundle."""
    check_scorer(directory, kind, meta)
    if kind == "xgboost":
        return XGBoostScorer.load(directory / meta["native_file"], device=device)
    return OnnxScorer.load(directory / meta["onnx_file"], meta["onnx_input"], meta["onnx_output"])


def frame_to_raw(frame: Any, columns: list[str]) -> dict[str, npt.NDArray[Any]]:
    """A pandas frame's columns as NumPy arrays (missing strings stay None/NaN)."""
    return {c: frame[c].to_numpy() for c in columns}
