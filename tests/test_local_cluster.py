"""`python -m pipeline.cluster run -- CMD` (make repro): one local Ray that the command's stages join, stopped after.
A real Ray on 127.0.0.1 with token authentication; the command is a stand-in stage that joins it through init_ray,
runs a remote task that records its first useful work (pipeline/timing.py), and reports what it saw."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, os, sys
import ray
import pipeline
from pipeline.cluster import init_ray
from pipeline.timing import mark_ready

init_ray()

@ray.remote
def work():
    import pipeline
    mark_ready()
    return os.getpid(), pipeline.__file__

pid, worker_pipeline = ray.get(work.remote())
report = {"address": os.environ.get("RAY_ADDRESS"), "gcs": ray.get_runtime_context().gcs_address,
          "driver_pid": os.getpid(), "worker_pid": pid, "worker_pipeline": worker_pipeline,
          "driver_pipeline": pipeline.__file__}
open(os.environ["REPORT_PATH"], "w").write(json.dumps(report))  # not stdout: Ray forwards raylet warnings there
"""


@pytest.mark.slow
def test_run_starts_one_local_ray_that_stages_join_and_stops_it(tmp_path):
    timings = tmp_path / "timings"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "PIPELINE_TIMINGS_DIR": str(timings),
        "PIPELINE_STAGE": "probe",
        "REPORT_PATH": str(tmp_path / "report.json"),
    }
    for name in ("RAY_ADDRESS", "PIPELINE_LOCAL_RAY"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cluster", "run", "--num-cpus", "1", "--", sys.executable, "-c", PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads((tmp_path / "report.json").read_text())
    assert seen["address"] and seen["gcs"] == seen["address"]  # joined the run's Ray, did not start its own
    assert seen["worker_pipeline"] == seen["driver_pipeline"] == str(REPO / "pipeline" / "__init__.py")
    events = [json.loads(line) for line in (timings / "probe.jsonl").read_text().splitlines()]
    assert any(e["event"] == "ready" and e["pid"] == seen["worker_pid"] for e in events), events  # from the worker
    host, port = seen["address"].rsplit(":", 1)
    with socket.socket() as s:  # the run stopped its Ray: nothing listens on its GCS port any more
        assert s.connect_ex((host, int(port))) != 0


def test_run_needs_a_command():
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cluster", "run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2 and "give the command to run after --" in done.stderr
