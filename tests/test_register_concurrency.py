"""Three `register` stages at once against one real `mlflow server` (pipeline/registry_lock.py): one version per
checkpoint, and `champion` is the best FID whatever order they finish in. Tiny model of tests/conftest.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import (
    EXPERIMENT,
    MAX_LABELS,
    NAME,
    REPO,
    SAMPLER,
    export_dit,
    register_cli_args,
    write_eval,
)

from pipeline import register as R
from pipeline.artifacts import atomic_write_json
from pipeline.params.load import read_yaml
from pipeline.registry_lock import lock_path, registry_lock

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
MODEL = f"{NAME}-concurrent"  # its own name on the session's tracking server


def test_the_lock_is_exclusive_and_named_without_credentials(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert lock_path(uri) == tmp_path / "m.db.register.lock"
    assert "alice" not in str(lock_path("http://10.0.0.2:5000")) and lock_path("http://a:1") != lock_path("http://b:1")
    code = "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    probe = [sys.executable, "-c", code, str(lock_path(uri))]
    with registry_lock(uri):
        assert subprocess.run(probe, capture_output=True, check=False).returncode != 0  # no other process takes it
    assert subprocess.run(probe, capture_output=True, check=False).returncode == 0  # released after the block


def another_checkpoint(tiny, dit_dir: Path, evaluation: dict, fid: float, out: Path) -> tuple[Path, Path]:
    """models/dit of other EMA weights, and its evaluation with `fid` (the evaluate stage's two files)."""
    other = {**tiny, "ema": {k: v + 0.01 if v.is_floating_point() else v for k, v in tiny["ema"].items()}}
    export_dit(other, dit_dir, run_id=None)
    sha = json.loads((dit_dir / "model.json").read_text())["ema_sha256"]
    numbers = {**evaluation["numbers"], "fid": fid}
    report = {**evaluation["report"], "protocol": {**evaluation["report"]["protocol"], "checkpoint_sha256": sha}}
    atomic_write_json(out, numbers)
    atomic_write_json(out.with_name(out.stem + ".report.json"), report)
    return out, out.with_name(out.stem + ".report.json")


@pytest.mark.slow
def test_three_concurrent_registers_make_one_version_per_checkpoint_and_the_best_champion(
    tiny, evaluation, tracking_server, tmp_path
):
    # The session's tracking server (conftest), where this test's model has a name of its own.
    uri, _ = tracking_server
    dit_a = export_dit(tiny, tmp_path / "dit-a", run_id=None)
    eval_a = write_eval(tmp_path / "eval-a.json", dit_a, evaluation, fid=10.0)
    dit_b = tmp_path / "dit-b"
    eval_b = another_checkpoint(tiny, dit_b, evaluation, 8.0, tmp_path / "eval-b.json")
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "register": {"model_name": MODEL, "metric": "fid", "max_labels_per_request": MAX_LABELS},
                "sample": {**read_yaml(REPO / "params.yaml")["sample"], **SAMPLER},
                "tracking": {"enabled": True, "experiment": EXPERIMENT},
            }
        )
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    # checkpoint A (FID 10), and checkpoint B (FID 8) registered twice at once with the same evaluation
    jobs = [(dit_a, eval_a, "a"), (dit_b, eval_b, "b1"), (dit_b, eval_b, "b2")]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stages.register",
                *register_cli_args(params, dit, tiny, ev, tmp_path / f"register-{tag}.json"),
            ],
            # to files, not pipes: one process blocked on a full pipe while it holds the lock would stall the others
            cwd=REPO,
            env=env,
            stdout=(tmp_path / f"register-{tag}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for dit, ev, tag in jobs
    ]
    for p in procs:
        p.wait(timeout=600)
    outputs = [(tmp_path / f"register-{tag}.log").read_text() for _, _, tag in jobs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    client = mlflow.MlflowClient(uri)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    by_checkpoint = {}
    for mv in versions:
        by_checkpoint.setdefault(mv.tags["checkpoint_sha256"], []).append(mv.version)
    assert len(versions) == 2 and all(len(v) == 1 for v in by_checkpoint.values()), by_checkpoint
    best = next(mv.version for mv in versions if mv.tags["fid"] == "8.0")
    model = client.get_registered_model(MODEL)
    assert str(model.aliases[R.CHAMPION]) == str(best)
    assert json.loads(model.tags[R.HISTORY_TAG])[-1] == str(best)
    reports = [json.loads((tmp_path / f"register-{tag}.json").read_text()) for _, _, tag in jobs]
    assert reports[1]["version"] == reports[2]["version"] == int(best)
