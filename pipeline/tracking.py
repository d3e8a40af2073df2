"""MLflow as a side channel: runs, metrics, images and tags. The DVC outputs remain the record.

Tracking is on by default with a sqlite store in the repository root (`mlflow.db`, artifacts in `mlartifacts/`).
`MLFLOW_TRACKING_URI` points it at a server instead, and `tracking.enabled: false` turns it off: then every call here
is a no-op by request, not by accident. A server that does not answer fails the stage at its start, in seconds.

`dvc exp run --queue` runs each experiment in a copy under `<repo>/.dvc/tmp/exps/tmpXXXX`; the store is resolved to
the enclosing repository so those runs land in the same database as `dvc repro`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.params.load import load_section
from pipeline.errors import UserError
from pipeline.params.tracking import TrackingParams

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
CONNECT_TIMEOUT_S = 5.0  # a server that does not accept a TCP connection in this time is reported as down




class TrackingError(UserError):
    """The MLflow tracking server named by MLFLOW_TRACKING_URI cannot be reached."""


def repo_root(start: str | Path | None = None) -> Path:
    """The DVC repository this run belongs to; a queued experiment's temp copy resolves to its parent repo."""
    path = Path(start or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for candidate in (path, *path.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return path


def local_store_uri(root: str | Path | None = None) -> str:
    return f"sqlite:///{repo_root(root) / STORE_FILE}"


def tracking_uri(root: str | Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(root)


def check_reachable(uri: str) -> None:
    """Fail now when `uri` is an HTTP(S) server that accepts no connection. MLflow's client would retry each request
    with exponential backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES = 7) and fail only after minutes."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return  # a sqlite or file store, or a hosted scheme MLflow resolves itself
    port = parts.port or (443 if parts.scheme == "https" else 80)
    server = f"{parts.scheme}://{parts.hostname}:{port}"  # without any credentials the URI may carry
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise TrackingError(
            f"cannot reach the MLflow tracking server {server} ({e.strerror or type(e).__name__}): start it "
            "(`mlflow server ...`), point MLFLOW_TRACKING_URI at a running one, unset MLFLOW_TRACKING_URI to use "
            "the local store (mlflow.db), or set tracking.enabled: false") from e


def load_tracking(params_path: str | Path) -> TrackingParams:
    """The `tracking` section of the params file; when tracking is on, its server is checked before any work."""
    params = load_section(TrackingParams, "tracking", params_path)
    if params.enabled:
        check_reachable(tracking_uri())
    return params


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside the database (MLflow would use ./mlruns of whatever the working
    directory is); a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACT_DIR).as_uri()
    return None


def git_commit(root: str | Path | None = None) -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(root), capture_output=True, text=True)
    if result.returncode != 0:  # not a git checkout (e.g. an exported copy): the tag is simply absent
        return None
    return result.stdout.strip()


def run_tags(**extra: Any) -> dict[str, str]:
    """Tags every run carries: the code version, the DVC experiment and the versions of the number-changing packages."""
    from pipeline.provenance import package_versions

    versions = {f"version.{name}": v for name, v in package_versions().items()}
    tags = {"git_commit": git_commit(), "dvc_experiment": os.environ.get("DVC_EXP_NAME"), **versions, **extra}
    return {k: str(v) for k, v in tags.items() if v is not None}


class Tracker:
    """One MLflow run, created by `train` and re-opened by later stages through its run id."""

    def __init__(self, params: TrackingParams, run_id: str | None = None):
        self.enabled = params.enabled
        self.experiment = params.experiment
        self.run_id = run_id
        if self.enabled:
            import mlflow

            self._mlflow = mlflow
            self.uri = tracking_uri()
            check_reachable(self.uri)
            mlflow.set_tracking_uri(self.uri)  # note: this also exports MLFLOW_TRACKING_URI to child processes
            self._ensure_experiment()

    def _ensure_experiment(self) -> None:
        mlflow = self._mlflow
        if mlflow.get_experiment_by_name(self.experiment) is None:
            mlflow.create_experiment(self.experiment, artifact_location=artifact_location(self.uri))
        mlflow.set_experiment(self.experiment)

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str], system_metrics: bool = True) -> str | None:
        if not self.enabled:
            return None
        run = self._mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=system_metrics)
        self.run_id = run.info.run_id
        self._mlflow.log_params(_flatten(params))
        return self.run_id

    def resume(self, system_metrics: bool = False) -> None:
        """Re-open the run whose id an upstream stage recorded."""
        if self.enabled and self.run_id:
            self._mlflow.start_run(run_id=self.run_id, log_system_metrics=system_metrics)

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        if self.enabled:
            clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}
            self._mlflow.log_metrics(clean, step=step)

    def log_image(self, image: np.ndarray, key: str, step: int | None = None) -> None:
        """`image`: uint8 (H, W, 3)."""
        if self.enabled:
            self._mlflow.log_image(image, key=key, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def log_to_training_run(params: TrackingParams, dit_dir: str | Path, metrics: dict, prefix: str,
                        images: dict[str, np.ndarray] | None = None, artifacts: dict[str, str] | None = None) -> str | None:
    """Log a downstream stage's results into the training's run (its id is in `dit_dir/tracking.json`); a no-op
    when tracking is off or the training recorded no run. `images`: key -> uint8 (H, W, 3); `artifacts`: file ->
    artifact dir. Returns the run id used."""
    import json

    if not params.enabled:
        return None
    record = Path(dit_dir) / "tracking.json"
    run_id = json.loads(record.read_text()).get("mlflow_run_id") if record.exists() else None
    if run_id is None:
        return None
    tracker = Tracker(params, run_id)
    tracker.resume()
    try:
        tracker.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()})
        for key, image in (images or {}).items():
            tracker.log_image(image, key=key)
        for path, artifact_path in (artifacts or {}).items():
            tracker.log_artifact(path, artifact_path=artifact_path)
    finally:
        tracker.end()
    return run_id
