"""Prefect's flow-run heartbeats: off only where no Prefect server could receive them."""

from __future__ import annotations

import os

import pytest
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    get_current_settings,
    temporary_settings,
)

from flows.cli import HEARTBEAT_ENV, embedded_api_without_heartbeats, heartbeats_reach_a_server


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


def test_the_gpupipe_command_runs_main() -> None:
    """The installed `gpupipe` script enters through `main` (telemetry and heartbeat settings),
    not straight into the typer app."""
    from importlib.metadata import entry_points

    import flows.cli

    (script,) = entry_points(group="console_scripts", name="gpupipe")
    assert script.load() is flows.cli.main


def test_main_runs_the_app_without_telemetry_or_heartbeats(monkeypatch: pytest.MonkeyPatch):
    import flows.cli

    for name in (*HEARTBEAT_ENV, "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.setenv(name, "")  # restored (or removed) after the test, whatever main sets
        monkeypatch.delenv(name)
    seen: dict[str, object] = {}

    def recording_app() -> None:  # stands in for the typer app: records what it runs under
        seen["heartbeats"] = get_current_settings().flows.heartbeat_frequency
        seen["analytics"] = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED")

    monkeypatch.setattr(flows.cli, "app", recording_app)
    with temporary_settings(updates={PREFECT_API_URL: None}):
        flows.cli.main()
    assert seen == {"heartbeats": None, "analytics": "false"}
