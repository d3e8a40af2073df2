"""MLflow as a side channel: runs, metrics, images and tags. The DVC outputs remain the record.

Tracking is on by default with a sqlite store in the repository root (`mlflow.db`, artifacts in `mlartifacts/`).
`MLFLOW_TRACKING_URI` points it at a server instead, and `tracking.enabled: false` turns it off: then every call here
is a no-op by request, not by accident. A server that does not answer fails the stage at its start, in seconds.

`dvc exp run --queue` runs each experiment in a copy under `<repo>/.dvc/tmp/exps/tmpXXXX`; the store is resolved to
the enclosing repository so those runs land in the same database as `dvc repro`. A relative store path in
MLFLOW_TRACKING_URI (`sqlite:///mlflow.db`, `mlruns`) is resolved there too, so every stage and every Ray worker
uses one store whatever its working directory.

Credentials in the URI (`https://user:password@host`) are used by this process only: `public_uri` strips them from
everything written or printed (tracking.json, the train run's config that Ray workers receive, error messages).
Workers on other nodes authenticate the MLflow way, with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or
MLFLOW_TRACKING_TOKEN in their own environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.params.load import load_section
from pipeline.params.tracking import TrackingParams

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
CONNECT_TIMEOUT_S = 5.0  # a server that does not accept a TCP connection in this time is reported as down
HOSTED_STORES = ("databricks", "databricks-uc", "uc")  # bare words MLflow reads as hosted stores, not paths
SECRET_WORDS = ("password", "passwd", "secret", "token", "key")  # query parameters public_uri drops


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
    """MLFLOW_TRACKING_URI with a relative store path made absolute against the repository, else the local store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return absolute_store_uri(uri, repo_root(root)) if uri else local_store_uri(root)


def absolute_store_uri(uri: str, root: Path) -> str:
    """`uri` with a relative sqlite or file-store path resolved against `root`; any other URI unchanged."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        return uri if path.is_absolute() else f"sqlite:///{root / path}"
    if uri.startswith("file:") and not uri.startswith("file:/"):  # file:relative/path
        return (root / uri.removeprefix("file:")).as_uri()
    if uri not in HOSTED_STORES and "://" not in uri and ":" not in uri.split("/")[0]:  # a bare path: a file store
        return str(root / uri)
    return uri


def public_uri(uri: str | None) -> str | None:
    """`uri` without the `user:password@` it may carry, and without query values that name a secret: what may be
    written to a file, sent to other processes' configs or printed."""
    if not uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    query = urllib.parse.urlencode(
        [
            (k, v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if not any(word in k.lower() for word in SECRET_WORDS)
        ]
    )
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def check_store(uri: str) -> None:
    """Fail now, in one line, on a URI no MLflow store accepts, a sqlite file in a missing directory, or a server
    that does not answer."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # MLflow's own scheme table
    except ImportError:  # a future MLflow moved it: the store itself reports a bad URI later
        _tracking_store_registry = None
    if _tracking_store_registry is not None:
        try:
            _tracking_store_registry.get_store_builder(uri)
        except MlflowException as e:
            raise TrackingError(
                f"MLFLOW_TRACKING_URI {public_uri(uri)!r} is not a tracking store MLflow knows: use "
                "http(s)://host:port, sqlite:///path.db, a directory, or unset it for the local "
                "store (mlflow.db)"
            ) from e
        if urllib.parse.urlsplit(uri).scheme in ("", "file"):  # a file store: cheap to open, and MLflow may refuse it
            try:
                _tracking_store_registry.get_store(uri)
            except MlflowException as e:
                raise TrackingError(
                    f"MLflow refuses the file store {public_uri(uri)} (newer MLflow opens one only "
                    "with MLFLOW_ALLOW_FILE_STORE=true): set that, or use sqlite:///path.db"
                ) from e
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).parent.is_dir():
        raise TrackingError(
            f"the directory of the sqlite store {uri} does not exist: create it, or point MLFLOW_TRACKING_URI elsewhere"
        )
    check_reachable(uri)


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
            "the local store (mlflow.db), or set tracking.enabled: false"
        ) from e


def load_tracking(params_path: str | Path) -> TrackingParams:
    """The `tracking` section of the params file; when tracking is on, its server is checked before any work."""
    params = load_section(TrackingParams, "tracking", params_path)
    if params.enabled:
        check_store(tracking_uri())
    return params


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside the database (MLflow would use ./mlruns of whatever the working
    directory is); a tracking server or a file store decides for itself."""
    if uri.startswith("sqlite:///"):
        database = Path(absolute_store_uri(uri, repo_root()).removeprefix("sqlite:///"))
        return (database.parent / ARTIFACT_DIR).as_uri()
    return None


def use_recorded_store(recorded: str) -> None:
    """Point this process's MLflow at the store a driver recorded (without credentials, `public_uri`), as a worker
    that may run in another directory or on another node. A process whose MLFLOW_TRACKING_URI already names that
    store keeps it, with any credentials it carries (in-process training, or a local Ray started by the driver)."""
    current = os.environ.get("MLFLOW_TRACKING_URI")
    if not current or public_uri(current) != recorded:
        os.environ["MLFLOW_TRACKING_URI"] = recorded


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
            check_store(self.uri)
            mlflow.set_tracking_uri(self.uri)  # note: this also exports MLFLOW_TRACKING_URI to child processes
            self._ensure_experiment()

    def _ensure_experiment(self) -> None:
        mlflow = self._mlflow
        if mlflow.get_experiment_by_name(self.experiment) is None:
            mlflow.create_experiment(self.experiment, artifact_location=artifact_location(self.uri))
        mlflow.set_experiment(self.experiment)

    def start(
        self, run_name: str, params: dict[str, Any], tags: dict[str, str], system_metrics: bool = True
    ) -> str | None:
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


def log_to_training_run(
    params: TrackingParams,
    dit_dir: str | Path,
    metrics: dict,
    prefix: str,
    images: dict[str, np.ndarray] | None = None,
    artifacts: dict[str, str] | None = None,
) -> str | None:
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
