"""Lost workers: a training worker's process killed mid-training (Ray Train restarts the group from the latest
checkpoint; the EMA ends bit for bit as an uninterrupted run's) and a sampling actor killed mid-shard (Ray restarts
it and redoes its shard; every index is written once, with the uninterrupted run's pixels). A worker lost with its
node, whose group resumes from Ray Train's storage on S3, is tests/test_cluster.py's.

Both runs use a local Ray started here, whose workers run `slow_workers.slow_and_tell` first: it slows each training
step and each shard a little, so the kill lands mid-run, and writes each worker's pid where the test finds it."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from slow_workers import PID_DIR
from tiny_sample import load_samples, params
from tiny_train import assert_bitwise_equal, base_params, load_ema, read_log, run

import pipeline.checkpoints as C
from pipeline import sample as S
from pipeline.formats.model_card import read_model_card

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray like pipeline.cluster.init_ray's (2 CPUs, token-locked), whose workers run slow_and_tell;
    init_ray then finds it started. One for the module: a start costs seconds of 2 cores. Yields the pid folder,
    which each test empties before the run it watches."""
    import ray

    from pipeline.cluster import lock_ray

    pid_dir = tmp_path_factory.mktemp("pids")
    ray.shutdown()  # one an earlier module's run left in this process (init_ray keeps it), without the hook
    lock_ray()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as init_ray: one local node is never drained
    python_path = os.pathsep.join([str(REPO), str(REPO / "tests")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={
            "env_vars": {"PYTHONPATH": python_path, PID_DIR: str(pid_dir)},
            "worker_process_setup_hook": "slow_workers.slow_and_tell",
        },
    )
    try:
        yield pid_dir
    finally:
        ray.shutdown()


# The training the kill test runs: 2 workers, a checkpoint every 10 of 40 steps.
KILLED_RUN = dict(num_workers=2, train_steps=40, log_every=5, ckpt_every=10)


def kill_when(ready, pid_file: Path, seconds: float = 300) -> threading.Thread:
    """In the background: once `ready()` holds and `pid_file` exists, SIGKILL the process it names (a Ray worker
    of this test's own Ray); `thread.killed` records (pid, what ready() returned)."""

    def watch():
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            state = ready()
            if state and pid_file.exists():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                thread.killed = (pid, state)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.killed = None
    thread.start()
    return thread


def test_a_killed_training_worker_is_replaced_and_the_ema_is_unchanged(local_ray, tmp_path, latents):
    p = base_params(**KILLED_RUN)
    before = tmp_path / "uninterrupted"
    run(before, latents, p)  # a training's bytes do not depend on the slowed steps
    for f in local_ray.iterdir():
        f.unlink()
    ckpts = tmp_path / "killed" / "checkpoints"

    def first_checkpoint_written():  # the step of the latest checkpoint, once there is one before the last
        done = C.list_checkpoints(ckpts) if ckpts.exists() else []
        steps = [int(f.stem.split("-")[1]) for f in done]
        return max(steps) if steps and max(steps) < p.train_steps else None

    killer = kill_when(first_checkpoint_written, local_ray / "rank1.pid")
    run(tmp_path / "killed", latents, p)
    killer.join(timeout=1)
    assert killer.killed, "no worker was killed: the run ended before its first checkpoint was seen"
    assert_bitwise_equal(load_ema(tmp_path / "killed"), load_ema(before))
    steps = [int(r["step"]) for r in read_log(tmp_path / "killed" / "train.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == p.train_steps  # resumed, not restarted from scratch


def test_a_killed_sampling_actor_is_replaced_and_its_shard_redone(local_ray, sample_dirs, tmp_path):
    dit_dir, vae_dir = sample_dirs
    card = read_model_card(dit_dir)
    p = params(num_fid_samples=48, shard_size=8, num_workers=2)  # 6 shards over 2 actors
    S.run_sample(p, card, vae_dir, tmp_path / "uninterrupted")
    for f in local_ray.iterdir():
        f.unlink()
    killer = kill_when(lambda: True, local_ray / "shard2.pid")  # the actor drawing shard 2, in the middle of it
    S.run_sample(p, card, vae_dir, tmp_path / "killed")
    killer.join(timeout=1)
    assert killer.killed, "no sampling actor was killed"
    indices = []
    for shard in sorted((tmp_path / "killed" / "shards").glob("*/shard-*.npz")):
        with np.load(shard) as f:
            indices += f["indices"].tolist()
    assert sorted(indices) == list(range(48)) and len(set(indices)) == 48  # none missing, none twice
    for a, b in zip(load_samples(tmp_path / "killed"), load_samples(tmp_path / "uninterrupted")):
        np.testing.assert_array_equal(a, b)
