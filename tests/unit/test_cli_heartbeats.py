"""Prefect's flow-run heartbeats: off only where no Prefect server could receive them."""

from __future__ import annotations

import pytest
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    get_current_settings,
    temporary_settings,
)

from flows.cli import embedded_api_without_heartbeats, heartbeats_reach_a_server


@pytest.mark.parametrize(
    ("api_url", "environ", "expected"),
    [
        (None, {}, False),
        ("", {}, False),
        ("http://127.0.0.1:4200/api", {}, True),
        (None, {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "60"}, True),
        (None, {"PREFECT_RUNNER_HEARTBEAT_FREQUENCY": "90"}, True),
        (None, {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": ""}, False),
        (None, {"PREFECT_API_KEY": "x"}, False),
    ],
)
def test_heartbeats_reach_a_server(api_url: str | None, environ: dict[str, str], expected: bool):
    assert heartbeats_reach_a_server(api_url, environ) is expected


def test_embedded_api_turns_heartbeats_off_and_back(monkeypatch: pytest.MonkeyPatch):
    for name in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"):
        monkeypatch.delenv(name, raising=False)
    with temporary_settings(
        updates={PREFECT_API_URL: None, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 120}
    ):
        with embedded_api_without_heartbeats():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency == 120


def test_server_keeps_heartbeats(monkeypatch: pytest.MonkeyPatch):
    for name in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"):
        monkeypatch.delenv(name, raising=False)
    url = "http://127.0.0.1:4200/api"
    settings = {PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 120}
    with temporary_settings(updates=settings), embedded_api_without_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency == 120


def test_users_frequency_is_kept_without_a_server(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "45")
    settings = {PREFECT_API_URL: None, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 45}
    with temporary_settings(updates=settings), embedded_api_without_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency == 45
