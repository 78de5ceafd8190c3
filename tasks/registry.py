"""MLflow tracking and model registry: log a training run with its bundle as plain artifacts,
register it as a model version, decide and record promotion by alias, resolve and download.

Every function takes the tracking URI and builds its own `MlflowClient`, so nothing here reads or
changes MLflow's process-global tracking URI. No pickling flavors: a bundle is a directory of files
logged with `log_artifacts` and registered by its artifact URI.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from tasks.train import BUNDLE_FILE

PromotionMetric = Literal["roc_auc", "pr_auc", "log_loss"]
HIGHER_IS_BETTER: dict[str, bool] = {"roc_auc": True, "pr_auc": True, "log_loss": False}
CHAMPION = "champion"
CHALLENGER = "challenger"
PLOTS_DIR = "plots"
ARTIFACTS_DIRNAME = "mlartifacts"
NONFINITE_METRICS_TAG = "gpupipe.nonfinite_metrics"
_DOWNLOAD_MARKER = ".download.json"

# mlflow.utils.validation's limits (MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH,
# MAX_TAG_VAL_LENGTH), copied so a private import cannot break us.
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
# Characters MLflow accepts in param/metric/tag names (its Windows set, so no colon).
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))/?$")


@dataclass(frozen=True)
class ModelRef:
    """One registered model version."""

    name: str
    version: int
    run_id: str
    source: str
    aliases: tuple[str, ...]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class PromotionDecision:
    """Whether a challenger replaces the champion, and why, in words with both numbers."""

    promote: bool
    reason: str
    metric: str
    challenger: float
    champion: float | None


# ---------------------------------------------------------------- promotion (pure)


def decide_promotion(
    metric: str, challenger: float, champion: float | None, min_improvement: float = 0.0
) -> PromotionDecision:
    """Promote when the challenger beats the champion on `metric` by more than `min_improvement`.

    log_loss is lower-is-better, the AUCs higher-is-better. A NaN challenger never promotes; a
    missing or NaN champion is replaced by any non-NaN challenger. Differences within float
    rounding of `min_improvement` count as ties, so 0.81 vs 0.80 does not beat a 0.01 margin.
    """
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown promotion metric {metric!r}; expected one of {_metric_names()}")
    if not min_improvement >= 0.0:
        raise ValueError(f"min_improvement must be >= 0, got {min_improvement}")
    higher = HIGHER_IS_BETTER[metric]
    direction = "higher" if higher else "lower"

    def decision(promote: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(promote, reason, metric, challenger, champion)

    if math.isnan(challenger):
        current = "no current champion" if champion is None else f"champion {_fmt(champion)}"
        return decision(
            False,
            f"challenger {metric} is NaN (undefined when the test split holds a single class); "
            f"not promoting ({current})",
        )
    if champion is None:
        return decision(True, f"no current champion; challenger {metric} is {_fmt(challenger)}")
    if math.isnan(champion):
        return decision(
            True, f"champion {metric} is NaN; challenger {metric} {_fmt(challenger)} replaces it"
        )
    gain = challenger - champion if higher else champion - challenger
    beats = gain > min_improvement and not math.isclose(
        gain, min_improvement, rel_tol=1e-9, abs_tol=1e-12
    )
    if beats:
        return decision(
            True,
            f"challenger {metric} {_fmt(challenger)} beats champion {_fmt(champion)} by "
            f"{_fmt(gain)} ({direction} is better, min_improvement {min_improvement:g})",
        )
    return decision(
        False,
        f"challenger {metric} {_fmt(challenger)} does not beat champion {_fmt(champion)} by more "
        f"than {min_improvement:g} ({direction} is better)",
    )


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


def _metric_names() -> list[str]:
    return sorted(HIGHER_IS_BETTER)


# ---------------------------------------------------------------- clients and experiments


def local_artifact_root(tracking_uri: str) -> Path | None:
    """`<home>/mlartifacts` for `sqlite:///<home>/mlflow.db`; None for other stores."""
    db = _sqlite_path(tracking_uri)
    return None if db is None else db.parent / ARTIFACTS_DIRNAME


def _sqlite_path(tracking_uri: str) -> Path | None:
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = tracking_uri[len(prefix) :].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path).resolve()


def client_for(tracking_uri: str) -> MlflowClient:
    """A client whose tracking and registry stores are both `tracking_uri`.

    For SQLite the database's folder is created here, on first use, because SQLite will not.
    """
    db = _sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    # registry_uri given explicitly so MLFLOW_REGISTRY_URI or global state cannot split the two
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(
    client_or_uri: MlflowClient | str, name: str, artifact_root: Path | None = None
) -> str:
    """Id of experiment `name`, creating (or restoring) it if needed.

    Args:
        artifact_root: where a new experiment stores artifacts; None means `<home>/mlartifacts`
            for a SQLite store and the server's default otherwise. Ignored if it exists.
    """
    client = client_for(client_or_uri) if isinstance(client_or_uri, str) else client_or_uri
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            client.restore_experiment(existing.experiment_id)
        return str(existing.experiment_id)
    root = artifact_root if artifact_root is not None else local_artifact_root(client.tracking_uri)
    location = None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        location = root.resolve().as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException as exc:
        # another process created it between our lookup and create
        if not _is_taken(exc):
            raise
        again = client.get_experiment_by_name(name)
        if again is None:
            raise
        return str(again.experiment_id)


# ---------------------------------------------------------------- logging a run


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings become dotted keys; values become strings within MLflow's limits."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{dotted}."))
        else:
            flat[_safe_key(dotted)] = _truncate(_as_text(value), _MAX_PARAM_VALUE)
    return flat


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return json.dumps(list(value), default=str)
    return str(value)


def _safe_key(key: str) -> str:
    key = _BAD_KEY_CHARS.sub("_", key)
    if len(key) <= _MAX_KEY:
        return key
    # keep keys distinct after cutting: end with a hash of the full key
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{key[: _MAX_KEY - 9]}~{digest}"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_metrics(metrics: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """Finite metrics to log, and the names of NaN/inf ones MLflow charts cannot show."""
    finite = {_safe_key(k): float(v) for k, v in metrics.items() if math.isfinite(v)}
    skipped = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    return finite, skipped


def log_training_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    *,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    bundle_dir: Path,
    artifact_path: str = "bundle",
    figures: Mapping[str, Path] | None = None,
    tags: Mapping[str, str] | None = None,
    artifact_root: Path | None = None,
) -> str:
    """Log one training run: params, metrics, tags, the bundle directory and figures.

    Args:
        params: may be nested; logged flattened with dotted keys.
        metrics: NaN/inf values are not logged; their names go to the `gpupipe.nonfinite_metrics`
            tag instead.
        bundle_dir: the bundle directory (must hold bundle.json); its files are logged under
            `artifact_path`.
        figures: label -> image file; each is logged under `plots/` with its file name.
        tags: e.g. data fingerprint, git commit, backend.
        artifact_root: see `ensure_experiment`.

    Returns:
        The run id. The run is FINISHED, or FAILED if logging raised.
    """
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / BUNDLE_FILE).is_file():
        raise FileNotFoundError(f"{bundle_dir}: not a model bundle (no {BUNDLE_FILE})")
    missing = [str(p) for p in (figures or {}).values() if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"figures not found: {missing}")
    client = client_for(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, artifact_root)
    finite, skipped = split_metrics(metrics)
    run_tags = {_safe_key(k): _truncate(str(v), _MAX_TAG_VALUE) for k, v in (tags or {}).items()}
    if skipped:
        run_tags[NONFINITE_METRICS_TAG] = ",".join(skipped)
    run = client.create_run(experiment_id, run_name=run_name)
    run_id = str(run.info.run_id)
    try:
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in finite.items()],
            params=[Param(k, v) for k, v in flatten_params(params).items()],
            tags=[RunTag(k, v) for k, v in run_tags.items()],
        )
        client.log_artifacts(run_id, str(bundle_dir), artifact_path)
        for path in (figures or {}).values():
            client.log_artifact(run_id, str(path), PLOTS_DIR)
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id


def run_metric(tracking_uri: str, run_id: str, metric: str) -> float | None:
    """A run's latest value of `metric`, or None if it was not logged (e.g. it was NaN)."""
    value = client_for(tracking_uri).get_run(run_id).data.metrics.get(metric)
    return None if value is None else float(value)


# ---------------------------------------------------------------- registry


def _ref(mv: ModelVersion) -> ModelRef:
    return ModelRef(
        name=str(mv.name),
        version=int(mv.version),
        run_id=str(mv.run_id or ""),
        source=str(mv.source),
        aliases=tuple(sorted(mv.aliases or ())),
    )


def _is_missing(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def _is_taken(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_ALREADY_EXISTS"


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if not _is_taken(exc):
            raise


def register_bundle(
    tracking_uri: str,
    name: str,
    run_id: str,
    artifact_path: str = "bundle",
    tags: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
) -> ModelRef:
    """Register the bundle logged under `artifact_path` of run `run_id` as a new version of `name`.

    The version's source is the run's artifact URI joined with `artifact_path` (a plain
    directory: no MLmodel file is needed). The registered model is created if missing.
    """
    client = client_for(tracking_uri)
    artifact_path = artifact_path.strip("/")
    listed = {f.path for f in client.list_artifacts(run_id, artifact_path)}
    if f"{artifact_path}/{BUNDLE_FILE}" not in listed:
        raise FileNotFoundError(
            f"run {run_id} has no bundle at {artifact_path!r} (no {BUNDLE_FILE} there)"
        )
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    _ensure_registered_model(client, name)
    version_tags = {k: str(v) for k, v in (tags or {}).items()}
    mv = client.create_model_version(name, source, run_id, tags=version_tags)
    return _ref(_await_ready(client, mv, timeout_s))


def _await_ready(client: MlflowClient, mv: ModelVersion, timeout_s: float) -> ModelVersion:
    """Local stores answer READY at once; a remote registry may still be copying."""
    deadline = time.monotonic() + timeout_s
    while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
        time.sleep(1.0)
        mv = client.get_model_version(mv.name, mv.version)
    if mv.status != "READY":
        raise RuntimeError(f"model {mv.name} version {mv.version} is {mv.status}, not READY")
    return mv


def set_alias(tracking_uri: str, name: str, alias: str, version: int) -> None:
    """Point `models:/<name>@<alias>` at `version` (moving it if it pointed elsewhere)."""
    client_for(tracking_uri).set_registered_model_alias(name, alias, str(version))


def get_alias(tracking_uri: str, name: str, alias: str) -> ModelRef | None:
    """The version `alias` points at, or None if the model or the alias does not exist."""
    client = client_for(tracking_uri)
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        if _is_missing(exc):
            return None
        raise
    version = dict(aliases or {}).get(alias)
    if version is None:
        return None
    return _ref(client.get_model_version(name, str(version)))


def record_decision(tracking_uri: str, ref: ModelRef, decision: PromotionDecision) -> None:
    """Tag the version with the decision, reason and both metric values; on promote, move the
    `champion` alias to it. The caller sets `challenger`."""
    client = client_for(tracking_uri)
    champion = "none" if decision.champion is None else repr(decision.champion)
    tags = {
        "promotion_decision": "promoted" if decision.promote else "rejected",
        "promotion_reason": decision.reason,
        "promotion_metric": decision.metric,
        "promotion_challenger_value": repr(decision.challenger),
        "promotion_champion_value": champion,
    }
    for key, value in tags.items():
        client.set_model_version_tag(ref.name, str(ref.version), key, value)
    if decision.promote:
        client.set_registered_model_alias(ref.name, CHAMPION, str(ref.version))


def resolve_model_uri(tracking_uri: str, model_uri: str) -> ModelRef:
    """Resolve `models:/<name>@<alias>` or `models:/<name>/<version>` to a registered version.

    Raises:
        ValueError: malformed URI, or the model, alias or version does not exist.
    """
    match = _MODEL_URI.match(model_uri.strip())
    if match is None:
        raise ValueError(
            f"malformed model URI {model_uri!r}: expected models:/<name>@<alias> "
            f"or models:/<name>/<version>"
        )
    name, alias, version = match["name"], match["alias"], match["version"]
    if version is not None and not version.isdigit():
        raise ValueError(
            f"model URI {model_uri!r}: version must be a number (stages such as {version!r} are "
            f"not supported; use an alias, e.g. models:/{name}@{CHAMPION})"
        )
    client = client_for(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if _is_missing(exc):
            raise ValueError(f"model URI {model_uri!r}: no registered model {name!r}") from exc
        raise
    aliases = dict(model.aliases or {})
    if alias is not None:
        if alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise ValueError(f"model URI {model_uri!r}: {name!r} has no alias {alias!r} ({known})")
        version = str(aliases[alias])
    try:
        return _ref(client.get_model_version(name, str(int(version))))
    except MlflowException as exc:
        if _is_missing(exc):
            raise ValueError(f"model URI {model_uri!r}: {name!r} has no version {version}") from exc
        raise


# ---------------------------------------------------------------- download


def download_bundle(tracking_uri: str, ref: ModelRef, dest_root: Path) -> Path:
    """Download a version's artifacts to `dest_root/<name>/<version>/` and return the directory
    below it that holds bundle.json.

    A complete earlier download of the same version is reused. Files land in a temporary sibling
    that is renamed into place, so a crash never leaves a half bundle where a reader would take
    it for a whole one.
    """
    final = Path(dest_root) / ref.name / str(ref.version)
    if _cached(final, ref):
        return _bundle_root(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    uri = client_for(tracking_uri).get_model_version_download_uri(ref.name, str(ref.version))
    staging = Path(tempfile.mkdtemp(prefix=f".{ref.version}.", dir=final.parent))
    try:
        download_artifacts(
            artifact_uri=uri,
            dst_path=str(staging),
            tracking_uri=tracking_uri,
            registry_uri=tracking_uri,
        )
        _bundle_root(staging)  # refuse to install something that is not a bundle
        # written last: its presence in `final` is what marks a download complete
        (staging / _DOWNLOAD_MARKER).write_text(json.dumps(_marker(ref), sort_keys=True))
        _install(staging, final, ref)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _bundle_root(final)


def _marker(ref: ModelRef) -> dict[str, Any]:
    return {"name": ref.name, "version": ref.version, "run_id": ref.run_id, "source": ref.source}


def _cached(final: Path, ref: ModelRef) -> bool:
    """True when `final` holds a finished download of this very version (a registry rebuilt from
    scratch can reuse a name and version number for a different model)."""
    marker = final / _DOWNLOAD_MARKER
    try:
        return bool(json.loads(marker.read_text()) == _marker(ref))
    except (OSError, ValueError):
        return False


def _install(staging: Path, final: Path, ref: ModelRef) -> None:
    if final.exists():
        # unfinished, or another model from an older registry: replace it
        shutil.rmtree(final)
    try:
        os.replace(staging, final)
    except OSError:
        # a concurrent download finished first; keep its copy if it is this version
        if not _cached(final, ref):
            raise


def _bundle_root(directory: Path) -> Path:
    """`directory` itself if it holds bundle.json, else the shallowest folder below that does."""
    if (directory / BUNDLE_FILE).is_file():
        return directory
    found = sorted(directory.rglob(BUNDLE_FILE), key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"{directory}: downloaded artifacts hold no {BUNDLE_FILE}")
    return found[0].parent


# ---------------------------------------------------------------- provenance


def git_commit(repo_dir: Path) -> str:
    """Short commit sha of the checkout at `repo_dir`, or "unknown" (not a checkout, no git)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo_dir), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
