"""Triton Python-backend model `<name>-preprocess`: raw columns in, the model's features out.

`tasks/publish.py` copies this file as `model.py` into the version directory, next to
`numpy_features.py`, `kernels/` and `transform/`, so the server computes exactly the features
that training and batch scoring compute. It needs NumPy and nothing from gpupipe's environment.

Wire format (what `tasks.publish.encode_raw_inputs` sends): every input has shape [batch, 1];
strings are BYTES (UTF-8, empty = missing), the timestamp is INT64 microseconds since the epoch
(int64 min = NaT), numbers keep their raw dtype (missing = NaN). The decoding below is written as
plain functions so tests run it without a server.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

TRANSFORM_DIR = "transform"
SPEC_FILE = "transform_spec.json"

Transform = Callable[..., np.ndarray]


def decode_strings(values: np.ndarray) -> np.ndarray:
    """BYTES tensor -> object array of str, with None where the client sent an empty string."""
    flat = np.asarray(values, dtype=object).reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, v in enumerate(flat):
        text = v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)
        out[i] = text if text else None
    return out


def decode_timestamps(values: np.ndarray) -> np.ndarray:
    """INT64 microseconds since the epoch -> datetime64[us] (int64 min reads back as NaT)."""
    return np.ascontiguousarray(values, dtype=np.int64).reshape(-1).view("datetime64[us]")


def decode_column(values: np.ndarray, *, is_timestamp: bool) -> np.ndarray:
    """One Triton input tensor ([batch, 1] or [batch]) -> the 1-D raw column the transform reads."""
    arr = np.asarray(values)
    if is_timestamp:
        return decode_timestamps(arr)
    if arr.dtype.kind in "OSU":
        return decode_strings(arr)
    return arr.reshape(-1)


def decode_inputs(
    arrays: Mapping[str, np.ndarray], timestamp_column: str | None
) -> dict[str, np.ndarray]:
    """Triton-typed input arrays of one request -> raw columns (name -> 1-D array).

    Raises:
        ValueError: when the columns do not all have the same number of rows.
    """
    raw = {
        name: decode_column(values, is_timestamp=name == timestamp_column)
        for name, values in arrays.items()
    }
    lengths = {name: len(col) for name, col in raw.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs have different numbers of rows: {lengths}")
    return raw


def concat_columns(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The raw columns of several requests, stacked in order, for one pass of the transform."""
    names = list(batches[0])
    return {name: np.concatenate([b[name] for b in batches]) for name in names}


def features_for_batches(
    batches: Sequence[Mapping[str, np.ndarray]],
    spec: Mapping[str, Any],
    lookups: Mapping[str, Mapping[str, np.ndarray]],
    transform: Transform,
) -> list[np.ndarray]:
    """Transform the decoded raw columns of several requests in one call; one matrix per request."""
    if not batches:
        return []
    sizes = [len(next(iter(b.values()))) if b else 0 for b in batches]
    matrix = np.asarray(transform(concat_columns(batches), spec, lookups), dtype=np.float32)
    return np.split(matrix, np.cumsum(sizes)[:-1])


def find_version_dir(args: Mapping[str, str], module_file: str) -> str:
    """The version directory holding `transform/`: Triton's arguments first, then this file's."""
    candidates = []
    if args.get("model_repository") and args.get("model_version"):
        candidates.append(os.path.join(args["model_repository"], args["model_version"]))
    candidates.append(os.path.dirname(os.path.abspath(module_file)))
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, TRANSFORM_DIR, SPEC_FILE)):
            return directory
    raise FileNotFoundError(f"no {TRANSFORM_DIR}/{SPEC_FILE} in any of {candidates}")


def import_features_module(version_dir: str) -> ModuleType:
    """Import the shipped `numpy_features` (and through it `kernels.reference`) from version_dir."""
    # Triton's polling reloads a model when anything in its directory changes; a __pycache__
    # written next to the shipped modules would trigger one pointless reload.
    sys.dont_write_bytecode = True
    # first on the path, so the copies shipped with this version win over anything installed
    if version_dir not in sys.path:
        sys.path.insert(0, version_dir)
    return importlib.import_module("numpy_features")


def load_transform(
    version_dir: str, features: ModuleType
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """The transform spec (plain dict of its JSON) and the entity lookup tables (npz, no pickle)."""
    directory = os.path.join(version_dir, TRANSFORM_DIR)
    with open(os.path.join(directory, SPEC_FILE), encoding="utf-8") as f:
        spec = json.load(f)
    lookups = {
        e["key"]: features.load_lookup_npz(os.path.join(directory, e["file"]))
        for e in spec["entities"]
    }
    return spec, lookups


class TritonPythonModel:
    """Raw columns -> `input__0` (float32 [batch, n_features]) for the ensemble's model step."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_name = config["output"][0]["name"]
        version_dir = find_version_dir(args, __file__)
        features = import_features_module(version_dir)
        self.transform: Transform = features.transform_raw
        self.spec, self.lookups = load_transform(version_dir, features)
        self.timestamp_column = self.spec.get("timestamp_column")

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        decoded: dict[int, dict[str, np.ndarray]] = {}
        errors: dict[int, str] = {}
        for i, request in enumerate(requests):
            try:
                arrays = {}
                for name in self.input_names:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise ValueError(f"missing input {name!r}")
                    arrays[name] = tensor.as_numpy()
                decoded[i] = decode_inputs(arrays, self.timestamp_column)
            except Exception as exc:  # one malformed request must not fail its batch-mates
                errors[i] = f"preprocess: {exc}"
        results = self._features(decoded, errors)
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(errors[i])
                    )
                )
            else:
                tensor = pb_utils.Tensor(self.output_name, results[i])
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def _features(
        self, decoded: dict[int, dict[str, np.ndarray]], errors: dict[int, str]
    ) -> dict[int, np.ndarray]:
        """One transform over all good requests; if that fails, one per request to find the bad."""
        order = sorted(decoded)
        try:
            mats = features_for_batches(
                [decoded[i] for i in order], self.spec, self.lookups, self.transform
            )
            return dict(zip(order, mats, strict=True))
        except Exception:
            out = {}
            for i in order:
                try:
                    out[i] = features_for_batches(
                        [decoded[i]], self.spec, self.lookups, self.transform
                    )[0]
                except Exception as exc:
                    errors[i] = f"preprocess: {exc}"
            return out

    def finalize(self) -> None:
        self.spec, self.lookups = {}, {}
