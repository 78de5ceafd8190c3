"""Pure helpers the training flows share: the state directory layout, the built-in config,
model cards and run summaries. No Prefect here; flows/ and tasks/prefect_tasks.py wrap them."""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import ConfigError, PipelineConfig, builtin_config, load_config

DEFAULT_BUILTIN_ROWS = 1_000_000
BUILTIN_CONFIG_FILE = "builtin_config.toml"
LAST_RUN_FILE = "last_run.json"


@dataclass(frozen=True)
class HomeLayout:
    """Where a run keeps its state, all under one `home` directory."""

    home: Path

    @property
    def etl_root(self) -> Path:
        return self.home / "etl"

    @property
    def models_root(self) -> Path:
        return self.home / "models"

    @property
    def bundle_cache(self) -> Path:
        return self.home / "bundles"

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlartifacts"

    def builtin_data(self, rows: int) -> Path:
        return self.home / "data" / f"builtin-{rows}"

    @property
    def builtin_config(self) -> Path:
        return self.home / BUILTIN_CONFIG_FILE

    @property
    def last_run(self) -> Path:
        return self.home / LAST_RUN_FILE


def config_with_overrides(config_path: str, overrides: Mapping[str, Any] | None) -> PipelineConfig:
    try:
        return load_config(config_path, dict(overrides or {}))
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{config_path}: {exc}") from exc


def toml_value(value: Any) -> str:
    """A Python value as TOML (for the small configs written here)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def config_to_toml(cfg: PipelineConfig) -> str:
    """Serialize a config to TOML that `load_config` reads back to an equal config."""
    tree = cfg.model_dump(exclude_none=True)
    lines = [f"# written by gpupipe; edit freely\ndevice = {toml_value(tree.pop('device'))}"]
    for key in [k for k, v in tree.items() if not isinstance(v, dict)]:  # top-level settings
        lines.append(f"{key} = {toml_value(tree.pop(key))}")
    for section, body in tree.items():
        lines.append(f"\n[{section}]")
        for key, value in body.items():
            if isinstance(value, dict):
                continue
            lines.append(f"{key} = {toml_value(value)}")
        for key, value in body.items():
            if isinstance(value, dict):
                lines.append(f"\n[{section}.{key}]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in value.items())
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)
    return text


def write_builtin_config(data_dir: Path, home: Path, overrides: Mapping[str, Any]) -> Path:
    """Write the built-in dataset's config into home, so every stage reads one file."""
    cfg = builtin_config(data_dir, home, **dict(overrides))
    path = HomeLayout(home).builtin_config
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, config_to_toml(cfg))
    return path


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def finite_or_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def metrics_table(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per model for the Prefect table artifact and the CLI summary."""
    rows = []
    for r in results:
        m = r["metrics"]
        rows.append(
            {
                "model": r["name"],
                "version": r["version"],
                "roc_auc": round(m["roc_auc"], 5),
                "pr_auc": round(m["pr_auc"], 5),
                "log_loss": round(m["log_loss"], 5),
                "test_rows": int(m["rows"]),
                "decision": "champion" if r["promoted"] else "challenger",
                "reason": r["reason"],
            }
        )
    return rows


def model_card(
    cfg: PipelineConfig,
    etl: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    backend: str,
    repo: str,
) -> str:
    """A markdown model card: data, features, metrics and the promotion decision."""
    rows = etl["rows"]
    lines = [
        "# gpupipe model card",
        "",
        "## Data",
        f"- source: `{cfg.data.source}`",
        f"- rows: train {rows['train']:,}, valid {rows['valid']:,}, test {rows['test']:,}",
        f"- split: {'time-ordered on `' + cfg.data.timestamp + '`' if cfg.data.timestamp else 'seeded stratified'}",
        f"- data fingerprint: `{etl['fingerprint']}`",
        f"- backend: **{backend}**",
        "",
        "## Models (test split)",
        "",
        "| model | version | ROC AUC | PR AUC | log loss | decision |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["metrics"]
        decision = "champion" if r["promoted"] else "challenger"
        lines.append(
            f"| {r['name']} | {r['version']} | {m['roc_auc']:.4f} | {m['pr_auc']:.4f} "
            f"| {m['log_loss']:.4f} | {decision} |"
        )
    lines += ["", "## Promotion decisions", ""]
    lines += [f"- **{r['name']} v{r['version']}**: {r['reason']}" for r in results]
    lines += ["", f"Triton model repository: `{repo}`", ""]
    return "\n".join(lines)
