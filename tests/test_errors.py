"""Errors a person can read: each stage, run as DVC runs it (`python -m stages.X`), turns an expected user error into
one `error: ...` line on stderr that names the fix, and a non-zero exit; a bug keeps its traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.errors import UserError, run_main, user_error
from pipeline.tracking import CONNECT_TIMEOUT_S, TrackingError, load_tracking

REPO = Path(__file__).resolve().parents[1]


def run_stage(stage: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", f"stages.{stage}", *map(str, args)]
    return subprocess.run(
        command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line, checked: exit status 1, no traceback, and nothing else on stderr."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def params_file(path: Path, **sections) -> Path:
    """params.yaml of the repository with `sections` merged in (one level deep)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, values in sections.items():
        params[name] = {**params[name], **values}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_bad_params(tmp_path):
    params = params_file(tmp_path / "params.yaml", ingest={"shard_sise": 10})
    line = error_line(
        run_stage("ingest", "--params", params, "--out", tmp_path / "images", "--metrics", tmp_path / "ingest.json")
    )
    assert "shard_sise" in line and "shard_size" in line  # the typo and the key it should be


@pytest.mark.parametrize("stale", [False, True])
def test_missing_or_stale_artifact(tmp_path, stale):
    samples = tmp_path / "samples"
    if stale:  # made by an older version of the sample stage
        samples.mkdir()
        (samples / "manifest.json").write_text('{"format": "dit-samples", "version": 0}')
    params = params_file(tmp_path / "params.yaml", tracking={"enabled": False})
    line = error_line(
        run_stage(
            "evaluate",
            "--params",
            params,
            "--samples",
            samples,
            "--reference",
            tmp_path / "reference",
            "--model",
            tmp_path / "dit",
            "--metrics",
            tmp_path / "eval.json",
            "--report",
            tmp_path / "report.json",
        )
    )
    assert "run `dvc repro sample`" in line and ("incompatible" in line if stale else "is missing" in line)


def test_ingest_over_max_bad_fraction(tmp_path):
    root = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png")  # 1 of 7 unreadable, above 1%
    params = params_file(
        tmp_path / "params.yaml",
        ingest={"source": "imagefolder", "max_bad_fraction": 0.01, "imagefolder": {"root": str(root)}},
    )
    line = error_line(
        run_stage(
            "ingest",
            "--params",
            params,
            "--out",
            tmp_path / "images",
            "--metrics",
            tmp_path / "ingest.json",
            env={"TQDM_DISABLE": "1"},
        )
    )  # no progress bar on stderr
    assert "max_bad_fraction" in line and "skipped.json" in line


def closed_port() -> int:
    with socket.socket() as s:  # a port that nothing listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server(tmp_path):
    port = closed_port()
    params = params_file(tmp_path / "params.yaml", tracking={"enabled": True})
    line = error_line(
        run_stage(
            "evaluate",
            "--params",
            params,
            "--samples",
            tmp_path,
            "--reference",
            tmp_path,
            "--model",
            tmp_path,
            "--metrics",
            tmp_path / "eval.json",
            "--report",
            tmp_path / "report.json",
            env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
        )
    )
    assert f"127.0.0.1:{port}" in line and "MLFLOW_TRACKING_URI" in line and "tracking.enabled: false" in line
    assert not (tmp_path / "eval.json").exists()  # checked before any work


def test_unreachable_tracking_server_fails_in_seconds(monkeypatch):
    """Not after MLflow's retries with backoff (minutes); the check happens when the stage loads its params."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server"):
        load_tracking(REPO / "params.yaml")  # tracking.enabled: true in the default
    assert time.monotonic() - start < CONNECT_TIMEOUT_S


# --- the edge itself, in-process ----------------------------------------------------------------------------------


def test_a_bug_keeps_its_traceback():
    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_main(main)


def test_user_error_raised_in_a_ray_worker_prints_without_the_remote_traceback(capsys):
    from ray.exceptions import RayTaskError

    cause = UserError("latents are stale; run `dvc repro encode`")
    try:
        raise cause
    except UserError:
        import traceback

        remote = RayTaskError("encode", traceback.format_exc(), cause).as_instanceof_cause()
    assert user_error(remote) is cause

    def main():
        raise remote

    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: latents are stale; run `dvc repro encode`\n"
