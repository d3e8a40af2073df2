"""S3 as users run it, against a local S3-compatible server (moto, bound to 127.0.0.1): a DVC remote with dvc-s3
(push, git clone, pull, status clean) and an MLflow tracking server whose artifacts live in S3, registering the
project's pyfunc model and loading the champion back. Credentials come from the environment only: they must never
land in a file that git or DVC tracks, and the MLflow client needs none (the server proxies the artifacts)."""

import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import (
    BUCKET,
    CREDENTIALS,
    IMAGE,
    NAME,
    export_dit,
    keys,
    mlflow_server,
    register,
    training_run,
    write_eval,
)

from pipeline import register as R

pytestmark = pytest.mark.slow


def sh(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


# A one-stage pipeline writing a directory of shards, as the project's stages do.
DVC_YAML = """stages:
  make:
    cmd: python make.py out
    deps: [make.py]
    outs: [out]
"""
MAKE_PY = """import sys, pathlib, numpy as np
out = pathlib.Path(sys.argv[1]); out.mkdir(exist_ok=True)
for i in range(3):
    np.save(out / f"shard-{i}.npy", np.random.default_rng(i).standard_normal((64, 4)))
"""


def test_dvc_remote_on_s3_push_clone_pull(s3, tmp_path):
    endpoint, env = s3
    env = {
        **env,
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "make.py").write_text(MAKE_PY)
    sh(["git", "init", "-q"], repo, env)
    sh(["dvc", "init", "-q"], repo, env)
    sh(["dvc", "repro", "-q"], repo, env)
    # docs/cluster.md's commands: the remote and its endpoint are shared settings, the keys stay in the environment.
    sh(["dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc"], repo, env)
    sh(["dvc", "remote", "modify", "storage", "endpointurl", endpoint], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "pipeline and remote"], repo, env)
    sh(["dvc", "push"], repo, env)
    tracked = sh(["git", "ls-files"], repo, env).split()
    assert ".dvc/config" in tracked
    for path in tracked:
        text = (repo / path).read_text(errors="replace")
        assert not any(v in text for v in CREDENTIALS.values() if v.startswith("test-")), f"credentials in {path}"
    assert len(keys(endpoint, "dvc/")) == 4  # 3 shards + the directory's .dir listing

    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    sh(["dvc", "pull"], clone, env)
    for shard in (repo / "out").iterdir():
        assert (clone / "out" / shard.name).read_bytes() == shard.read_bytes()
    assert "up to date" in sh(["dvc", "status"], clone, env)
    assert "in sync" in sh(["dvc", "status", "--cloud"], clone, env)


def test_mlflow_server_keeps_artifacts_in_s3_and_serves_the_champion(s3, tiny, evaluation, tmp_path, monkeypatch):
    endpoint, env = s3
    # Only the server holds the S3 credentials; clients upload and download through it (mlflow-artifacts:/).
    server = mlflow_server(
        f"sqlite:///{tmp_path / 'server.db'}",
        f"s3://{BUCKET}/mlflow",
        env={**env, "MLFLOW_S3_ENDPOINT_URL": endpoint, "MLFLOW_TRACKING_URI": ""},
    )
    try:
        with server as uri:
            for key in [k for k in os.environ if k.startswith("AWS_")]:
                monkeypatch.delenv(key)
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            monkeypatch.chdir(tmp_path)
            mlflow.set_tracking_uri(uri)
            dit_dir = export_dit(tiny, tmp_path / "dit", training_run())
            result = register(tiny, dit_dir, write_eval(tmp_path / "eval.json", dit_dir, evaluation))
            assert result["promoted"] and result["version"] == 1
            stored = keys(endpoint, "mlflow/")
            assert any(k.endswith("artifacts/dit/ema.pt") for k in stored), stored[:20]
            model = mlflow.pyfunc.load_model(f"models:/{NAME}@{R.CHAMPION}")
            images = model.predict(np.array([0, 2]), params={"seed": 1})
            assert images.shape == (2, IMAGE, IMAGE, 3) and images.dtype == np.uint8
    finally:
        mlflow.set_tracking_uri(None)
