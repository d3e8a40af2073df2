"""CUDA smoke test of the stage code that CI (CPU only) never runs: ingest -> small VAE -> encode on the GPU ->
in-process training with bf16 + torch.compile -> bf16 + compiled sampling -> decode. Tiny sizes; it checks that
the GPU paths run and produce finite, well-shaped outputs, and prints their timings. Ray and MLflow are not used
(num_workers 0, tracking off), so it runs on a GPU box with only torch and diffusers.

    python bench/gpu_smoke.py
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_section
from pipeline.data import IngestParams, ingest
from pipeline.encode import EncodeParams, encode_local
from pipeline.formats.latents import load_latents
from pipeline.formats.model_card import read_model_card
from pipeline.sample import SampleParams, run_sample
from pipeline.tracking import TrackingParams
from pipeline.train import TrainParams, train
from pipeline.vae import VAEParams, build_vae, save_snapshot
from timing import timed


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ing = load_section(IngestParams, "ingest", "params.yaml")
        ing = dataclasses.replace(ing, synthetic=dataclasses.replace(ing.synthetic, num_images=512))
        timed("ingest 512 synthetic images", lambda: ingest(ing, tmp / "images"))
        vae_params = load_section(VAEParams, "vae", "params.yaml")
        torch.manual_seed(0)
        save_snapshot(build_vae(vae_params, ing.image_size), tmp / "vae")  # random weights: the paths, not quality
        enc = dataclasses.replace(load_section(EncodeParams, "encode", "params.yaml"), use_gpu=True, micro_batch=64)
        timed("encode on cuda", lambda: encode_local(enc, tmp / "images", tmp / "vae", tmp / "latents", "cuda"))
        manifest, tensors = load_latents(tmp / "latents")
        assert all(torch.isfinite(v.float()).all() for v in tensors.values())

        tp = dataclasses.replace(load_section(TrainParams, "train", "params.yaml"), num_workers=0, use_gpu=True,
                                 precision="bf16", compile=True, train_steps=40, ckpt_every=20, log_every=10,
                                 global_batch_size=64)
        metrics = timed("train 40 steps bf16+compile", lambda: train(
            tp, TrackingParams(enabled=False, experiment="smoke"), tmp / "latents", tmp / "ckpt", tmp / "dit",
            tmp / "train.json", tmp / "train.csv", vae_dir=tmp / "vae"))
        assert np.isfinite(metrics["loss"]), metrics

        sp = dataclasses.replace(load_section(SampleParams, "sample", "params.yaml"), num_workers=0, use_gpu=True,
                                 precision="bf16", compile=True, num_fid_samples=128, batch_size=128,
                                 micro_batch=64, shard_size=64)
        card = read_model_card(tmp / "dit")
        out = timed("sample 128 bf16+compile", lambda: run_sample(sp, card, tmp / "vae", tmp / "samples"))
        with np.load(tmp / "samples" / "samples.npz") as f:
            assert f["arr_0"].shape == (128, ing.image_size, ing.image_size, 3) and f["arr_0"].dtype == np.uint8
        again = run_sample(sp, card, tmp / "vae", tmp / "samples_again")
        with np.load(tmp / "samples" / "samples.npz") as a, np.load(tmp / "samples_again" / "samples.npz") as b:
            same = np.array_equal(a["arr_0"], b["arr_0"])
        print(json.dumps({"train": metrics, "sample": out, "sample_again": again, "repeatable_on_gpu": same}))


if __name__ == "__main__":
    main()
