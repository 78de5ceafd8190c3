"""tasks/prefect_tasks.py's retry condition, on a real temporary Prefect API: a task that fails
for good runs once; one whose failure a retry may cure runs again. The run counts are read back
from the API."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.backend import BackendError
from tasks.config import ConfigError
from tasks.io import DataError
from tasks.prefect_tasks import worth_retrying


def task_run_count(task_run_id: Any) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return int(client.read_task_run(task_run_id).run_count)


@pytest.mark.parametrize(
    ("error", "runs"),
    [
        (DataError("in.parquet: column 'x': all ids are null"), 1),
        (ConfigError("config.toml: unknown key"), 1),
        (ValueError("model URI 'models:/nope@champion': no registered model 'nope'"), 1),
        (KeyError("mlp"), 1),
        (BackendError("device 'gpu' asked for, no GPU"), 1),
        (OSError("database is locked"), 3),
        (RuntimeError("2 of 4 scoring task(s) failed"), 3),
    ],
)
def test_only_failures_a_retry_may_cure_are_retried(
    prefect_api: None, error: BaseException, runs: int
) -> None:
    from prefect import flow, task

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=worth_retrying)
    def failing() -> None:
        raise error

    @flow
    def one_task() -> tuple[Any, bool, str]:
        state = failing(
            return_state=True
        )  # plain values out: a returned Failed state fails the flow
        raised = state.result(raise_on_failure=False)
        return state.state_details.task_run_id, state.is_failed(), type(raised).__name__

    task_run_id, failed, raised = one_task()
    assert failed and raised == type(error).__name__
    assert task_run_count(task_run_id) == runs
