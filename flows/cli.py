"""The `gpupipe` command line: generate data, run the training pipeline or one stage, score."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli_scoring import score_command, serve_command
from tasks.pipeline import DEFAULT_BUILTIN_ROWS

app = typer.Typer(
    help="gpupipe: GPU/CPU tabular ML pipeline orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file; omitted: the built-in dataset."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a config key, e.g. --set model.xgboost.max_depth=6 (repeatable).",
    ),
]
RowsOpt = Annotated[
    int, typer.Option("--rows", help="Rows of the built-in dataset (used only without --config).")
]
HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="State directory (MLflow store, outputs). Default: ./.gpupipe"),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto | cpu | gpu (overrides the config).")
]


def _overrides(sets: list[str] | None, device: str | None) -> dict[str, Any]:
    from tasks.config import parse_override

    out = dict(parse_override(s) for s in sets or [])
    if device:
        out["device"] = device
    return out


def _config_arg(config: Path | None) -> str | None:
    if config is None:
        return None
    if not config.is_file():
        raise typer.BadParameter(f"{config}: config file not found", param_hint="--config")
    return str(config.resolve())


def _stage_inputs(
    config: Path | None, home: Path | None, device: str | None, sets: list[str] | None
) -> tuple[str | None, dict[str, Any], str | None]:
    """(config path, overrides, home) for a single-stage command; --home overrides a config's."""
    overrides = _overrides(sets, device)
    home_dir = str(home.resolve()) if home else None
    if home_dir and config:
        overrides["home"] = home_dir
    return _config_arg(config), overrides, home_dir


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2) from exc


@app.command()
def generate(
    rows: Annotated[
        int, typer.Option("--rows", help="Number of transactions.")
    ] = DEFAULT_BUILTIN_ROWS,
    out: Annotated[
        Path, typer.Option("--out", help="Output directory for partitioned parquet.")
    ] = Path("data/transactions"),
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    rows_per_file: Annotated[
        int, typer.Option("--rows-per-file", help="Rows per parquet file.")
    ] = 1_000_000,
) -> None:
    """Write the built-in, seeded card-transaction dataset as partitioned parquet."""
    from tasks.generate import generate_transactions

    n_files = -(-rows // rows_per_file)
    with typer.progressbar(length=n_files, label=f"generating {rows:,} rows") as bar:
        done = [0]

        def advance(files_done: int, _rows_done: int) -> None:
            bar.update(files_done - done[0])
            done[0] = files_done

        try:
            paths = generate_transactions(
                rows, out, seed=seed, rows_per_file=rows_per_file, on_file_written=advance
            )
        except ValueError as exc:
            _fail(exc)
    typer.echo(f"{len(paths)} file(s) in {out}")


@app.command()
def run(
    config: ConfigOpt = None,
    rows: RowsOpt = DEFAULT_BUILTIN_ROWS,
    home: HomeOpt = None,
    device: DeviceOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the whole training pipeline: ETL, train, register (promotion gate), publish."""
    from flows.training_pipeline import training_pipeline
    from tasks.config import ConfigError
    from tasks.io import DataError

    try:
        summary = training_pipeline(
            config_path=_config_arg(config),
            overrides=_overrides(set_, device),
            rows=rows,
            home=str(home.resolve()) if home else None,
        )
    except (ConfigError, DataError) as exc:
        _fail(exc)
    _print_summary(summary)


@app.command()
def etl(
    config: ConfigOpt = None,
    rows: RowsOpt = DEFAULT_BUILTIN_ROWS,
    home: HomeOpt = None,
    device: DeviceOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run only the ETL stage (cached by input fingerprint) and print where it wrote."""
    from flows.etl import etl_flow

    config_path, overrides, home_dir = _stage_inputs(config, home, device, set_)
    out = etl_flow(config_path, overrides, rows=rows, home=home_dir)
    typer.echo(json.dumps(out, indent=2))


@app.command()
def train(
    config: ConfigOpt = None,
    rows: RowsOpt = DEFAULT_BUILTIN_ROWS,
    home: HomeOpt = None,
    device: DeviceOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run ETL (reused when cached) and training; print the model bundles and metrics."""
    from flows.etl import etl_flow
    from flows.train import train_flow
    from tasks.pipeline import config_with_overrides
    from tasks.prefect_tasks import prepare_config_task, resolve_backend_task

    config_path, overrides, home_dir = _stage_inputs(config, home, device, set_)
    path = prepare_config_task.fn(config_path, overrides, rows, home_dir)
    resolved = resolve_backend_task.fn(config_with_overrides(path, overrides).device)
    etl_out = etl_flow(path, overrides, device=resolved)
    trained = train_flow(path, etl_out, resolved, overrides)
    typer.echo(
        json.dumps(
            [{k: t[k] for k in ("kind", "bundle_dir", "metrics")} for t in trained], indent=2
        )
    )


@app.command()
def publish(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Publish the current champions to the Triton model repository (atomically)."""
    from flows.publish import publish_flow
    from tasks.pipeline import HomeLayout, config_with_overrides

    overrides = _overrides(set_, None)
    if config is None:
        layout = HomeLayout((home or Path(".gpupipe")).resolve())
        path = str(layout.builtin_config)
    else:
        path = _config_arg(config) or ""
        if home:
            overrides["home"] = str(home.resolve())
    cfg = config_with_overrides(path, overrides)
    names = [cfg.model_name("xgboost"), *([cfg.model_name("mlp")] if cfg.model.mlp.enabled else [])]
    typer.echo(json.dumps(publish_flow(path, names, overrides), indent=2))


def _print_summary(summary: dict[str, Any]) -> None:
    typer.secho("\ngpupipe run complete", bold=True)
    typer.echo(
        f"  backend: {summary['backend']}   data: {summary['data_fingerprint']}   rows: {summary['rows']}"
    )
    for m in summary["models"]:
        met = m["metrics"]
        typer.echo(
            f"  {m['name']} v{m['version']}: ROC AUC {met['roc_auc']:.4f}  PR AUC {met['pr_auc']:.4f}  "
            f"log loss {met['log_loss']:.4f}  -> {m['alias']} ({m['reason']})"
        )
    for skipped in summary.get("not_published", []):
        typer.echo(f"  not published: {skipped['name']}: {skipped['reason']}")
    typer.echo(f"  Triton repository: {summary['triton_repository']}")
    typer.echo(f"  MLflow: {summary['tracking_uri']}")


app.command("score")(score_command)
app.command("serve")(serve_command)


def quiet_embedded_prefect_server() -> None:
    """Turn off the usage telemetry of the temporary Prefect API a run starts (no PREFECT_API_URL)
    unless the user chose: its background writes race the run's own on the server's SQLite file
    and fill the log with "database is locked" tracebacks."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


def heartbeats_reach_a_server(api_url: str | None, environ: Mapping[str, str]) -> bool:
    """Whether flow-run heartbeats are worth sending: there is a Prefect server that outlives
    this process (`api_url`), or the user set the heartbeat frequency themselves.

    Heartbeats let a server's automation mark a crashed run as crashed. The temporary API that a
    run without PREFECT_API_URL starts dies with the run's process, so nothing is left to notice
    missing heartbeats; and Prefect 3.8's flow engine, when a flow call ends, waits for its
    heartbeat thread, which sleeps in whole seconds: up to a second per flow call
    (docs/benchmarks.md, eighth session)."""
    return bool(api_url) or any(environ.get(name) for name in HEARTBEAT_ENV)


@contextmanager
def embedded_api_without_heartbeats() -> Iterator[None]:
    """Within: Prefect's flow-run heartbeats off when they would reach no server (see
    `heartbeats_reach_a_server`); unchanged otherwise."""
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    if heartbeats_reach_a_server(get_current_settings().api.url, os.environ):
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@contextmanager
def cli_prefect_settings() -> Iterator[None]:
    """Within: the Prefect settings that `gpupipe` runs its flows under (no usage telemetry from
    a temporary API, no heartbeats that would reach no server)."""
    quiet_embedded_prefect_server()
    with embedded_api_without_heartbeats():
        yield


def main() -> None:
    with cli_prefect_settings():
        app()


if __name__ == "__main__":
    main()
