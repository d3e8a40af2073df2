"""bench/gpu_checks.sh runs on a device lent for minutes, so its pipeline step is rehearsed here: the same script and
the same stage entry points at tiny sizes on the CPU (`--cpu-dry-run`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_gpu_smoke_profile_validates_and_is_gpu_everywhere():
    from pipeline.profiles import overrides

    flat = dict(o.split("=", 1) for o in overrides("gpu-smoke", REPO / "params.yaml"))
    assert flat["train.model"] == "DiT-B/2" and flat["train.train_steps"] == "300"
    assert flat["tracking.enabled"] == "false" and flat["train.num_workers"] == "0"
    gpu_sections = yaml.safe_load((REPO / "profiles" / "gpu-smoke.yaml").read_text())
    assert all(gpu_sections[s]["use_gpu"] for s in ("encode", "train", "reference", "sample", "evaluate", "curve"))


@pytest.mark.slow
def test_gpu_checks_cpu_dry_run_runs_every_stage(tmp_path):
    scratch = tmp_path / "tmp"  # the script's own temp dir, which it must remove
    scratch.mkdir()
    # `make test` leaves the venv off PATH
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "TMPDIR": str(scratch)}
    done = subprocess.run(
        ["bash", "bench/gpu_checks.sh", "--cpu-dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "gpu_checks.log").read_text()
    assert "### gpu_pipeline_dry: rc=0" in log, log
    report = json.loads((tmp_path / "gpu_pipeline_dry.out").read_text().strip().splitlines()[-1])
    assert list(report["stages"]) == ["ingest", "vae", "encode", "train", "reference", "sample", "evaluate"]
    assert report["outputs"]["samples"] == [32, 64, 64, 3] and report["train_img_per_s"]["ratio"] > 0
    assert not list(scratch.iterdir()), "the dry run left its working directory behind"
