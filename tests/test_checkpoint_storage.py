"""Ray Train's checkpoints with two gloo workers: a run stopped and continued equals an uninterrupted one, with
checkpoints in models/checkpoints; and train.storage_path, checkpoints through Ray Train's persistent storage, here a
local S3-compatible server (moto on 127.0.0.1). Rank 0 reports each checkpoint to Ray Train, which uploads it; the
driver fills models/checkpoints from the run's kept checkpoints, and seeds the next run with the latest of them. The
weights, the training log and the kept files are those of a run that writes models/checkpoints directly.

Both compare with one uninterrupted 6-step run of the module (`six_steps`): each Ray Train run costs seconds of
start-up on 2 cores."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
from conftest import BUCKET, CREDENTIALS, keys
from tiny_train import assert_bitwise_equal, base_params, load_ema, read_log, run

import pipeline.checkpoints as C
from pipeline.params.load import ParamsError

pytestmark = pytest.mark.slow

# Two workers, a checkpoint every 3 steps, the latest 2 kept.
SIX_STEPS = dict(num_workers=2, train_steps=6, log_every=2, ckpt_every=3, keep_checkpoints=2)


def kept(root) -> list[str]:
    return [f.name for f in C.list_checkpoints(root / "checkpoints")]


@pytest.fixture(scope="module")
def s3_env(s3):
    """This process's environment pointed at the module's S3 server, as a user exports it for pyarrow, boto and Ray,
    for the whole module: the Ray that the first run starts in this process hands it to its workers, and serves
    every run of the module (a start costs seconds of 2 cores). Yields the endpoint."""
    import ray

    endpoint, _ = s3
    ray.shutdown()  # one an earlier module left in this process, without these variables
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            env.setenv(key, value)
        yield endpoint
        ray.shutdown()  # its workers hold this module's credentials


@pytest.fixture(scope="module")
def six_steps(s3_env, latents, tmp_path_factory):
    """An uninterrupted SIX_STEPS run that writes models/checkpoints directly; tests copy it before continuing it."""
    root = tmp_path_factory.mktemp("six-steps")
    run(root, latents, base_params(**SIX_STEPS))
    return root


def test_ray_two_cpu_workers_resume(six_steps, latents, tmp_path):
    """A run stopped at step 3 and continued to 6 equals the uninterrupted 6-step run."""
    p = base_params(**SIX_STEPS)
    run(tmp_path / "resumed", latents, replace(p, train_steps=3))
    run(tmp_path / "resumed", latents, p)
    assert_bitwise_equal(load_ema(tmp_path / "resumed"), load_ema(six_steps))
    log = read_log(tmp_path / "resumed" / "train.csv")
    assert [int(r["step"]) for r in log] == [2, 3, 4, 6]  # the first run's last row, then no duplicates


def test_checkpoints_go_through_s3_and_fill_the_dvc_output(s3_env, six_steps, latents, tmp_path):
    endpoint = s3_env
    p = base_params(**SIX_STEPS)
    stored = replace(p, storage_path=f"s3://{BUCKET}/train")
    direct, through_s3 = tmp_path / "direct", tmp_path / "s3"
    shutil.copytree(six_steps, direct)
    run(through_s3, latents, stored)
    uploaded = [k for k in keys(endpoint, "train/") if k.endswith(".pt")]
    assert sorted(k.rsplit("/", 1)[-1] for k in uploaded) == ["ckpt-0000003.pt", "ckpt-0000006.pt"], uploaded
    assert kept(through_s3) == kept(direct) == ["ckpt-0000003.pt", "ckpt-0000006.pt"]
    for name in kept(direct):
        a, b = (C.load_checkpoint(root / "checkpoints" / name) for root in (direct, through_s3))
        for part in ("model", "ema"):
            assert_bitwise_equal(a[part], b[part])
    assert_bitwise_equal(load_ema(through_s3), load_ema(direct))
    assert read_log(through_s3 / "train.csv") == read_log(direct / "train.csv")  # written by the driver

    # The next run of the stage continues from models/checkpoints, which the driver uploads as the run's start.
    run(direct, latents, replace(p, train_steps=9))
    run(through_s3, latents, replace(stored, train_steps=9))
    assert any(k.endswith("/initial/ckpt-0000006.pt") for k in keys(endpoint, "train/"))
    assert kept(through_s3) == kept(direct) == ["ckpt-0000006.pt", "ckpt-0000009.pt"]
    assert_bitwise_equal(load_ema(through_s3), load_ema(direct))
    steps = [int(r["step"]) for r in read_log(through_s3 / "train.csv")]
    assert steps == [2, 4, 6, 8, 9]  # resumed at 6, not restarted


def test_storage_path_needs_ray_workers_and_a_location_every_node_reaches():
    with pytest.raises(ParamsError, match="num_workers"):
        base_params(num_workers=0, storage_path=f"s3://{BUCKET}/train")
    with pytest.raises(ParamsError, match="absolute"):
        base_params(num_workers=1, storage_path="relative/dir")
