"""The tracking URIs users export (pipeline/tracking.py): relative and absolute sqlite, a tracking server and a file
store all take a real training run; a URI no store accepts is one line; credentials in the URI are written nowhere
(tracking.json, the config Ray workers get, the registered model's artifacts, error messages), and a worker elsewhere
authenticates from its own environment. Tiny training (tests/tiny_train.py) and a real `mlflow server` on
127.0.0.1."""

import json
import os
from pathlib import Path

import mlflow
import pytest
from conftest import NAME, export_dit, free_port, register, training_run, write_eval
from tiny_train import base_params, run

import pipeline.train as T
from pipeline import register as R, tracking
from pipeline.errors import UserError, one_line
from pipeline.params.tracking import TrackingParams
from pipeline.tracking import TrackingError

SECRET = "s3cret-7f2a"
ON = TrackingParams(enabled=True, experiment="uri-forms")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def server(tracking_server) -> str:
    """The session's tracking server (conftest), sqlite backend and its own artifact store, on 127.0.0.1."""
    return tracking_server[0]


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A DVC repository root as the working directory, as `dvc repro` runs its stages."""
    root = tmp_path / "repo"
    (root / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(root)
    yield root
    if mlflow.active_run():
        mlflow.end_run()


# --- the helpers ------------------------------------------------------------------------------------------------


def test_public_uri_strips_credentials_only():
    assert tracking.public_uri(f"https://alice:{SECRET}@mlflow.example:8443/x") == "https://mlflow.example:8443/x"
    assert tracking.public_uri(f"http://token:{SECRET}@10.0.0.2:5000") == "http://10.0.0.2:5000"
    assert (
        tracking.public_uri(f"postgresql://u:{SECRET}@db/mlflow?sslmode=require&password={SECRET}")
        == "postgresql://db/mlflow?sslmode=require"
    )
    for plain in ("sqlite:////abs/mlflow.db", "http://127.0.0.1:5000", "databricks", "/abs/mlruns", None):
        assert tracking.public_uri(plain) == plain


def test_relative_store_paths_resolve_against_the_repository(tmp_path):
    root = tmp_path
    assert tracking.absolute_store_uri("sqlite:///mlflow.db", root) == f"sqlite:///{root}/mlflow.db"
    assert tracking.absolute_store_uri("sqlite:///sub/m.db", root) == f"sqlite:///{root}/sub/m.db"
    assert tracking.absolute_store_uri("sqlite:////abs/m.db", root) == "sqlite:////abs/m.db"
    assert tracking.absolute_store_uri("mlruns", root) == f"{root}/mlruns"
    assert tracking.absolute_store_uri("file:mlruns", root) == (root / "mlruns").as_uri()
    for unchanged in ("/abs/mlruns", "file:///abs/mlruns", "http://h:1", "databricks", "postgresql://db/x"):
        assert tracking.absolute_store_uri(unchanged, root) == unchanged


# --- each form a user writes takes a training run ---------------------------------------------------------------


def store_forms(repo: Path, server: str) -> dict[str, tuple[str, str]]:
    """form -> (what the user exports, the store where the run must land)."""
    return {
        "relative sqlite": ("sqlite:///mlflow.db", f"sqlite:///{repo / 'mlflow.db'}"),
        "absolute sqlite": (f"sqlite:///{repo / 'abs.db'}", f"sqlite:///{repo / 'abs.db'}"),
        "tracking server": (server, server),
        "file store": ("mlruns", str(repo / "mlruns")),
    }


# The tracking server's case is slow (the session's server starts with it, ~10-20 s): `make test-fast` leaves it out.
@pytest.mark.parametrize(
    "form",
    ["relative sqlite", "absolute sqlite", pytest.param("tracking server", marks=pytest.mark.slow), "file store"],
)
def test_training_tracks_into_every_store_form(form, repo, latents, monkeypatch, request):
    server = request.getfixturevalue("server") if form == "tracking server" else "no server"
    exported, store = store_forms(repo, server)[form]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported)
    if form == "file store":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # newer MLflow opens file stores only on request
    tracking.check_store(tracking.tracking_uri())
    run(repo / "out", latents, base_params(train_steps=2, ckpt_every=2, log_every=1), ON)
    record = json.loads((repo / "out" / "dit" / "tracking.json").read_text())
    assert record["tracking_uri"] == store
    finished = mlflow.MlflowClient(store).get_run(record["mlflow_run_id"])
    assert finished.info.status == "FINISHED" and "final/loss" in finished.data.metrics


def test_a_uri_no_store_accepts_is_one_line(repo, monkeypatch):
    for uri, message in [
        ("nosuchscheme://host/x", "not a tracking store MLflow knows"),
        (f"sqlite:///{repo / 'missing' / 'm.db'}", "does not exist: create it"),
        ("mlruns", "MLFLOW_ALLOW_FILE_STORE=true"),
    ]:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
        with pytest.raises(TrackingError, match=message) as e:
            tracking.Tracker(ON)
        assert one_line(e.value) == str(e.value)


# --- credentials ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_credentials_in_the_uri_are_written_nowhere(repo, server, tiny, evaluation, latents, monkeypatch):
    secret_uri = server.replace("http://", f"http://alice:{SECRET}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_uri)
    mlflow.set_tracking_uri(secret_uri)

    # 1. the training's record, and the config every Ray worker receives (Ray keeps it in its state)
    configs, real_loop = [], T.train_loop_per_worker
    monkeypatch.setattr(T, "train_loop_per_worker", lambda config: (configs.append(config), real_loop(config)))
    run(repo / "out", latents, base_params(train_steps=2, ckpt_every=2, log_every=1), ON)
    assert configs[0]["tracking_uri"] == server and SECRET not in json.dumps(configs[0], default=str)
    assert json.loads((repo / "out" / "dit" / "tracking.json").read_text())["tracking_uri"] == server
    assert os.environ["MLFLOW_TRACKING_URI"] == secret_uri  # the in-process worker kept the driver's credentials

    # 2. the registered model's artifacts
    dit_dir = export_dit(tiny, repo / "dit", training_run())
    result = register(tiny, dit_dir, write_eval(repo / "eval.json", dit_dir, evaluation))
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{NAME}/{result['version']}", dst_path=str(repo / "downloaded"))
    )
    files = [p for p in local.rglob("*") if p.is_file()]
    assert any(p.name == "tracking.json" for p in files)
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]

    # 3. error messages
    params = repo / "params.yaml"
    params.write_text(json.dumps({"register": {"model_name": NAME, "metric": "fid", "max_labels_per_request": 8}}))
    with pytest.raises(UserError) as e:
        R.main(["--params", str(params), "promote", "99"])
    assert "127.0.0.1" in str(e.value) and SECRET not in str(e.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@127.0.0.1:{free_port()}")
    with pytest.raises(TrackingError) as e:
        tracking.Tracker(ON)
    assert "cannot reach" in str(e.value) and SECRET not in str(e.value)


def test_a_worker_elsewhere_authenticates_from_its_environment(monkeypatch):
    from mlflow.tracking._tracking_service.utils import get_default_host_creds

    public = "http://10.0.0.2:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@10.0.0.2:5000")
    tracking.use_recorded_store(public)  # a worker beside the driver: its environment names the same store
    assert os.environ["MLFLOW_TRACKING_URI"] == f"http://alice:{SECRET}@10.0.0.2:5000"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # a worker on another node, set up the MLflow way
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    tracking.use_recorded_store(public)
    assert os.environ["MLFLOW_TRACKING_URI"] == public
    creds = get_default_host_creds(os.environ["MLFLOW_TRACKING_URI"])
    assert (creds.host, creds.username, creds.password) == (public, "alice", SECRET)
