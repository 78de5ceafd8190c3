"""What the Triton tests share: raw rows with the wire format's edge cases, request inputs, and
starting, waiting for and stopping a server process."""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tasks.bundle import frame_to_raw
from tasks.publish import (
    PublishedModels,
    encode_raw_inputs,
    protocol_datatype,
    publish_bundle,
    raw_input_types,
    validate_repository,
)
from tasks.spec import TransformSpec


def raw_rows_with_edge_cases(raw_test_dir: Path, spec: TransformSpec, rows: int) -> dict[str, Any]:
    """The first `rows` raw test rows by id, plus five rows with a missing amount, a missing
    channel, an unseen country, an unseen card and a missing timestamp: the cases where the wire
    encoding could lose information."""
    frame = pd.read_parquet(raw_test_dir).sort_values(spec.id_column)
    frame = frame.head(rows).reset_index(drop=True)
    edge = frame.head(5).copy()
    edge.loc[0, "amount"] = np.nan
    edge.loc[1, "channel"] = None
    edge.loc[2, "country"] = "ZZ"
    edge.loc[3, "card_id"] = 10**12
    edge.loc[4, "timestamp"] = pd.NaT
    return frame_to_raw(pd.concat([frame, edge], ignore_index=True), spec.raw_columns)


def request_inputs(
    raw: dict[str, Any], spec: TransformSpec, rows: slice = slice(None)
) -> list[Any]:
    """gRPC inputs of the raw rows `rows`, encoded as the published models take them."""
    import tritonclient.grpc as grpcclient

    arrays = encode_raw_inputs({k: v[rows] for k, v in raw.items()}, spec)
    inputs = []
    for name, data_type in raw_input_types(spec):
        item = grpcclient.InferInput(name, list(arrays[name].shape), protocol_datatype(data_type))
        item.set_data_from_numpy(arrays[name])
        inputs.append(item)
    return inputs


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path | None, lines: int = 60) -> str:
    text = path.read_text(errors="replace") if path and path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until_ready(
    client: Any,
    names: Sequence[str],
    version: int,
    timeout_s: float,
    server: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Until every model in `names` is ready at `version`; fails the test with the server's log
    when the server exits or `timeout_s` passes first."""
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending:
        if server is not None and server.poll() is not None:
            pytest.fail(f"tritonserver exited with {server.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(InferenceServerException):  # not accepting connections yet
            if client.is_server_live():
                pending = [n for n in pending if not client.is_model_ready(n, str(version))]
        if pending and time.monotonic() > deadline:
            pytest.fail(f"models not ready after {timeout_s:.0f}s: {pending}\n{log_tail(log)}")
        if pending:
            time.sleep(0.3)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextlib.contextmanager
def serving(
    server_args: Sequence[str],
    repo: Path,
    names: Sequence[str],
    version: int,
    timeout_s: float,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[Any]:
    """A `tritonserver` (`server_args`: the binary, then any options beyond the repository and
    ports) serving `repo` on a free gRPC port, its output in `log`: a gRPC client once every
    model in `names` is ready at `version`; the server is stopped on the way out."""
    import tritonclient.grpc as grpcclient

    port = free_port()
    cmd = [
        *server_args,
        f"--model-repository={repo}",
        f"--grpc-port={port}",
        "--allow-http=false",
        "--allow-metrics=false",
    ]
    with open(log, "wb") as sink:
        server = subprocess.Popen(
            cmd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
        )
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        wait_until_ready(client, names, version, timeout_s, server, log)
        yield client
    finally:
        client.close()
        stop_server(server)


def publish_kinds(
    bundles: Mapping[str, Path], repo: Path, version: int, **batching: Any
) -> dict[str, PublishedModels]:
    """Each bundle (by kind) published as `gpupipe-<kind>` into `repo`, which must validate."""
    out = {
        kind: publish_bundle(path, repo, f"gpupipe-{kind}", version, **batching)
        for kind, path in bundles.items()
    }
    assert validate_repository(repo) == []
    return out


def infer_concurrently(
    client: Any,
    model: str,
    spec: TransformSpec,
    raw: dict[str, Any],
    bounds: Sequence[int],
    version: int,
) -> list[Any]:
    """One request per run of rows between consecutive `bounds`, all in flight together (the
    dynamic batcher may hand several to one execute call); the results in request order."""
    done: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        client.async_infer(
            model,
            request_inputs(raw, spec, slice(lo, hi)),
            lambda result, error, i=i: done.put((i, result, error)),
            model_version=str(version),
        )
    results: dict[int, Any] = {}
    for _ in range(len(bounds) - 1):
        i, result, error = done.get(timeout=60)
        assert error is None, error
        results[i] = result
    return [results[i] for i in sorted(results)]
