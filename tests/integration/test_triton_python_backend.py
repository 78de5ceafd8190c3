"""The published Python-backend preprocess models served by a real Triton server, on CPU.

The server is the `tritonserver` binary that the `nvidia-pytriton` wheel bundles (Triton 2.51,
Python backend only; `.ci/install.sh` installs the wheel without its dependencies, for the
binary alone). That build has no FIL or ONNX Runtime backend, so only the `<name>-preprocess`
models are loaded (explicit model control); the ensembles are tested against a full server by
`test_triton_server.py`. Here the server runs `model.py` exactly as published: its features must
equal the bundle's in-process transform, for each request of a dynamic batch.

The Python-backend stub is built against NumPy 1.x (pybind11 before NumPy 2: with NumPy 2 it
misreads every BYTES tensor and dies), as in Triton's own containers. Its embedded interpreter
is isolated (no PYTHONPATH) and searches the working directory first, so the server runs in
`STUB_SITE`, a directory holding NumPy 1.26 (`.ci/install.sh` fills it): `model.py` must run
with NumPy alone, and an old one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tasks.bundle import LoadedBundle, frame_to_raw
from tasks.etl import EtlOutput
from tasks.publish import (
    PublishedModels,
    encode_raw_inputs,
    protocol_datatype,
    publish_bundle,
    raw_input_types,
    validate_repository,
)

KINDS = ("xgboost", "mlp")
VERSION = 1
ROWS = 400
START_TIMEOUT_S = 120.0
FEATURES_ATOL = 1e-6  # float32 features: the same NumPy code on both sides


@dataclass(frozen=True)
class BundledServer:
    """Where the pytriton wheel keeps the server, its libraries and the Python-backend parts."""

    binary: Path
    libraries: Path
    python_backend: Path
    stub: Path


def bundled_server() -> BundledServer | None:
    """The server of an installed nvidia-pytriton wheel, found on disk without importing it (its
    package imports dependencies that are deliberately not installed)."""
    for entry in map(Path, sys.path):
        root = entry / "pytriton" / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        server = BundledServer(
            binary=root / "bin" / "tritonserver",
            libraries=entry / "nvidia_pytriton.libs",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        if all(p.exists() for p in (server.binary, server.python_backend, server.stub)):
            return server
    return None


SERVER = bundled_server()
# the stub's packages: NumPy 1.26 alone (pip install --no-deps --target <this> numpy==1.26.4)
STUB_SITE = Path(os.environ.get("GPUPIPE_TRITON_STUB_SITE", Path(sys.prefix) / "triton-stub-site"))

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        SERVER is None or not (STUB_SITE / "numpy").is_dir(),
        reason="needs the nvidia-pytriton wheel and NumPy 1.x for its stub (.ci/install.sh: "
        "pip install --no-deps nvidia-pytriton==0.7.0; pip install --no-deps --target "
        f"{STUB_SITE} numpy==1.26.4)",
    ),
]


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend_directory(server: BundledServer, into: Path) -> Path:
    """A backend directory whose Python backend has the stub built for this interpreter (the
    wheel ships one per Python version beside the backend, not in it)."""
    python = into / "python"
    shutil.copytree(server.python_backend, python)
    shutil.copy2(server.stub, python / "triton_python_backend_stub")
    return into


def server_environment(server: BundledServer) -> dict[str, str]:
    """The server's libraries and this interpreter's libpython, which the stub embeds."""
    env = dict(os.environ)
    libdirs = [str(sysconfig.get_config_var("LIBDIR")), str(server.libraries)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libdirs, os.environ.get("LD_LIBRARY_PATH", "")])
    return env


@pytest.fixture(scope="module")
def published(
    small_bundles: tuple[EtlOutput, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, PublishedModels]:
    repo = tmp_path_factory.mktemp("triton-python") / "model_repo"
    out = {
        kind: publish_bundle(
            path,
            repo,
            f"gpupipe-{kind}",
            VERSION,
            max_batch_size=4096,
            preferred_batch_sizes=[256, 1024],
            max_queue_delay_us=2000,
        )
        for kind, path in small_bundles[1].items()
    }
    assert validate_repository(repo) == []
    return out


@pytest.fixture(scope="module")
def triton(
    published: dict[str, PublishedModels], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A gRPC client of a real server with every published preprocess model ready."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    assert SERVER is not None
    work = tmp_path_factory.mktemp("triton-python-server")
    names = [p.names.preprocess for p in published.values()]
    port = _free_port()
    cmd = [
        str(SERVER.binary),
        f"--model-repository={next(iter(published.values())).repo}",
        f"--backend-directory={backend_directory(SERVER, work / 'backends')}",
        "--model-control-mode=explicit",
        *(f"--load-model={n}" for n in names),
        f"--grpc-port={port}",
        "--allow-http=false",
        "--allow-metrics=false",
    ]
    log = work / "tritonserver.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen(  # in STUB_SITE: see the module docstring
            cmd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=server_environment(SERVER),
            cwd=STUB_SITE,
        )
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        pending = list(names)
        while pending:
            if server.poll() is not None:
                pytest.fail(f"tritonserver exited with {server.returncode}:\n{log.read_text()}")
            with contextlib.suppress(InferenceServerException):  # not accepting connections yet
                pending = [n for n in pending if not client.is_model_ready(n, str(VERSION))]
            if pending and time.monotonic() > deadline:
                pytest.fail(f"not ready after {START_TIMEOUT_S:.0f}s: {pending}\n{log.read_text()}")
            if pending:
                time.sleep(0.3)
        yield client
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def raw_rows(small_bundles: tuple[EtlOutput, dict[str, Path]]) -> dict[str, Any]:
    """Raw test rows plus rows with a missing amount, channel and timestamp, an unseen country
    and an unseen card."""
    bundle = LoadedBundle.load(small_bundles[1]["xgboost"])
    spec = bundle.spec
    frame = pd.read_parquet(small_bundles[0].raw_test_dir).sort_values(spec.id_column)
    frame = frame.head(ROWS).reset_index(drop=True)
    edge = frame.head(5).copy()
    edge.loc[0, "amount"] = np.nan
    edge.loc[1, "channel"] = None
    edge.loc[2, "country"] = "ZZ"
    edge.loc[3, "card_id"] = 10**12
    edge.loc[4, "timestamp"] = pd.NaT
    return frame_to_raw(pd.concat([frame, edge], ignore_index=True), spec.raw_columns)


def _request(bundle: LoadedBundle, raw: dict[str, Any], rows: slice = slice(None)) -> list[Any]:
    import tritonclient.grpc as grpcclient

    arrays = encode_raw_inputs({k: v[rows] for k, v in raw.items()}, bundle.spec)
    inputs = []
    for name, data_type in raw_input_types(bundle.spec):
        item = grpcclient.InferInput(name, list(arrays[name].shape), protocol_datatype(data_type))
        item.set_data_from_numpy(arrays[name])
        inputs.append(item)
    return inputs


def _bundle(small_bundles: tuple[EtlOutput, dict[str, Path]], kind: str) -> LoadedBundle:
    return LoadedBundle.load(
        small_bundles[1][kind], scorer="xgboost" if kind == "xgboost" else "onnx"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_served_features_equal_the_in_process_transform(
    triton: Any,
    published: dict[str, PublishedModels],
    small_bundles: tuple[EtlOutput, dict[str, Path]],
    raw_rows: dict[str, Any],
    kind: str,
) -> None:
    bundle = _bundle(small_bundles, kind)
    expected = bundle.features(raw_rows)
    result = triton.infer(
        published[kind].names.preprocess, _request(bundle, raw_rows), model_version=str(VERSION)
    )
    (output,) = [o.name for o in result.get_response().outputs]
    served = result.as_numpy(output)
    assert served.shape == expected.shape == (ROWS + 5, len(bundle.spec.feature_names))
    assert served.dtype == np.float32
    np.testing.assert_allclose(served, expected, rtol=0, atol=FEATURES_ATOL)
    assert np.isfinite(served).all()  # the edge rows are imputed, as in training


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_requests_get_their_own_rows_back(
    triton: Any,
    published: dict[str, PublishedModels],
    small_bundles: tuple[EtlOutput, dict[str, Path]],
    raw_rows: dict[str, Any],
    kind: str,
) -> None:
    """Requests of different sizes in flight together: the dynamic batcher hands several to the
    preprocess model in one execute call, which must answer each with its own rows."""
    bundle = _bundle(small_bundles, kind)
    expected = bundle.features(raw_rows)
    bounds = [0, 1, 7, 64, 65, 200, 333, ROWS + 5]
    done: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        triton.async_infer(
            published[kind].names.preprocess,
            _request(bundle, raw_rows, slice(lo, hi)),
            lambda result, error, i=i: done.put((i, result, error)),
            model_version=str(VERSION),
        )
    results: dict[int, Any] = {}
    for _ in range(len(bounds) - 1):
        i, result, error = done.get(timeout=60)
        assert error is None, error
        results[i] = result
    served = []
    for i in sorted(results):
        (output,) = [o.name for o in results[i].get_response().outputs]
        served.append(results[i].as_numpy(output))
        assert len(served[-1]) == bounds[i + 1] - bounds[i]
    np.testing.assert_allclose(np.concatenate(served), expected, rtol=0, atol=FEATURES_ATOL)
