"""The train stage on a tiny latents artifact (64 examples of 4x8x8, 4 classes) and a depth-2 DiT, on the CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_train import (
    LATENT_SHAPE,
    NUM_CLASSES,
    OFF,
    REPO,
    SCALING_FACTOR,
    TINY,
    assert_bitwise_equal,
    base_params,
    load_ema,
    read_log,
    run,
)

import pipeline.checkpoints as C
import pipeline.train as T
from pipeline.artifacts import ArtifactError, sha256_file
from pipeline.formats.latents import load_latents
from pipeline.model import DiT
from pipeline.params.tracking import TrackingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def reference(tmp_path_factory, latents) -> Path:
    """An uninterrupted 30-step run: the target every resumed run must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("reference")
    run(root, latents, base_params())
    return root


# --- learning, EMA, label dropout ---------------------------------------------------------------------------------


def test_overfits_64_latents(tmp_path, latents):
    metrics = run(
        tmp_path,
        latents,
        base_params(train_steps=400, global_batch_size=32, lr=3e-3, log_every=4, ckpt_every=400, ema_decay=0.99),
    )
    losses = [float(row["loss"]) for row in read_log(tmp_path / "train.csv")]
    assert losses[0] > 0.8  # the adaLN-Zero model starts at eps = 0: MSE = E[eps^2] = 1
    assert metrics["loss"] == losses[-1] < 0.25, losses  # measured: 0.17 after 400 steps
    assert metrics["steps"] == 400 and metrics["img_per_s"] > 0 and metrics["seconds"] > 0


def test_update_ema_is_the_official_formula():
    g = torch.Generator().manual_seed(0)
    ema, theta = [torch.randn(5, 3, generator=g) for _ in range(2)], [torch.randn(5, 3, generator=g) for _ in range(2)]
    expected = [0.9999 * e + (1 - 0.9999) * t for e, t in zip(ema, theta)]
    T.update_ema(ema, theta, 0.9999)
    for got, want in zip(ema, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_ema_follows_the_weights_in_training(tmp_path, latents):
    """EMA_0 = the initial weights; EMA_k = d EMA_{k-1} + (1 - d) theta_k, checked against the checkpoints."""
    p = base_params(train_steps=2, ckpt_every=1, ema_decay=0.75)
    run(tmp_path, latents, p)
    torch.manual_seed(p.seed)
    theta0 = T.build_model(p, LATENT_SHAPE, NUM_CLASSES, TINY).state_dict()
    c1, c2 = (C.load_checkpoint(tmp_path / "checkpoints" / f"ckpt-{s:07d}.pt") for s in (1, 2))
    for name, ema1 in c1["ema"].items():
        torch.testing.assert_close(ema1, 0.75 * theta0[name] + 0.25 * c1["model"][name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(c2["ema"][name], 0.75 * ema1 + 0.25 * c2["model"][name], rtol=1e-5, atol=1e-7)
    assert not torch.equal(c2["ema"]["final_layer.linear.weight"], theta0["final_layer.linear.weight"])


@pytest.mark.parametrize("prob", [0.1, 0.0])
def test_label_dropout_rate_in_a_train_step(prob):
    p = base_params(class_dropout_prob=prob)
    torch.manual_seed(0)
    model = T.build_model(p, LATENT_SHAPE, NUM_CLASSES, TINY)
    state = T.make_train_state(model, p, torch.device("cpu"), world=1, ckpt=None)
    seen = []
    model.y_embedder.embedding_table.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    n = 4096 if prob else 256
    T.train_step(state, torch.randn(n, *LATENT_SHAPE), torch.randint(0, NUM_CLASSES, (n,)), lr=p.lr)
    (ids,) = seen
    dropped = (ids == NUM_CLASSES).float().mean().item()  # the null label is `num_classes`
    assert abs(dropped - prob) < 4 * (prob * (1 - prob) / n) ** 0.5 if prob else dropped == 0, dropped
    assert state.ema.training is False and model.training is True


def test_grad_clip_warmup_and_bf16_step():
    p = base_params(grad_clip=1e-3, warmup_steps=4, precision="bf16")
    assert [T.learning_rate(p, s) for s in (0, 1, 3, 10)] == [p.lr / 4, p.lr / 2, p.lr, p.lr]
    torch.manual_seed(0)
    model = T.build_model(p, LATENT_SHAPE, NUM_CLASSES, TINY)
    state = T.make_train_state(model, p, torch.device("cpu"), world=1, ckpt=None)
    x, y = torch.randn(16, *LATENT_SHAPE), torch.randint(0, NUM_CLASSES, (16,))
    loss, mse, vb, grad_norm = T.train_step(state, x, y, lr=p.lr).tolist()
    clipped = torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in state.trainable])).item()
    assert grad_norm > 1e-2 and abs(clipped - 1e-3) < 1e-6  # the norm is logged before clipping
    assert abs(loss - (mse + vb)) < 1e-5 and all(map(math.isfinite, (loss, mse, vb)))


def test_cosine_schedule_decays_to_zero_after_the_warmup():
    p = base_params(lr=1e-3, warmup_steps=10, train_steps=110, lr_schedule="cosine")
    lrs = [T.learning_rate(p, s) for s in range(110)]
    assert lrs[:10] == [1e-3 * (s + 1) / 10 for s in range(10)]  # the same warmup as the constant schedule
    assert lrs[10] == 1e-3 and math.isclose(lrs[60], 5e-4) and lrs[109] < 1e-6
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert T.learning_rate(p, 110) == 0.0  # a resume past the end trains no further


def test_logit_normal_timesteps_favour_the_middle_and_are_seeded():
    w = T.timestep_weights(1000, "logit-normal")
    assert T.timestep_weights(1000, "uniform") is None and w.shape == (1000,)
    assert int(w.argmax()) in (499, 500) and w[0] < 1e-3 * w[500] and w[999] < 1e-3 * w[500]
    # sigmoid(N(0, 1)) puts 68% of its mass in (sigmoid(-1), sigmoid(1)) = (0.269, 0.731)
    mass = (w[269:731].sum() / w.sum()).item()
    assert abs(mass - 0.6827) < 0.01, mass
    p = base_params(timestep_sampling="logit-normal")
    state = T.make_train_state(T.build_model(p, LATENT_SHAPE, NUM_CLASSES, TINY), p, torch.device("cpu"), 1, None)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(T.draw_timesteps(state, 4096, torch.device("cpu")))
    assert torch.equal(*draws) and 0.6 < ((draws[0] >= 269) & (draws[0] < 731)).float().mean() < 0.76


def test_a_decaying_run_resumes_only_under_its_own_train_steps():
    from pipeline.checkpoints import resume_mismatch

    p = base_params(lr_schedule="cosine", train_steps=30)
    ckpt = {"train_params": dict(vars(p)), "model_config": {}, "latents_sha256": "x", "step": 10}
    assert resume_mismatch(ckpt, p, {}, "x", None) == []
    longer = replace(p, train_steps=40)
    assert "decays over train_steps" in " ".join(resume_mismatch(ckpt, longer, {}, "x", None))
    constant = {**ckpt, "train_params": dict(vars(replace(p, lr_schedule="constant")))}
    assert resume_mismatch(constant, replace(longer, lr_schedule="constant"), {}, "x", None) == []


def test_batches_are_disjoint_across_ranks_and_flip(latents):
    _, tensors = load_latents(latents)
    data = T.LatentBatches(tensors, SCALING_FACTOR, seed=0, device=torch.device("cpu"))
    torch.manual_seed(1)
    steps_per_epoch = 64 // 16
    seen = []
    for step in range(steps_per_epoch):
        for rank in range(2):
            idx = data.permutation(0)[step * 16 + rank * 8 : step * 16 + (rank + 1) * 8]
            seen += idx.tolist()
            x, y = data.batch(step, rank, 2, 16)
            assert x.shape == (8, *LATENT_SHAPE) and torch.equal(y, tensors["label"][idx])
    assert sorted(seen) == list(range(64))  # one epoch = every example once, split between ranks
    x, _ = data.batch(0, 0, 1, 64)
    unflipped = tensors["mean"][data.permutation(0), 0].float() * SCALING_FACTOR
    close = (x - unflipped).abs().flatten(1).amax(1) < 0.5  # std 0.05 (x 0.5): flipped rows are far away
    assert 0 < close.sum() < 64  # both the original and the mirrored latents are drawn


# --- resume -------------------------------------------------------------------------------------------------------


def test_resume_after_exception_is_bit_exact(tmp_path, latents, reference, monkeypatch):
    original = T.LatentBatches.batch

    def failing(self, step, *args):
        if step == 17:
            raise RuntimeError("injected failure at step 17")
        return original(self, step, *args)

    monkeypatch.setattr(T.LatentBatches, "batch", failing)
    with pytest.raises(RuntimeError, match="injected"):
        run(tmp_path, latents, base_params())
    assert [f.name for f in C.list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-0000010.pt"]
    monkeypatch.setattr(T.LatentBatches, "batch", original)
    run(tmp_path, latents, base_params())
    assert_bitwise_equal(load_ema(tmp_path), load_ema(reference))
    assert read_log(tmp_path / "train.csv") == read_log(reference / "train.csv")  # no duplicated rows
    assert len(C.list_checkpoints(tmp_path / "checkpoints")) == base_params().keep_checkpoints


CHILD = """
import sys, time
import torch
import pipeline.train as T
from pipeline.params.tracking import TrackingParams
from tiny_train import (LATENT_SHAPE, NUM_CLASSES, OFF, REPO, SCALING_FACTOR, TINY, assert_bitwise_equal, base_params,
                        load_ema, read_log, run)
from tiny_train import TINY, base_params

torch.set_num_threads(1)
original = T.LatentBatches.batch
def slow(self, *args):  # slow enough for the parent to kill us between two checkpoints
    time.sleep(0.1)
    return original(self, *args)
T.LatentBatches.batch = slow
root, latents = map(__import__("pathlib").Path, sys.argv[1:3])
T.train(base_params(), TrackingParams(enabled=False, experiment="x"), latents, root / "checkpoints", root / "dit",
        root / "metrics.json", root / "train.csv", model_overrides=TINY)
"""


def test_resume_after_sigkill_is_bit_exact(tmp_path, latents, reference):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # The child imports this checkout's `pipeline` (not whichever an editable install names), or its code stamp
    # would differ from the resuming parent's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO)]), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "child.log", "w")
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(latents)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 240
    while not C.list_checkpoints(tmp_path / "checkpoints"):
        assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the child wrote no checkpoint in time"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    log.close()
    assert child.returncode == -signal.SIGKILL
    ckpts = C.list_checkpoints(tmp_path / "checkpoints")
    assert C.load_checkpoint(ckpts[-1])["step"] < 30 and not (tmp_path / "dit" / "ema.pt").exists()
    run(tmp_path, latents, base_params())
    assert_bitwise_equal(load_ema(tmp_path), load_ema(reference))


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, latents, reference, monkeypatch):
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        if obj.get("step") == 20:  # write half a file, then die, as a full disk or a kill would
            f.write(b"\x80\x02half a checkpoint")  # artifacts.atomic_torch_save hands torch.save a file handle
            raise OSError("disk full (injected)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(T.torch, "save", torn_save)
    with pytest.raises(OSError, match="injected"):
        run(tmp_path, latents, base_params())
    monkeypatch.setattr(T.torch, "save", real_save)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["ckpt-0000010.pt"], files  # no torn file, no temp file
    assert C.load_checkpoint(tmp_path / "checkpoints" / files[0])["step"] == 10
    run(tmp_path, latents, base_params())
    assert_bitwise_equal(load_ema(tmp_path), load_ema(reference))


def test_refuses_to_resume_a_different_run(tmp_path, latents):
    run(tmp_path, latents, base_params(train_steps=10))
    with pytest.raises(
        ArtifactError, match=r"train\.lr: 0\.001 -> 0\.002.*--restart-on-mismatch to .* move its checkpoints aside"
    ):
        run(tmp_path, latents, base_params(train_steps=20, lr=2e-3))
    with pytest.raises(ArtifactError, match="past train.train_steps"):
        run(tmp_path, latents, base_params(train_steps=5))
    metrics = run(tmp_path, latents, base_params(train_steps=20, log_every=10))  # longer training resumes
    assert metrics["steps"] == 20


def test_restart_on_mismatch_trains_from_scratch_and_keeps_the_old_run_aside(tmp_path, latents, capsys):
    run(tmp_path / "a", latents, base_params(train_steps=10, ckpt_every=5))
    before = {f.name: sha256_file(f) for f in C.list_checkpoints(tmp_path / "a" / "checkpoints")}
    p = base_params(train_steps=10, lr=2e-3)
    capsys.readouterr()
    T.train(
        p,
        OFF,
        latents,
        tmp_path / "a" / "checkpoints",
        tmp_path / "a" / "dit",
        tmp_path / "a" / "m.json",
        tmp_path / "a" / "train.csv",
        model_overrides=TINY,
        restart_on_mismatch=True,
    )
    run(tmp_path / "fresh", latents, p)
    assert_bitwise_equal(load_ema(tmp_path / "a"), load_ema(tmp_path / "fresh"))
    assert C.load_checkpoint(C.list_checkpoints(tmp_path / "a" / "checkpoints")[-1])["train_params"]["lr"] == 2e-3
    (moved,) = (tmp_path / "a" / "superseded").glob("train-*/checkpoints")  # the old run, byte for byte
    assert {f.name: sha256_file(f) for f in moved.iterdir()} == before and len(before) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "moved" in line]
    assert len(lines) == 1 and str(moved) in lines[0] and "train.lr: 0.001 -> 0.002" in lines[0]
    assert f"restore {moved.parent.name}" in lines[0] and "--resume-across-versions" in lines[0]


def test_checkpoints_of_other_code_or_packages_restart_unless_resumed_across_versions(
    tmp_path, latents, capsys, monkeypatch
):
    run(tmp_path, latents, base_params(train_steps=10))
    made = C.load_checkpoint(tmp_path / "checkpoints" / "ckpt-0000010.pt")["provenance"]
    assert made == T.stamp("train") and "pipeline/diffusion.py" in made["code"]
    upgraded = {**made, "packages": {**made["packages"], "torch": "99.0"}}
    monkeypatch.setattr(T, "stamp", lambda stage: upgraded)  # as after `pip install torch==99.0`

    with pytest.raises(ArtifactError, match=r"torch .* -> 99\.0.*--resume-across-versions"):
        run(tmp_path, latents, base_params(train_steps=20))
    T.train(
        base_params(train_steps=20),
        OFF,
        latents,
        tmp_path / "checkpoints",
        tmp_path / "dit",
        tmp_path / "metrics.json",
        tmp_path / "train.csv",
        model_overrides=TINY,
        resume_across_versions=True,
    )
    assert C.load_checkpoint(tmp_path / "checkpoints" / "ckpt-0000010.pt")["provenance"] == made  # resumed
    assert C.load_checkpoint(tmp_path / "checkpoints" / "ckpt-0000020.pt")["provenance"] == upgraded

    capsys.readouterr()
    edited = {**upgraded, "fingerprint": "0" * 64, "code": {**made["code"], "pipeline/diffusion.py": "edited"}}
    monkeypatch.setattr(T, "stamp", lambda stage: edited)
    T.train(
        base_params(train_steps=20),
        OFF,
        latents,
        tmp_path / "checkpoints",
        tmp_path / "dit",
        tmp_path / "metrics.json",
        tmp_path / "train.csv",
        model_overrides=TINY,
        restart_on_mismatch=True,
    )
    assert "(code changed: pipeline/diffusion.py)" in capsys.readouterr().out  # the stage says why it restarts
    rewritten = C.load_checkpoint(tmp_path / "checkpoints" / "ckpt-0000010.pt")["provenance"]
    assert rewritten == edited  # trained afresh from step 0


# --- safety -------------------------------------------------------------------------------------------------------


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, latents, monkeypatch):
    original = T.LatentBatches.batch

    def poisoned(self, step, *args):
        x, y = original(self, step, *args)
        return (x * float("nan"), y) if step == 5 else (x, y)  # 0-based step 5 = training step 6

    monkeypatch.setattr(T.LatentBatches, "batch", poisoned)
    with pytest.raises(FloatingPointError, match="NaN or Inf at step 6.*ckpt-0000004.pt"):
        run(tmp_path, latents, base_params(train_steps=12, ckpt_every=4, log_every=4))
    assert [f.name for f in C.list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-0000004.pt"]
    ckpt = C.load_checkpoint(tmp_path / "checkpoints" / "ckpt-0000004.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values())


def spike_loss_from(monkeypatch, first_step: int) -> None:
    """The logged loss of every step from `first_step` (0-based) on is a million times its value: finite, so the NaN
    check lets it pass, as a diverged run's loss does."""
    original = T.run_step

    def spiking(s, data, step, *args):
        stats = original(s, data, step, *args)
        return stats * torch.tensor([1e6, 1, 1, 1], dtype=stats.dtype) if step >= first_step else stats

    monkeypatch.setattr(T, "run_step", spiking)


def test_a_runaway_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, latents, monkeypatch):
    spike_loss_from(monkeypatch, 8)  # the window ending at step 12 runs away
    with pytest.raises(FloatingPointError, match="ran away.*ending at step 12.*max_loss_ratio 100.*ckpt-0000008.pt"):
        run(tmp_path, latents, base_params(train_steps=16, ckpt_every=4, log_every=4))
    assert [f.name for f in C.list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-0000004.pt", "ckpt-0000008.pt"]


def test_the_runaway_guard_resumes_with_its_yardstick_and_can_be_turned_off(tmp_path, latents, monkeypatch):
    run(tmp_path, latents, base_params(train_steps=8, ckpt_every=4, log_every=4))
    spike_loss_from(monkeypatch, 8)
    # resumed at step 8, the first window it logs is judged against the lowest loss logged before the kill
    with pytest.raises(FloatingPointError, match="ran away.*ending at step 12"):
        run(tmp_path, latents, base_params(train_steps=12, ckpt_every=4, log_every=4))
    metrics = run(tmp_path, latents, base_params(train_steps=12, ckpt_every=4, log_every=4, max_loss_ratio=None))
    assert metrics["loss"] > 1e3  # off: the run finishes with the loss it logged
    with pytest.raises(ValueError, match="'train.max_loss_ratio' must be > 1 or null"):
        base_params(max_loss_ratio=1.0)


def test_bad_params_fail_clearly(tmp_path, latents):
    with pytest.raises(ValueError, match="not divisible by train.num_workers 3"):
        run(tmp_path, latents, base_params(num_workers=3))
    with pytest.raises(ValueError, match="fewer than train.global_batch_size 128"):
        run(tmp_path, latents, base_params(global_batch_size=128))
    with pytest.raises(ValueError, match="not a preset"):
        run(tmp_path, latents, base_params(model="DiT-Q/2"))


# --- outputs, tracking and the stage script -----------------------------------------------------------------------


def test_outputs_and_mlflow_run(tmp_path, latents, monkeypatch, tiny_vae):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking = TrackingParams(enabled=True, experiment="test-train")
    vae = tmp_path / "vae"
    tiny_vae(SCALING_FACTOR, block_out_channels=(8, 8)).save_pretrained(vae)
    run(tmp_path, latents, base_params(train_steps=4, ckpt_every=2, log_every=2, sample_every=2), tracking, vae)

    info = json.loads((tmp_path / "dit" / "model.json").read_text())
    assert info["model"] == "DiT-Ti/2" and info["model_kwargs"]["depth"] == 2
    assert info["latent_shape"] == list(LATENT_SHAPE) and info["scaling_factor"] == SCALING_FACTOR
    assert info["num_classes"] == NUM_CLASSES and info["train_steps"] == 4
    assert info["ema_sha256"] == sha256_file(tmp_path / "dit" / "ema.pt")
    model = DiT.from_config(info["model_kwargs"])
    model.load_state_dict(load_ema(tmp_path), strict=True)  # the official flat layout, no "module." prefix

    run_id = json.loads((tmp_path / "dit" / "tracking.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)
    data = client.get_run(run_id).data
    assert data.params["train.lr"] == "0.001" and data.params["model.depth"] == "2"
    assert data.tags["latents_manifest_sha256"] == sha256_file(latents / "manifest.json")
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4]
    assert "final/img_per_s" in data.metrics
    assert any(a.path.startswith("images") for a in client.list_artifacts(run_id))

    run(tmp_path, latents, base_params(train_steps=6, ckpt_every=2, log_every=2, sample_every=2), tracking, vae)
    assert json.loads((tmp_path / "dit" / "tracking.json").read_text())["mlflow_run_id"] == run_id
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4, 6]
    assert [int(r["step"]) for r in read_log(tmp_path / "train.csv")] == [2, 4, 6]
    assert set(json.loads((tmp_path / "metrics.json").read_text())) == {"loss", "steps", "img_per_s", "seconds"}


def test_stage_script_end_to_end(tmp_path, latents):
    """The DVC command line with the real DiT-Ti/2 preset, two steps, tracking off."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(num_workers=0, train_steps=2, global_batch_size=8, log_every=1, ckpt_every=1)
    params["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "models" / "dit"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "stages" / "train.py"),
            "--params",
            str(tmp_path / "params.yaml"),
            "--latents",
            str(latents),
            "--checkpoints",
            str(tmp_path / "ckpt"),
            "--out",
            str(out),
            "--metrics",
            str(tmp_path / "metrics" / "train.json"),
            "--plots",
            str(tmp_path / "train.csv"),
        ],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert json.loads((out / "model.json").read_text())["model_kwargs"]["depth"] == 6
    assert json.loads((tmp_path / "metrics" / "train.json").read_text())["steps"] == 2
    assert json.loads((out / "tracking.json").read_text()) == {"mlflow_run_id": None, "tracking_uri": None}


# --- exporting an official checkpoint instead of training (profiles/official-xl2.yaml) ---------------------------


def test_official_checkpoint_is_exported_without_training(tmp_path, latents):
    from pipeline.model import DiT_models

    official = DiT_models["DiT-Ti/8"](input_size=LATENT_SHAPE[-1], num_classes=NUM_CLASSES)
    with torch.no_grad():
        for param in official.parameters():
            param.add_(torch.randn_like(param))
    torch.save(official.state_dict(), tmp_path / "official.pt")  # flat, as released
    p = base_params(model="DiT-Ti/8", official_checkpoint=str(tmp_path / "official.pt"))
    metrics = T.train(
        p, OFF, latents, tmp_path / "checkpoints", tmp_path / "dit", tmp_path / "metrics.json", tmp_path / "train.csv"
    )
    assert metrics["steps"] == 0 and not list((tmp_path / "checkpoints").iterdir())
    assert_bitwise_equal(load_ema(tmp_path), official.state_dict())
    card = json.loads((tmp_path / "dit" / "model.json").read_text())
    assert card["train_steps"] == 0 and card["model"] == "DiT-Ti/8"
    with pytest.raises(ArtifactError, match="set train.model"):
        T.train(
            replace(p, model="DiT-Ti/4"),
            OFF,
            latents,
            tmp_path / "c2",
            tmp_path / "d2",
            tmp_path / "m2.json",
            tmp_path / "t2.csv",
        )
