"""The sample tests' tiny setting, shared by the sample, failure and cluster tests (their models: conftest's
`sample_dirs`)."""

from __future__ import annotations

import numpy as np

from pipeline.params.sample import SampleParams

NUM_CLASSES, LATENT, IMAGE = 4, (4, 8, 8), 16
MICRO = 8  # sample.micro_batch in these tests
SCALE = 0.5
DIFFUSION = {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}  # as train records it


def params(**overrides) -> SampleParams:
    base = dict(
        num_fid_samples=20,
        sampler="dpm-solver++",
        steps=4,
        cfg_scale=1.5,
        cfg_channels=None,
        labels="balanced",
        batch_size=8,
        micro_batch=MICRO,
        precision="fp32",
        compile=False,
        num_workers=0,
        use_gpu=False,
        shard_size=8,
        seed=0,
        grid_per_class=3,
    )
    return SampleParams(**{**base, **overrides})


def load_samples(out_dir):
    with np.load(out_dir / "samples.npz") as f:
        return f["arr_0"], f["labels"]
