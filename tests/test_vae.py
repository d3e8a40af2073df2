"""The `vae` stage: the small KL-VAE trained here, the pretrained snapshot path, and the encode/decode helpers."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from synthetic import blob_images, write_images_dir

from pipeline.artifacts import sha256_dir
from pipeline.autoencoder import decode_latents, encode_images, load_vae, to_uint8
from pipeline.determinism import holdout_split
from pipeline.formats.images import read_images
from pipeline.params.load import ParamsError, load_section
from pipeline.params.vae import VAEParams
from pipeline.provenance import NO_INPUT, hub_revision
from pipeline.vae import psnr_db, run_vae

REPO = Path(__file__).resolve().parents[1]


# --- tiny fixtures: colour blobs (synthetic.blob_images, stored by synthetic.write_images_dir), a random VAE (conftest)

# 16x16 images, downsample 2 -> 8x8 latents. 500 steps (~15 s of CPU) is about where this VAE leaves the flat-colour
# plateau (measured: ~17 dB at 300 steps, ~22.7 dB at 500); 512 images so that it generalises rather than memorises.
TINY = VAEParams(
    pretrained=None,
    pretrained_dir=NO_INPUT,
    block_out_channels=(8, 16),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
    train_steps=500,
    batch_size=16,
    lr=2e-3,
    kl_weight=1e-6,
    init_logvar=-6.0,
    holdout=32,
    seed=0,
)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    images, labels = blob_images(512, 16, seed=0)
    return write_images_dir(tmp_path_factory.mktemp("images"), images, labels, 3, shard_size=200)


@pytest.fixture(scope="module")
def trained(images_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vae") / "vae"
    metrics = run_vae(TINY, images_dir, out, out.parent / "metrics" / "vae.json")
    return out, metrics


def test_params_yaml_vae_section_loads():
    params = load_section(VAEParams, "vae", REPO / "params.yaml")
    assert len(params.block_out_channels) == 3  # downsample 4, as documented there


@pytest.mark.slow
def test_small_vae_reconstructs_held_out_images(images_dir, trained):
    out, metrics = trained
    images, _, _ = read_images(images_dir)
    holdout = images[holdout_split(len(images), TINY.holdout, TINY.seed, "vae.holdout")[1]]
    # Baseline: every held-out pixel replaced by its image's mean colour (what an untrained VAE drifts to).
    flat = np.broadcast_to(holdout.mean((1, 2), keepdims=True).round(), holdout.shape).astype(np.uint8)
    baseline_db = psnr_db(torch.from_numpy(flat), torch.from_numpy(holdout))
    assert metrics["psnr_db"] > 20.0 and metrics["psnr_db"] > baseline_db + 3.0, (metrics, baseline_db)
    assert metrics["latent_shape"] == [4, 8, 8] and metrics["train_steps"] == TINY.train_steps
    assert json.loads((out.parent / "metrics" / "vae.json").read_text()) == {
        k: metrics[k] for k in ("psnr_db", "seconds")
    }


@pytest.mark.slow
def test_scaling_factor_is_inverse_latent_std_and_reloads(images_dir, trained):
    out, metrics = trained
    vae = load_vae(out)
    scale = vae.config.scaling_factor
    assert scale == metrics["scaling_factor"] and scale != 1.0
    assert json.loads((out / "config.json").read_text())["scaling_factor"] == scale
    images, _, _ = read_images(images_dir)
    train = torch.from_numpy(images[holdout_split(len(images), TINY.holdout, TINY.seed, "vae.holdout")[0]]).permute(
        0, 3, 1, 2
    )
    mean, std = encode_images(vae, train)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(123))  # a fresh draw
    assert (z * scale).std().item() == pytest.approx(1.0, rel=0.02)


def test_training_is_deterministic(images_dir, tmp_path):
    short = dataclasses.replace(TINY, train_steps=10)
    for run in ("a", "b"):
        run_vae(short, images_dir, tmp_path / run, tmp_path / f"{run}.json")
    assert sha256_dir(tmp_path / "a") == sha256_dir(tmp_path / "b")


def test_decode_divides_by_the_scaling_factor_and_rounds_like_the_official_scripts(tiny_vae):
    vae = tiny_vae(scaling_factor=0.5)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ((vae.decode(z).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    images = decode_latents(vae, z * 0.5)
    assert images.dtype == torch.uint8 and images.shape == (2, 16, 16, 3)
    assert torch.equal(images, expected)
    edges = to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5))
    assert edges[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_encode_accepts_uint8_or_pixels_in_minus_one_one(tiny_vae):
    vae = tiny_vae(scaling_factor=1.0)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean_u8, std_u8 = encode_images(vae, images)
    mean_f, std_f = encode_images(vae, images.float() / 127.5 - 1)
    assert mean_u8.shape == std_u8.shape == (3, 4, 8, 8) and (std_u8 > 0).all()
    assert torch.equal(mean_u8, mean_f) and torch.equal(std_u8, std_f)


def test_pretrained_local_directory_is_snapshotted_unchanged(images_dir, tmp_path, tiny_vae):
    source = tmp_path / "my-vae"
    tiny_vae(scaling_factor=0.18215, seed=1).save_pretrained(source)
    params = dataclasses.replace(TINY, pretrained_dir=str(source))
    metrics = run_vae(params, images_dir, tmp_path / "vae", tmp_path / "vae.json")
    original, snapshot = load_vae(source), load_vae(tmp_path / "vae")

    def public(config):  # not _name_or_path
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(snapshot.config) == public(original.config)
    assert snapshot.config.scaling_factor == 0.18215  # a pretrained VAE keeps its own scale
    for (name, a), (_, b) in zip(original.state_dict().items(), snapshot.state_dict().items()):
        assert torch.equal(a, b), name
    assert metrics["train_steps"] == 0 and metrics["latent_shape"] == [4, 8, 8]
    assert json.loads((tmp_path / "vae" / "source.json").read_text()) == {"kind": "local", "path": str(source)}
    with pytest.raises(ParamsError, match="not both"):  # a hub id and a local snapshot at once
        dataclasses.replace(TINY, pretrained="org/vae", pretrained_dir=str(source))
    with pytest.raises(ParamsError, match="DVC cannot see"):  # a local path must be a dvc.yaml dep
        run_vae(dataclasses.replace(TINY, pretrained=str(source)), images_dir, tmp_path / "v2", tmp_path / "v2.json")


def test_hub_revision_is_the_snapshot_commit(tmp_path, tiny_vae):
    """A hub VAE is pinned by the commit its snapshot resolved to: the hub cache's layout, built here offline."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tiny-vae"
    tiny_vae(scaling_factor=0.5, seed=0).save_pretrained(repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    assert hub_revision("org/tiny-vae", cache_dir=tmp_path) == sha
    assert hub_revision("org/tiny-vae", revision=sha, cache_dir=tmp_path) == sha
    assert hub_revision("org/other-vae", cache_dir=tmp_path) is None


def test_unreachable_pretrained_fails_fast_with_the_fix(images_dir, tmp_path):
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # set by conftest before huggingface_hub was imported
    params = dataclasses.replace(TINY, pretrained="no-such-org/no-such-vae")
    start = time.perf_counter()
    with pytest.raises(ParamsError, match="vae.pretrained='no-such-org/no-such-vae'") as info:
        run_vae(params, images_dir, tmp_path / "vae", tmp_path / "vae.json")
    assert time.perf_counter() - start < 10.0  # offline: no download retries
    assert "HF_HUB_OFFLINE=0" in str(info.value) and "save_pretrained" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert not (tmp_path / "vae").exists()


def test_holdout_must_leave_training_images():
    with pytest.raises(ValueError, match="vae.holdout=48"):
        holdout_split(48, 48, seed=0, param="vae.holdout")


def test_params_reject_groups_that_do_not_divide_the_channels():
    with pytest.raises(ParamsError, match="vae.norm_num_groups"):
        dataclasses.replace(TINY, norm_num_groups=3)
