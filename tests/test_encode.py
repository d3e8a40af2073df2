"""The `encode` stage: latents that match the VAE, the `dit-latents` contract, and bytes that do not depend on Ray's
actor count or on the batch size."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import kill_once
from tiny_encode import PARAMS, shard_hashes

from pipeline.artifacts import ArtifactError, sha256_dir, sha256_file
from pipeline.autoencoder import encode_images, load_vae
from pipeline.encode import LatentEncoder, encode_local, run_encode
from pipeline.formats.latents import load_latents
from pipeline.params.encode import EncodeParams
from pipeline.params.load import load_section

REPO = Path(__file__).resolve().parents[1]


def encode(encode_inputs: dict, out: Path, **changes) -> tuple[dict, dict[str, torch.Tensor]]:
    encode_local(dataclasses.replace(PARAMS, **changes), encode_inputs["images_dir"], encode_inputs["vae_dir"], out)
    return load_latents(out)


def test_params_yaml_encode_section_loads():
    assert load_section(EncodeParams, "encode", REPO / "params.yaml").micro_batch >= 1


def test_latents_are_the_vae_posterior_of_each_image_and_its_flip(encode_inputs, tmp_path):
    manifest, latents = encode(encode_inputs, tmp_path / "latents")
    vae = load_vae(encode_inputs["vae_dir"])
    x = torch.from_numpy(encode_inputs["images"]).permute(0, 3, 1, 2)  # (20, 3, 16, 16) uint8
    for view, images in enumerate([x, x.flip(-1)]):
        mean, std = encode_images(vae, images)  # one batch of 20: other kernels, so equal only to rounding
        torch.testing.assert_close(latents["mean"][:, view], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(latents["std"][:, view], std, rtol=1e-4, atol=1e-5)
    assert latents["mean"].shape == latents["std"].shape == (20, 2, 4, 8, 8)
    assert torch.equal(latents["label"], torch.from_numpy(encode_inputs["labels"]))
    images_manifest = json.loads((encode_inputs["images_dir"] / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("format", "version", "count", "latent_shape", "dtype", "flip", "store")} == {
        "format": "dit-latents",
        "version": 1,
        "count": 20,
        "latent_shape": [4, 8, 8],
        "dtype": "float32",
        "flip": True,
        "store": "posterior",
    }
    assert manifest["scaling_factor"] == 0.7  # copied from the VAE config; the latents themselves are unscaled
    assert manifest["vae_sha256"] == sha256_dir(encode_inputs["vae_dir"])
    assert manifest["images_manifest_sha256"] == sha256_file(encode_inputs["images_dir"] / "manifest.json")
    assert (manifest["num_classes"], manifest["class_names"], manifest["image_size"]) == (
        images_manifest["num_classes"],
        images_manifest["class_names"],
        16,
    )
    assert [(s["file"], s["count"]) for s in manifest["shards"]] == [
        ("latents-00000.safetensors", 8),
        ("latents-00001.safetensors", 8),
        ("latents-00002.safetensors", 4),
    ]
    assert [s["sha256"] for s in manifest["shards"]] == shard_hashes(tmp_path / "latents")


@pytest.mark.parametrize("store", ["posterior", "sample"])
def test_bytes_do_not_depend_on_the_batch_size(encode_inputs, tmp_path, store):
    runs = [encode(encode_inputs, tmp_path / f"b{b}", store=store, batch_size=b)[0] for b in (1, 7)]
    assert shard_hashes(tmp_path / "b1") == shard_hashes(tmp_path / "b7")
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "flip, store, dtype",
    [
        (False, "posterior", "float16"),
        (False, "sample", "float16"),
        (True, "sample", "float32"),
    ],
)
def test_options_give_the_documented_tensors(encode_inputs, tmp_path, flip, store, dtype):
    manifest, latents = encode(encode_inputs, tmp_path / "latents", flip=flip, store=store, dtype=dtype)
    keys = {"posterior": {"label", "mean", "std"}, "sample": {"label", "sample"}}[store]
    assert set(latents) == keys and (manifest["flip"], manifest["store"], manifest["dtype"]) == (flip, store, dtype)
    for key in keys - {"label"}:
        assert latents[key].shape == (20, 2 if flip else 1, 4, 8, 8)
        assert latents[key].dtype == getattr(torch, dtype)


def test_sample_is_one_draw_seeded_by_the_image_index(encode_inputs, tmp_path):
    _, posterior = encode(encode_inputs, tmp_path / "posterior")
    _, sample = encode(encode_inputs, tmp_path / "sample", store="sample")
    _, reseeded = encode(encode_inputs, tmp_path / "reseeded", store="sample", seed=1)
    for i in (0, 13):  # image i's noise comes from (seed, i) alone
        eps = np.random.Generator(np.random.PCG64(np.random.SeedSequence([PARAMS.seed, i]))).standard_normal(
            (2, 4, 8, 8), dtype=np.float32
        )
        expected = posterior["mean"][i] + posterior["std"][i] * torch.from_numpy(eps)
        assert torch.equal(sample["sample"][i], expected)
    assert not torch.equal(sample["sample"], reseeded["sample"])


def test_a_read_only_batch_as_ray_hands_it_over_encodes_without_a_warning(encode_inputs):
    encoder = LatentEncoder(str(encode_inputs["vae_dir"]), flip=True, micro_batch=4, device="cpu")
    images = encode_inputs["images"][:6]
    frozen = images.copy()
    frozen.flags.writeable = False  # as Ray Data's zero-copy views of its Arrow blocks are
    batch = {"label": encode_inputs["labels"][:6], "index": np.arange(6)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns on a read-only array
        encoded = encoder({**batch, "image": frozen})
    expected = encoder({**batch, "image": images})
    assert np.array_equal(encoded["mean"], expected["mean"]) and np.array_equal(encoded["std"], expected["std"])


@pytest.fixture(scope="module")
def local_ray():
    # 2 CPU actors + 1 CPU for reading and decoding (encode.check_resources); logical CPUs, not cores. A Ray that an
    # earlier module's run left in this process (init_ray keeps it for the next) has another size: stopped first.
    ray.shutdown()
    ray.init(num_cpus=3, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_with_two_actors_equals_single_process_bit_for_bit(encode_inputs, tmp_path, local_ray):
    reference, _ = encode(encode_inputs, tmp_path / "local", store="sample")
    params = dataclasses.replace(PARAMS, store="sample", num_actors=2, batch_size=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Ray's own filter shows a RayDeprecationWarning once per module
        metrics = run_encode(
            params, encode_inputs["images_dir"], encode_inputs["vae_dir"], tmp_path / "ray", tmp_path / "encode.json"
        )
    code = (REPO / "pipeline", REPO / "stages")  # not REPO itself: a venv inside the checkout holds Ray's own files
    ours = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if Path(w.filename).is_relative_to(code[0]) or Path(w.filename).is_relative_to(code[1])
    ]
    assert not ours, ours  # a deprecated or unsafe call of ours, seen from the driver
    assert shard_hashes(tmp_path / "ray") == shard_hashes(tmp_path / "local")
    assert load_latents(tmp_path / "ray")[0] == reference
    assert metrics["count"] == 20 and metrics["num_actors"] == 2 and metrics["img_per_s"] > 0
    assert json.loads((tmp_path / "encode.json").read_text()) == {k: metrics[k] for k in ("seconds", "img_per_s")}
    (lost,) = (tmp_path / "ray-shards").glob("*/latents-00001.safetensors")  # as if killed before that shard
    lost.unlink()
    again = run_encode(
        params, encode_inputs["images_dir"], encode_inputs["vae_dir"], tmp_path / "ray", tmp_path / "encode.json"
    )
    assert again["encoded"] == 8 and shard_hashes(tmp_path / "ray") == shard_hashes(tmp_path / "local")


def test_load_latents_names_the_stage_to_run(tmp_path):
    with pytest.raises(ArtifactError, match="dvc repro encode"):
        load_latents(tmp_path / "missing")


# A subprocess that encodes slowly enough to be killed mid-run: every batch of rows waits first.
SLOW_ENCODE = """
import sys, time
import pipeline.encode as E
from tiny_encode import PARAMS
encode = E.LatentEncoder.__call__
E.LatentEncoder.__call__ = lambda self, batch: (time.sleep(0.4), encode(self, batch))[1]
images, vae, out, shards = sys.argv[1:]
E.encode_local(PARAMS, images, vae, out, shards_dir=shards)
"""


def test_a_killed_encode_resumes_its_finished_shards_and_gives_the_same_bytes(encode_inputs, tmp_path):
    images, vae = encode_inputs["images_dir"], encode_inputs["vae_dir"]
    out, shards = tmp_path / "latents", tmp_path / "latents-shards"
    kill_once(
        [sys.executable, "-c", SLOW_ENCODE, str(images), str(vae), str(out), str(shards)],
        lambda: any(shards.glob("*/latents-00000.safetensors")),
    )
    assert not out.exists()
    (first,) = shards.glob("*/latents-00000.safetensors")
    finished = {f.name: f.stat().st_ino for f in first.parent.glob("latents-*.safetensors")}
    assert 1 <= len(finished) < 3

    encode_local(PARAMS, images, vae, out, shards_dir=shards)
    assert {f: (first.parent / f).stat().st_ino for f in finished} == finished  # kept, not encoded again
    encode_local(PARAMS, images, vae, tmp_path / "uninterrupted")
    assert shard_hashes(out) == shard_hashes(tmp_path / "uninterrupted")
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "uninterrupted"))
    assert {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {}
    assert sha256_file(out / "manifest.json") == sha256_file(tmp_path / "uninterrupted" / "manifest.json")


def test_shards_of_other_settings_are_moved_aside(encode_inputs, tmp_path):
    images, vae, shards = encode_inputs["images_dir"], encode_inputs["vae_dir"], tmp_path / "latents-shards"
    encode_local(PARAMS, images, vae, tmp_path / "latents", shards_dir=shards)
    (old,) = shards.iterdir()
    before = {f.name: sha256_file(f) for f in old.iterdir()}
    encode_local(dataclasses.replace(PARAMS, dtype="float16"), images, vae, tmp_path / "latents", shards_dir=shards)
    moved = tmp_path / "superseded" / f"encode-{old.name}" / old.name
    assert {f.name: sha256_file(f) for f in moved.iterdir()} == before and not old.exists()
