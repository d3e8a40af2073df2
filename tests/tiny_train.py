"""The train tests' tiny run, shared by the train, curve and failure tests: a `dit-latents` artifact of 64 examples
(4x8x8, 4 classes), a depth-2 DiT and the train params that run it in seconds on a CPU."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

import pipeline.train as T
from pipeline.artifacts import sha256_file, write_manifest
from pipeline.params.load import load_section
from pipeline.params.tracking import TrackingParams
from pipeline.params.train import TrainParams

REPO = Path(__file__).resolve().parents[1]
TINY = dict(depth=2, hidden_size=64, num_heads=2)  # model_overrides: a depth-2 DiT
NUM_CLASSES, LATENT_SHAPE, SCALING_FACTOR = 4, (4, 8, 8), 0.5
OFF = TrackingParams(enabled=False, experiment="test-train")


def write_latents(directory: Path, count: int = 64, store: str = "posterior") -> Path:
    """A `dit-latents` v1 artifact: each class is one random prototype (and its mirror image), so it can be learnt."""
    g = torch.Generator().manual_seed(0)
    label = torch.arange(count) % NUM_CLASSES
    mean = (torch.randn(NUM_CLASSES, *LATENT_SHAPE, generator=g) * 2)[label]  # (N, C, h, w), unscaled
    mean = torch.stack([mean, mean.flip(-1)], dim=1)  # (N, F=2, C, h, w)
    tensors = {"label": label}
    if store == "posterior":
        tensors.update(mean=mean.half(), std=torch.full_like(mean, 0.05).half())
    else:
        tensors["sample"] = mean.half()
    directory.mkdir(parents=True)
    save_file(tensors, directory / "latents-00000.safetensors")
    write_manifest(
        directory,
        "dit-latents",
        1,
        count=count,
        latent_shape=list(LATENT_SHAPE),
        dtype="float16",
        flip=True,
        store=store,
        scaling_factor=SCALING_FACTOR,
        vae_sha256="0" * 64,
        images_manifest_sha256="0" * 64,
        num_classes=NUM_CLASSES,
        class_names=[f"class{i}" for i in range(NUM_CLASSES)],
        image_size=16,
        shards=[
            {
                "file": "latents-00000.safetensors",
                "count": count,
                "size": (directory / "latents-00000.safetensors").stat().st_size,
                "sha256": sha256_file(directory / "latents-00000.safetensors"),
            }
        ],
    )
    return directory


def base_params(**changes) -> TrainParams:
    p = load_section(TrainParams, "train", REPO / "params.yaml")
    p = replace(
        p,
        # The loop's tests extend runs (train_steps 10 -> 20), which a constant lr allows and a decaying one refuses,
        # and read a 16-token model: the loop as the findings study ran it, whatever the offline default becomes.
        model="DiT-Ti/2",
        lr_schedule="constant",
        num_workers=0,
        use_gpu=False,
        train_steps=30,
        global_batch_size=16,
        lr=1e-3,
        ema_decay=0.9,
        log_every=5,
        ckpt_every=10,
        sample_every=1000,
        precision="fp32",
        compile=False,
        seed=0,
    )
    return replace(p, **changes)


def run(root: Path, latents: Path, p: TrainParams, tracking=OFF, vae=None, **options) -> dict:
    """`options`: train's restart_on_mismatch, resume_across_versions."""
    return T.train(
        p,
        tracking,
        latents,
        root / "checkpoints",
        root / "dit",
        root / "metrics.json",
        root / "train.csv",
        vae_dir=vae,
        model_overrides=TINY,
        **options,
    )


def load_ema(root: Path) -> dict:
    return torch.load(root / "dit" / "ema.pt", map_location="cpu", weights_only=True)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"EMA tensors differ: {bad[:5]}"


def read_log(path: Path, without=("img_per_s",)) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in without} for row in csv.DictReader(f)]
