"""`gpupipe score` (one batch-scoring run from the shell) and `gpupipe serve` (run the scoring
deployments' schedules in this process). flows/cli.py registers both on the `gpupipe` app."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_DEPLOYMENTS = Path("deployments") / "prefect.yaml"
SCORERS = ("xgboost", "onnx")
DEVICES = ("auto", "cpu", "gpu")
FLOW_FUNCTION = "batch_scoring"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def score_command(
    input_path: Annotated[
        str,
        typer.Option(
            "--input",
            "-i",
            help="Input partitions: a directory, a glob or one file of parquet/CSV with the "
            "dataset's raw columns.",
        ),
    ],
    output_dir: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Where predictions go: one parquet per input file, plus _manifest/ (per-file "
            "records, run summaries) and _models/. Workers must be able to write here.",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model reference: models:/<name>@<alias> or models:/<name>/<version>. "
            "Default: the config's XGBoost champion, models:/<prefix>-xgboost@champion.",
        ),
    ] = None,
    scorer: Annotated[
        str,
        typer.Option(
            "--scorer",
            help="How workers score: xgboost (native booster, in-process) or onnx (the bundle's "
            "ONNX model in ONNX Runtime, in-process).",
        ),
    ] = "xgboost",
    cluster: Annotated[
        str,
        typer.Option(
            "--cluster",
            help="'local' (a dask cluster started for this run: one worker per GPU, or one per "
            "core on CPU) or the address of a running dask scheduler, e.g. tcp://host:8786.",
        ),
    ] = "local",
    partition_rows: Annotated[
        int | None,
        typer.Option(
            "--partition-rows",
            min=1,
            help="Rows a worker reads, scores and writes at once; bigger files are streamed in "
            "chunks of this many rows. Default: scoring.partition_rows of the config.",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="auto | cpu | gpu (overrides the config's device)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML config (registry, scoring and cluster sections). Omitted: the built-in "
            "dataset's config in --home, else defaults.",
        ),
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home", help="State directory holding the MLflow store. Default: ./.gpupipe"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override a config key, e.g. --set scoring.max_quarantined_fraction=0.01 or "
            "--set cluster.n_workers=4 (repeatable).",
        ),
    ] = None,
) -> None:
    """Score new input partitions with a registered model, once, and print the run summary.

    Re-running skips files already scored by the same model version; a new version rescores.
    Exits 1 when more rows were quarantined than scoring.max_quarantined_fraction allows.
    """
    from flows.batch_scoring import batch_scoring
    from tasks.config import ConfigError, parse_override
    from tasks.scoring import LAST_RUN_FILE, QuarantineExceeded, manifest_dir

    if scorer not in SCORERS:
        raise typer.BadParameter(f"expected one of {', '.join(SCORERS)}", param_hint="--scorer")
    if device is not None and device not in DEVICES:
        raise typer.BadParameter(f"expected one of {', '.join(DEVICES)}", param_hint="--device")
    if config is not None and not config.is_file():
        raise typer.BadParameter(f"{config}: config file not found", param_hint="--config")
    try:
        overrides = dict(parse_override(s) for s in set_ or [])
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from exc
    out = output_dir.expanduser().resolve()
    state = batch_scoring(
        input_path=input_path,
        output_dir=str(out),
        model_uri=model,
        scorer=scorer,  # type: ignore[arg-type]
        cluster=cluster,
        partition_rows=partition_rows,
        device=device,  # type: ignore[arg-type]
        config_path=str(config.resolve()) if config else None,
        overrides=overrides,
        home=str(home.resolve()) if home else None,
        return_state=True,
    )
    if state.is_completed():
        _print_summary(state.result())
        return
    error = state.result(raise_on_failure=False)
    if isinstance(error, QuarantineExceeded):
        last = manifest_dir(out) / LAST_RUN_FILE
        if last.is_file():
            _print_summary(json.loads(last.read_text()))
        _fail(str(error), code=1)
    _fail(str(error) if isinstance(error, BaseException) else f"run ended {state.name}", code=2)


def _print_summary(summary: dict[str, Any]) -> None:
    rows, files = summary["rows"], summary["files"]
    model = summary["model"]
    ok = not summary.get("failed")
    typer.secho(
        f"\nbatch scoring {'complete' if ok else 'FAILED'}: {model['name']} v{model['version']}",
        bold=True,
        fg=None if ok else typer.colors.RED,
    )
    typer.echo(
        f"  rows: {rows['in']:,} in = {rows['scored']:,} scored + {rows['quarantined']:,} "
        f"quarantined   ({summary['rows_per_second']:,.0f} rows/s, {summary['device']}, "
        f"{summary['workers']} worker(s))"
    )
    typer.echo(
        f"  files: {files['scored']} scored, {files['quarantined']} quarantined, "
        f"{files['skipped']} already done"
    )
    for q in summary["quarantined"][:10]:
        typer.echo(f"  quarantined: {q['reason']}")
    drifting = {k: v for k, v in summary["drift_psi"].items() if v is not None and v >= 0.1}
    if drifting:
        shown = ", ".join(
            f"{k} {v:.3f}" for k, v in sorted(drifting.items(), key=lambda kv: -kv[1])
        )
        typer.echo(f"  drift (PSI >= 0.1): {shown}")
    if summary.get("failure"):
        typer.echo(f"  {summary['failure']}")
    typer.echo(f"  output: {summary['output']}")


# ---------------------------------------------------------------- serve


@dataclass(frozen=True)
class ScheduleSpec:
    cron: str
    timezone: str | None = None
    active: bool = True


@dataclass(frozen=True)
class DeploymentSpec:
    """One batch_scoring deployment of a Prefect project file."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[ScheduleSpec, ...] = ()
    description: str | None = None
    tags: tuple[str, ...] = ()


def load_scoring_deployments(path: Path) -> list[DeploymentSpec]:
    """The deployments of `batch_scoring` in a prefect.yaml (others are ignored)."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path}: deployments file not found")
    doc = yaml.safe_load(path.read_text()) or {}
    found = []
    for d in doc.get("deployments") or []:
        if not str(d.get("entrypoint", "")).endswith(f":{FLOW_FUNCTION}"):
            continue
        schedules = tuple(
            ScheduleSpec(str(s["cron"]), s.get("timezone"), bool(s.get("active", True)))
            for s in d.get("schedules") or []
            if s.get("cron")
        )
        found.append(
            DeploymentSpec(
                name=str(d["name"]),
                parameters=dict(d.get("parameters") or {}),
                schedules=schedules,
                description=d.get("description"),
                tags=tuple(d.get("tags") or ()),
            )
        )
    return found


def runner_deployments(
    specs: list[DeploymentSpec], cron: str | None = None, timezone: str | None = None
) -> list[Any]:
    """Prefect RunnerDeployments of batch_scoring for `prefect.serve`; `cron` replaces the file's
    schedules (for trying a schedule out)."""
    from prefect.schedules import Cron

    from flows.batch_scoring import batch_scoring

    out = []
    for spec in specs:
        scheds = (
            [ScheduleSpec(cron, timezone)]
            if cron
            else [ScheduleSpec(s.cron, timezone or s.timezone, s.active) for s in spec.schedules]
        )
        out.append(
            batch_scoring.to_deployment(
                name=spec.name,
                schedules=[Cron(s.cron, timezone=s.timezone, active=s.active) for s in scheds],
                parameters=spec.parameters,
                description=spec.description,
                tags=list(spec.tags),
            )
        )
    return out


def _default_deployments_file() -> Path:
    if DEFAULT_DEPLOYMENTS.is_file():
        return DEFAULT_DEPLOYMENTS
    return Path(__file__).resolve().parent.parent / DEFAULT_DEPLOYMENTS


def serve_command(
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            help="Prefect project file whose batch_scoring deployments are served. Default: "
            "deployments/prefect.yaml (in the current directory, else next to gpupipe).",
        ),
    ] = None,
    name: Annotated[
        list[str] | None,
        typer.Option(
            "--name",
            "-n",
            help="Serve only the deployment(s) with this name (repeatable). Default: all.",
        ),
    ] = None,
    cron: Annotated[
        str | None,
        typer.Option(
            "--cron",
            help="Replace the file's schedules with this cron string, e.g. '*/10 * * * *'.",
        ),
    ] = None,
    timezone: Annotated[
        str | None,
        typer.Option("--timezone", help="IANA time zone of the schedules, e.g. Europe/Paris."),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Most flow runs this process runs at once."),
    ] = None,
) -> None:
    """Run the batch-scoring schedules locally: this process registers the deployments with the
    Prefect API and starts their flow runs when due (Ctrl-C stops). Needs a Prefect server that
    outlives this process (prefect server start, or PREFECT_API_URL)."""
    from prefect import serve

    path = file or _default_deployments_file()
    try:
        specs = load_scoring_deployments(path)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if name:
        unknown = sorted(set(name) - {s.name for s in specs})
        if unknown:
            _fail(f"{path}: no batch_scoring deployment named {', '.join(unknown)}")
        specs = [s for s in specs if s.name in name]
    if not specs:
        _fail(f"{path}: no deployment with entrypoint ...:{FLOW_FUNCTION}")
    deployments = runner_deployments(specs, cron, timezone)
    for spec in specs:
        when = cron or ", ".join(s.cron for s in spec.schedules) or "no schedule"
        typer.echo(f"serving {FLOW_FUNCTION}/{spec.name} ({when})")
    serve(*deployments, limit=limit)
