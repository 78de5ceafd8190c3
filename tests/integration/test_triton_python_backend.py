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

import itertools
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.bundle import LoadedBundle
from tasks.etl import EtlOutput
from tasks.publish import PublishedModels
from tests.triton_support import (
    infer_concurrently,
    publish_kinds,
    raw_rows_with_edge_cases,
    request_inputs,
    serving,
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
    return publish_kinds(
        small_bundles[1],
        repo,
        VERSION,
        max_batch_size=4096,
        preferred_batch_sizes=[256, 1024],
        max_queue_delay_us=2000,
    )


@pytest.fixture(scope="module")
def triton(
    published: dict[str, PublishedModels], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A gRPC client of a real server with every published preprocess model ready."""
    assert SERVER is not None
    work = tmp_path_factory.mktemp("triton-python-server")
    names = [p.names.preprocess for p in published.values()]
    args = [
        str(SERVER.binary),
        f"--backend-directory={backend_directory(SERVER, work / 'backends')}",
        "--model-control-mode=explicit",
        *(f"--load-model={n}" for n in names),
    ]
    repo = next(iter(published.values())).repo
    log = work / "tritonserver.log"
    env = server_environment(SERVER)
    # in STUB_SITE: see the module docstring
    with serving(
        args, repo, names, VERSION, START_TIMEOUT_S, log, env=env, cwd=STUB_SITE
    ) as client:
        yield client


@pytest.fixture(scope="module")
def raw_rows(small_bundles: tuple[EtlOutput, dict[str, Path]]) -> dict[str, Any]:
    spec = LoadedBundle.load(small_bundles[1]["xgboost"]).spec
    return raw_rows_with_edge_cases(small_bundles[0].raw_test_dir, spec, ROWS)


def _bundle(small_bundles: tuple[EtlOutput, dict[str, Path]], kind: str) -> LoadedBundle:
    return LoadedBundle.load(
        small_bundles[1][kind], scorer="xgboost" if kind == "xgboost" else "onnx"
    )


def _features(result: Any) -> np.ndarray:
    """The preprocess model's one output of a response."""
    (output,) = [o.name for o in result.get_response().outputs]
    return np.asarray(result.as_numpy(output))


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
        published[kind].names.preprocess,
        request_inputs(raw_rows, bundle.spec),
        model_version=str(VERSION),
    )
    served = _features(result)
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
    model = published[kind].names.preprocess
    results = infer_concurrently(triton, model, bundle.spec, raw_rows, bounds, VERSION)
    served = [_features(r) for r in results]
    assert [len(s) for s in served] == [hi - lo for lo, hi in itertools.pairwise(bounds)]
    np.testing.assert_allclose(np.concatenate(served), expected, rtol=0, atol=FEATURES_ATOL)
