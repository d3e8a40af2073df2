"""Tests of pipeline/sample.py on a tiny DiT (8x8 latents, depth 2) and a tiny KL-VAE (16 px images), on CPU."""

import dataclasses
import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from PIL import Image
from tiny_sample import DIFFUSION, IMAGE, LATENT, MICRO, NUM_CLASSES, load_samples, params

from pipeline import generate as G, sample as S
from pipeline.artifacts import ArtifactError, read_manifest, sha256_file
from pipeline.formats.model_card import read_model_card
from pipeline.model import DiT_models
from pipeline.params.load import ParamsError, load_section
from pipeline.params.sample import SampleParams, check_params as check_sample_params
from pipeline.params.tracking import TrackingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(sample_dirs):
    dit_dir, vae_dir = sample_dirs
    card = read_model_card(dit_dir)
    model, vae = G.load_models(card, vae_dir, "cpu")
    return card, model, vae


def generate(models, indices, labels, batch_size, seed=0, **kw):
    card, model, vae = models
    settings = dict(
        seed=seed,
        sampler="dpm-solver++",
        steps=4,
        cfg_scale=1.5,
        cfg_channels=None,
        num_classes=NUM_CLASSES,
        latent_shape=LATENT,
        device="cpu",
        batch_size=batch_size,
        micro_batch=MICRO,
        precision="fp32",
        diffusion=DIFFUSION,
    )
    return G.generate_images(model, vae, labels, indices, **{**settings, **kw})


# --- determinism ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["dpm-solver++", "ddpm"])
def test_batch_size_and_request_do_not_change_pixels(models, sampler):
    indices = np.arange(20)
    labels = indices % NUM_CLASSES
    runs = {b: generate(models, indices, labels, b, sampler=sampler) for b in (3, 5, 20)}
    assert runs[3].shape == (20, IMAGE, IMAGE, 3) and runs[3].dtype == np.uint8
    np.testing.assert_array_equal(runs[3], runs[5])
    np.testing.assert_array_equal(runs[3], runs[20])  # 3 blocks share one sampler loop
    part = generate(models, indices[5:13], labels[5:13], 4, sampler=sampler)  # straddles blocks 0 and 1
    np.testing.assert_array_equal(part, runs[3][5:13])
    assert len({img.tobytes() for img in runs[3]}) == 20  # distinct samples, not a constant image
    other_seed = generate(models, indices[:4], labels[:4], 4, seed=1, sampler=sampler)
    assert not np.array_equal(other_seed, runs[3][:4])


def test_network_and_vae_always_see_one_shape(models):
    """The mechanism behind batch invariance: whatever the batch, every call has micro_batch rows (x2 with cfg)."""
    card, model, vae = models
    shapes = []
    hooks = [
        model.x_embedder.register_forward_hook(lambda m, args, out: shapes.append(("dit", tuple(args[0].shape)))),
        vae.decoder.register_forward_hook(lambda m, args, out: shapes.append(("vae", tuple(args[0].shape)))),
    ]
    try:
        for batch_size, n in ((3, 3), (5, 13), (20, 20)):
            generate(models, np.arange(n), np.zeros(n, np.int64), batch_size)
    finally:
        for h in hooks:
            h.remove()
    assert set(shapes) == {("dit", (2 * MICRO, *LATENT)), ("vae", (MICRO, *LATENT))}


def test_label_changes_only_its_own_sample(models):
    indices = np.arange(8)
    a = generate(models, indices, np.zeros(8, np.int64), 8)
    b = generate(models, indices, np.array([0, 0, 0, 1, 0, 0, 0, 0]), 8)
    changed = [i for i in range(8) if not np.array_equal(a[i], b[i])]
    assert changed == [3]


def test_shard_size_does_not_change_pixels(sample_dirs, tmp_path):
    dit_dir, vae_dir = sample_dirs
    card = read_model_card(dit_dir)
    S.run_sample(params(shard_size=8, batch_size=3), card, vae_dir, tmp_path / "a")
    S.run_sample(params(shard_size=16, batch_size=16), card, vae_dir, tmp_path / "b")
    np.testing.assert_array_equal(load_samples(tmp_path / "a")[0], load_samples(tmp_path / "b")[0])


@pytest.mark.slow
def test_ray_workers_do_not_change_pixels(sample_dirs, tmp_path):
    ray = pytest.importorskip("ray")
    dit_dir, vae_dir = sample_dirs
    card = read_model_card(dit_dir)
    try:
        S.run_sample(params(num_workers=1), card, vae_dir, tmp_path / "one")
        S.run_sample(params(num_workers=2, batch_size=5), card, vae_dir, tmp_path / "two")
    finally:
        ray.shutdown()
    S.run_sample(params(num_workers=0), card, vae_dir, tmp_path / "local")  # one thread, like each actor
    one, two, local = (load_samples(tmp_path / d)[0] for d in ("one", "two", "local"))
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, local)


# --- resume -----------------------------------------------------------------------------------------------------


def test_resume_after_kill_reuses_finished_shards(sample_dirs, tmp_path, monkeypatch):
    dit_dir, vae_dir = sample_dirs
    card, p, out = read_model_card(dit_dir), params(), tmp_path / "out"
    original, calls = S.ShardWorker.generate, []

    def killed_after_first(self, k):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(k)
        return original(self, k)

    monkeypatch.setattr(S.ShardWorker, "generate", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        S.run_sample(p, card, vae_dir, out)
    (shard_dir,) = (out / "shards").iterdir()
    assert sorted(f.name for f in shard_dir.iterdir()) == ["provenance.json", "shard-00000.npz"]
    first_mtime = (shard_dir / "shard-00000.npz").stat().st_mtime_ns
    assert not (out / "samples.npz").exists()

    calls.clear()
    monkeypatch.setattr(S.ShardWorker, "generate", lambda self, k: (calls.append(k), original(self, k))[1])
    metrics = S.run_sample(p, card, vae_dir, out)
    assert calls == [1, 2] and metrics["num_generated"] == 12  # shard 0 was not regenerated
    assert (shard_dir / "shard-00000.npz").stat().st_mtime_ns == first_mtime

    S.run_sample(p, card, vae_dir, tmp_path / "uninterrupted")
    np.testing.assert_array_equal(load_samples(out)[0], load_samples(tmp_path / "uninterrupted")[0])

    calls.clear()
    before = {f.name: sha256_file(f) for f in shard_dir.iterdir()}
    S.run_sample(dataclasses.replace(p, seed=1), card, vae_dir, out)  # other pixels: a fresh key, old shards aside
    assert calls == [0, 1, 2] and [d.name for d in (out / "shards").iterdir()] != [shard_dir.name]
    assert not shard_dir.exists()
    moved = out / "superseded" / f"sample-{shard_dir.name}" / shard_dir.name  # moved, not deleted: byte for byte
    assert {f.name: sha256_file(f) for f in moved.iterdir()} == before


def test_shards_of_other_code_are_regenerated_unless_resumed_across_versions(
    sample_dirs, tmp_path, monkeypatch, capsys
):
    dit_dir, vae_dir = sample_dirs
    card, p, out = S.read_model_card(dit_dir), params(), tmp_path / "out"
    S.run_sample(p, card, vae_dir, out)
    original, calls = S.ShardWorker.generate, []
    monkeypatch.setattr(S.ShardWorker, "generate", lambda self, k: (calls.append(k), original(self, k))[1])
    now = S.stamp("sample")
    monkeypatch.setattr(
        S,
        "stamp",
        lambda stage: {**now, "fingerprint": "0" * 64, "code": {**now["code"], "pipeline/diffusion.py": "x"}},
    )
    S.run_sample(p, card, vae_dir, out, resume_across_versions=True)
    assert calls == [] and "across versions" in capsys.readouterr().out
    monkeypatch.setattr(S, "stamp", lambda stage: now)
    S.run_sample(p, card, vae_dir, out)  # the shards now carry the edited stamp: regenerated, saying why
    assert calls == [0, 1, 2] and "code changed: pipeline/diffusion.py" in capsys.readouterr().out
    (moved,) = [d for d in (out / "superseded").glob("sample-*/*") if d.is_dir()]  # the edited code's, kept aside
    assert sorted(f.name for f in moved.glob("shard-*.npz")) == [
        "shard-00000.npz",
        "shard-00001.npz",
        "shard-00002.npz",
    ]


def test_more_samples_extend_a_finished_run(sample_dirs, tmp_path, monkeypatch):
    dit_dir, vae_dir = sample_dirs
    card, out = read_model_card(dit_dir), tmp_path / "out"
    S.run_sample(params(num_fid_samples=20), card, vae_dir, out)  # shards 0, 1 full, shard 2 holds 4
    original, calls = S.ShardWorker.generate, []
    monkeypatch.setattr(S.ShardWorker, "generate", lambda self, k: (calls.append(k), original(self, k))[1])
    S.run_sample(params(num_fid_samples=28), card, vae_dir, out)
    assert calls == [2, 3]  # the short last shard is redone, the full ones are kept
    S.run_sample(params(num_fid_samples=28), card, vae_dir, tmp_path / "fresh")
    np.testing.assert_array_equal(load_samples(out)[0], load_samples(tmp_path / "fresh")[0])


# --- outputs ----------------------------------------------------------------------------------------------------


def test_outputs_in_adm_layout_with_manifest(sample_dirs, tmp_path):
    dit_dir, vae_dir = sample_dirs
    card = read_model_card(dit_dir)
    metrics = S.run_sample(params(), card, vae_dir, tmp_path)
    with np.load(tmp_path / "samples.npz") as f:  # how ADM's evaluator opens it: no pickle, arr_0 NHWC uint8
        assert sorted(f.files) == ["arr_0", "labels"]
        arr, labels = f["arr_0"], f["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (20, IMAGE, IMAGE, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [i % NUM_CLASSES for i in range(20)]
    manifest = read_manifest(tmp_path, "dit-samples", 1, stage="sample")
    expected = dict(
        num_samples=20,
        sampler="dpm-solver++",
        steps=4,
        cfg_scale=1.5,
        cfg_channels=None,
        labels="balanced",
        seed=0,
        image_size=IMAGE,
        num_classes=NUM_CLASSES,
        model="tiny",
        checkpoint_sha256=sha256_file(dit_dir / "ema.pt"),
        samples_sha256=sha256_file(tmp_path / "samples.npz"),
    )
    assert {k: manifest[k] for k in expected} == expected
    assert manifest["label_counts"] == [5, 5, 5, 5] and len(manifest["vae_sha256"]) == 64
    assert metrics["num_samples"] == metrics["num_generated"] == 20
    assert metrics["img_per_s"] > 0 and metrics["img_steps_per_s"] == pytest.approx(4 * metrics["img_per_s"])


def test_grid_one_row_per_class(sample_dirs, tmp_path):
    dit_dir, vae_dir = sample_dirs
    S.run_sample(params(grid_per_class=3), read_model_card(dit_dir), vae_dir, tmp_path)
    images, labels = load_samples(tmp_path)
    grid = G.make_grid(images, labels, NUM_CLASSES, 3)
    assert grid.shape == (NUM_CLASSES * IMAGE, 3 * IMAGE, 3)
    for c in range(NUM_CLASSES):  # row c: the first three samples of class c, in index order
        first = np.flatnonzero(labels == c)[:3]
        np.testing.assert_array_equal(grid[c * IMAGE : (c + 1) * IMAGE], np.concatenate(images[first], axis=1))
    png = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert png.shape[0] == grid.shape[0] and png.shape[1] > grid.shape[1]  # plus the class-name margin
    np.testing.assert_array_equal(png[:, -grid.shape[1] :], grid)


def test_grid_leaves_missing_samples_black():
    images = np.full((3, 2, 2, 3), 200, np.uint8)
    grid = G.make_grid(images, np.array([1, 1, 1]), num_classes=2, per_class=2)
    assert grid.shape == (4, 4, 3) and (grid[:2] == 0).all() and (grid[2:] == 200).all()


# --- labels -----------------------------------------------------------------------------------------------------


def test_balanced_labels():
    labels = G.make_labels("balanced", np.arange(1000), 10, seed=0)
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [100] * 10
    assert labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_uniform_labels_are_seeded_per_index_and_uniform():
    labels = G.make_labels("uniform", np.arange(5000), 10, seed=0)
    assert labels.dtype == np.int64 and labels.min() == 0 and labels.max() == 9
    counts = np.bincount(labels, minlength=10)
    chi2 = ((counts - 500) ** 2 / 500).sum()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    np.testing.assert_array_equal(G.make_labels("uniform", np.arange(100, 200), 10, seed=0), labels[100:200])
    assert not np.array_equal(G.make_labels("uniform", np.arange(100), 10, seed=1), labels[:100])


def test_seeds_are_distinct_per_index_and_stream():
    seeds = {G.sample_seed(s, i, stream) for s in range(3) for i in range(1000) for stream in ("noise", "label")}
    assert len(seeds) == 6000 and all(0 <= v < 2**63 for v in seeds)


# --- checkpoints and params -------------------------------------------------------------------------------------


def test_official_checkpoint_command(sample_dirs, tmp_path, perturb):
    """The Table 2 command path: a flat state_dict with no config, model and image size given."""
    _, vae_dir = sample_dirs
    torch.manual_seed(0)
    model = perturb(DiT_models["DiT-Ti/8"](input_size=8, num_classes=1000), seed=2).eval()  # latent 8 = 16 px / 2
    torch.save(model.state_dict(), tmp_path / "DiT-Ti-8-16x16.pt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sample": dataclasses.asdict(params())}))
    out = tmp_path / "samples_official"
    metrics = S.main(
        [
            "--official-ckpt",
            str(tmp_path / "DiT-Ti-8-16x16.pt"),
            "--model",
            "DiT-Ti/8",
            "--image-size",
            "16",
            "--vae",
            str(vae_dir),
            "--out",
            str(out),
            "--params",
            str(tmp_path / "params.yaml"),
            "--num-fid-samples",
            "12",
            "--sampler",
            "ddpm",
            "--steps",
            "3",
            "--cfg-scale",
            "1.5",
            "--cfg-channels",
            "3",
            "--labels",
            "uniform",
            "--metrics",
            str(tmp_path / "m.json"),
        ]
    )
    arr, labels = load_samples(out)
    assert arr.shape == (12, IMAGE, IMAGE, 3) and labels.max() < 1000
    manifest = read_manifest(out, "dit-samples", 1, stage="sample")
    assert (manifest["model"], manifest["num_classes"], manifest["cfg_channels"], manifest["sampler"]) == (
        "DiT-Ti/8",
        1000,
        3,
        "ddpm",
    )
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()  # the same pixels straight from the library function
    direct = G.generate_images(
        model,
        vae,
        labels,
        np.arange(12),
        seed=0,
        sampler="ddpm",
        steps=3,
        cfg_scale=1.5,
        cfg_channels=3,
        num_classes=1000,
        latent_shape=LATENT,
        device="cpu",
        batch_size=12,
        micro_batch=8,
        precision="fp32",
        diffusion=DIFFUSION,
    )
    np.testing.assert_array_equal(arr, direct)
    with pytest.raises(ArtifactError, match="--model"):
        S.main(
            [
                "--official-ckpt",
                str(tmp_path / "DiT-Ti-8-16x16.pt"),
                "--model",
                "DiT-Ti/4",
                "--image-size",
                "16",
                "--vae",
                str(vae_dir),
                "--out",
                str(tmp_path / "bad"),
                "--params",
                str(tmp_path / "params.yaml"),
            ]
        )


def test_sampling_uses_the_diffusion_the_model_card_records(models, sample_dirs, tmp_path):
    """The diffusion is read back from model.json, not taken from defaults: another schedule gives other pixels, and
    a card without it names the stage to rerun."""
    indices = np.arange(4)
    cosine = {**DIFFUSION, "noise_schedule": "squaredcos_cap_v2"}
    linear_images = generate(models, indices, indices % NUM_CLASSES, 4)
    assert not np.array_equal(linear_images, generate(models, indices, indices % NUM_CLASSES, 4, diffusion=cosine))
    dit_dir, _ = sample_dirs
    card = json.loads((dit_dir / "model.json").read_text())
    assert card["diffusion"] == DIFFUSION and read_model_card(dit_dir)["diffusion"] == DIFFUSION
    old = tmp_path / "dit"
    old.mkdir()
    (old / "ema.pt").write_bytes((dit_dir / "ema.pt").read_bytes())
    (old / "model.json").write_text(
        json.dumps({**card, "diffusion": {"noise_schedule": "linear", "diffusion_steps": 1000}})
    )
    with pytest.raises(ArtifactError, match=r"learn_sigma.*dvc repro train"):
        read_model_card(old)


def test_stale_or_mismatched_checkpoints_are_rejected(sample_dirs, tmp_path):
    dit_dir, vae_dir = sample_dirs
    card = json.loads((dit_dir / "model.json").read_text())
    bad = tmp_path / "dit"
    bad.mkdir()
    (bad / "ema.pt").write_bytes((dit_dir / "ema.pt").read_bytes())
    (bad / "model.json").write_text(json.dumps({**card, "ema_sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match="not the file model.json describes"):
        read_model_card(bad)
    (bad / "model.json").write_text(json.dumps({**card, "scaling_factor": 0.18215}))
    with pytest.raises(ArtifactError, match="scaling_factor"):
        G.load_models(read_model_card(bad), vae_dir, "cpu")


def test_params_yaml_section_loads_and_is_checked():
    p = load_section(SampleParams, "sample", "params.yaml")
    check_sample_params(p)
    with pytest.raises(ValueError, match=f"multiple of sample.micro_batch={p.micro_batch}"):
        check_sample_params(dataclasses.replace(p, shard_size=p.micro_batch * 8 + 1))
    with pytest.raises(ParamsError, match="num_workers >= 1"):  # in-process: the storage would go unused
        check_sample_params(dataclasses.replace(p, num_workers=0, storage_path="s3://bucket/sample"))
    with pytest.raises(ParamsError, match="absolute"):
        check_sample_params(dataclasses.replace(p, num_workers=1, storage_path="relative/dir"))


def test_actor_plan():
    assert S.actor_plan(params(num_workers=2), 5, {"CPU": 2.0}) == (2, {"num_cpus": 1})
    assert S.actor_plan(params(num_workers=2), 1, {"CPU": 2.0}) == (1, {"num_cpus": 1})
    assert S.actor_plan(params(use_gpu=True, num_workers=1), 9, {"CPU": 16, "GPU": 4.0}) == (
        4,
        {"num_gpus": 1, "num_cpus": 1},
    )
    with pytest.raises(ParamsError, match="no GPU"):
        S.actor_plan(params(use_gpu=True), 9, {"CPU": 16})
    with pytest.raises(ParamsError, match="num_workers"):
        S.actor_plan(params(num_workers=3), 9, {"CPU": 2})


# --- the stage and its MLflow side channel ----------------------------------------------------------------------


def test_grid_is_logged_into_the_training_run(sample_dirs, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    dit_dir, vae_dir = sample_dirs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.create_experiment("sample-test", artifact_location=(tmp_path / "artifacts").as_uri())
    tracking = TrackingParams(enabled=True, experiment="sample-test")
    from pipeline.tracking import Tracker, log_to_training_run

    tracker = Tracker(tracking)
    run_id = tracker.start("train", params={}, tags={}, system_metrics=False)
    tracker.end()
    run_dit = tmp_path / "dit"
    run_dit.mkdir()
    for name in ("ema.pt", "model.json"):
        (run_dit / name).write_bytes((dit_dir / name).read_bytes())
    (run_dit / "tracking.json").write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": None}))
    metrics = S.run_sample(params(num_fid_samples=8), read_model_card(run_dit), vae_dir, tmp_path / "out")
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png").convert("RGB"))
    logged = dict(images={"sample_grid": grid}, artifacts={str(tmp_path / "out" / "manifest.json"): "samples"})
    assert log_to_training_run(tracking, run_dit, metrics, "sample", **logged) == run_id
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.metrics["sample/img_per_s"] == pytest.approx(metrics["img_per_s"])
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "samples")]
    assert artifacts == ["samples/manifest.json"]
    assert log_to_training_run(TrackingParams(enabled=False, experiment="x"), run_dit, metrics, "sample") is None
    assert log_to_training_run(tracking, dit_dir, metrics, "sample") is None  # no run id: no-op


def test_stage_script(sample_dirs, tmp_path, monkeypatch):
    dit_dir, vae_dir = sample_dirs
    settings = {
        "sample": dataclasses.asdict(params(num_fid_samples=8)),
        "tracking": {"enabled": False, "experiment": "unused"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "stages/sample.py",
            "--params",
            str(tmp_path / "params.yaml"),
            "--dit",
            str(dit_dir),
            "--vae",
            str(vae_dir),
            "--out",
            str(tmp_path / "samples"),
            "--metrics",
            str(tmp_path / "metrics" / "sample.json"),
        ],
    )
    runpy.run_path(str(Path(__file__).parents[1] / "stages" / "sample.py"), run_name="__main__")
    metrics = json.loads((tmp_path / "metrics" / "sample.json").read_text())
    assert metrics["img_per_s"] > 0 and load_samples(tmp_path / "samples")[0].shape == (8, IMAGE, IMAGE, 3)
