"""Both published ensembles served by a real Triton server, against in-process scoring.

Runs when `tritonserver` is on PATH: the test publishes freshly trained bundles into a temporary
repository and starts the server on it. Or set GPUPIPE_TRITON_URL to a running server's gRPC
endpoint (host:port) and GPUPIPE_TRITON_REPO to the repository that server reads: the test
publishes into that repository, then loads the models (explicit model control) or waits for the
server's polling to pick them up.

Tolerances: ONNX Runtime in Triton runs the same graph as in-process ONNX Runtime (1e-5); FIL
evaluates the trees in float32 with its own summation order (1e-4).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.bundle import LoadedBundle
from tasks.etl import EtlOutput
from tasks.publish import (
    CONFIG_FILE,
    PublishedModels,
    ServingNames,
    read_model_config,
)
from tasks.spec import TransformSpec
from tests.triton_support import (
    infer_concurrently,
    publish_kinds,
    raw_rows_with_edge_cases,
    request_inputs,
    serving,
    wait_until_ready,
)

TRITON_URL = os.environ.get("GPUPIPE_TRITON_URL")
TRITON_REPO = os.environ.get("GPUPIPE_TRITON_REPO")

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not (TRITON_URL or shutil.which("tritonserver")),
        reason="needs `tritonserver` on PATH or GPUPIPE_TRITON_URL",
    ),
]

VERSION = 1
MAX_BATCH = 4096
ROWS = 500
ATOL = {"mlp": 1e-5, "xgboost": 1e-4}
START_TIMEOUT_S = 240.0
KINDS = ("xgboost", "mlp")


@pytest.fixture(scope="session")
def trained(small_bundles: tuple[EtlOutput, dict[str, Path]]) -> tuple[EtlOutput, dict[str, Path]]:
    """The shared small bundles (tests/conftest.py)."""
    return small_bundles


@pytest.fixture(scope="session")
def published(
    trained: tuple[EtlOutput, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, PublishedModels]:
    if TRITON_URL and not TRITON_REPO:
        pytest.skip("GPUPIPE_TRITON_URL also needs GPUPIPE_TRITON_REPO (the server's repository)")
    repo = Path(TRITON_REPO) if TRITON_URL else tmp_path_factory.mktemp("triton") / "model_repo"
    return publish_kinds(
        trained[1],
        repo,
        VERSION,
        max_batch_size=MAX_BATCH,
        preferred_batch_sizes=[256, 1024],
        max_queue_delay_us=500,
    )


@pytest.fixture(scope="session")
def triton(
    published: dict[str, PublishedModels], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A gRPC client of a server that has every published model ready at VERSION."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    names = [n for p in published.values() for n in p.names.all()]
    if TRITON_URL:
        client = grpcclient.InferenceServerClient(url=TRITON_URL)
        for p in published.values():
            # explicit model control loads the composing models too; in poll mode this is refused
            # and the server picks the new versions up by itself
            with contextlib.suppress(InferenceServerException):
                client.load_model(p.ensemble)
        try:
            wait_until_ready(client, names, VERSION, START_TIMEOUT_S)
            yield client
        finally:
            client.close()
        return

    repo = next(iter(published.values())).repo
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    with serving(["tritonserver"], repo, names, VERSION, START_TIMEOUT_S, log) as client:
        yield client


@pytest.fixture(scope="session")
def raw_rows(trained: tuple[EtlOutput, dict[str, Path]]) -> dict[str, Any]:
    spec = TransformSpec.load(trained[1]["xgboost"] / "transform")
    return raw_rows_with_edge_cases(trained[0].raw_test_dir, spec, ROWS)


def _positive_probability(published: PublishedModels, result: Any) -> np.ndarray:
    """P(positive) from the ensemble's output: FIL gives (1 - p, p), ONNX gives (p,)."""
    config = read_model_config(published.repo / published.ensemble / CONFIG_FILE)
    out = np.asarray(result.as_numpy(config.output[0].name))
    return out[:, 1] if published.kind == "xgboost" else out[:, 0]


def _expected(trained: tuple[EtlOutput, dict[str, Path]], kind: str, raw: dict[str, Any]) -> Any:
    bundle = LoadedBundle.load(trained[1][kind], scorer="xgboost" if kind == "xgboost" else "onnx")
    return bundle, bundle.predict_raw(raw)


def test_every_published_model_is_ready(triton: Any, published: dict[str, PublishedModels]) -> None:
    for p in published.values():
        for name in p.names.all():
            assert triton.is_model_ready(name, str(VERSION)), name
    assert ServingNames.for_model("gpupipe-xgboost").all() == published["xgboost"].names.all()


@pytest.mark.parametrize("kind", KINDS)
def test_ensemble_matches_in_process_scoring(
    triton: Any,
    published: dict[str, PublishedModels],
    trained: tuple[EtlOutput, dict[str, Path]],
    raw_rows: dict[str, Any],
    kind: str,
) -> None:
    import tritonclient.grpc as grpcclient

    bundle, expected = _expected(trained, kind, raw_rows)
    p = published[kind]
    config = read_model_config(p.repo / p.ensemble / CONFIG_FILE)
    result = triton.infer(
        p.ensemble,
        request_inputs(raw_rows, bundle.spec),
        model_version=str(VERSION),
        outputs=[grpcclient.InferRequestedOutput(config.output[0].name)],
    )
    served = _positive_probability(p, result)
    assert served.shape == expected.shape == (ROWS + 5,)
    np.testing.assert_allclose(served, expected, rtol=0, atol=ATOL[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_requests_get_their_own_rows_back(
    triton: Any,
    published: dict[str, PublishedModels],
    trained: tuple[EtlOutput, dict[str, Path]],
    raw_rows: dict[str, Any],
    kind: str,
) -> None:
    """Requests of different sizes in flight together: the dynamic batcher hands several to the
    preprocess model at once, which transforms them in one pass and must split them back."""
    bundle, expected = _expected(trained, kind, raw_rows)
    p = published[kind]
    bounds = [0, 1, 7, 64, 65, 200, 333, ROWS + 5]
    results = infer_concurrently(triton, p.ensemble, bundle.spec, raw_rows, bounds, VERSION)
    served = np.concatenate([_positive_probability(p, r) for r in results])
    np.testing.assert_allclose(served, expected, rtol=0, atol=ATOL[kind])
