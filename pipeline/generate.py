"""Seeded per-index generation: the one place that turns (seed, global index, label) into an image.

Used by the sample stage, the curve stage, train's EMA sample grids, the registered pyfunc and the benchmarks, so
they all draw sample i the same way. Sample i draws its label and all its noise from generators seeded by
(seed, i) (`sample_seed`), and the network and the VAE always run on blocks of `micro_batch` consecutive global
indices, padded when a request covers part of a block, so every call has the same shape and sample i sits at row
i % micro_batch (see `pipeline.sample` for why fixed shapes make the bytes independent of the batching).

The diffusion that samples is the one the model was trained with, read from its model card or checkpoint
(`diffusion`: noise_schedule, diffusion_steps, learn_sigma), never a default.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.artifacts import ArtifactError
from pipeline.attention import attention_backend
from pipeline.autoencoder import decode_latents, load_vae
from pipeline.diffusion import sample as diffusion_sample
from pipeline.model import DiT
from pipeline.numerics import autocast, float32_mode

GRID_MAX_CLASSES = 32  # display only: 1000 rows of 256 px images would make a 256k-pixel-tall PNG


# --- seeds and labels -------------------------------------------------------------------------------------------


def sample_seed(seed: int, index: int, stream: str) -> int:
    """63-bit generator seed of sample `index`'s `stream` ("noise" or "label"): a hash, so unlike seed * K + i no
    two (seed, index) pairs can collide, and the label draw never shifts the noise stream."""
    digest = hashlib.sha256(f"dit-sample/{stream}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generators(seed: int, indices: np.ndarray, stream: str) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, int(i), stream)) for i in indices]


def make_labels(mode: str, indices: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """int64 (N,) class of each global index: balanced = i % num_classes, uniform = a seeded draw per index."""
    if mode == "balanced":
        return (np.asarray(indices) % num_classes).astype(np.int64)
    if mode == "uniform":
        draws = [torch.randint(num_classes, (1,), generator=g) for g in generators(seed, indices, "label")]
        return torch.cat(draws).numpy().astype(np.int64) if draws else np.zeros(0, np.int64)
    raise ValueError(f"unknown labels mode {mode!r}; use 'balanced' or 'uniform'")


# --- the model ----------------------------------------------------------------------------------------------------


def build_dit(card: dict, device) -> DiT:
    """The model rebuilt from the card's own config, EMA weights loaded strictly, in eval mode."""
    model = DiT.from_config(card["model_kwargs"])
    state = torch.load(card["checkpoint"], map_location="cpu", weights_only=True)
    if isinstance(state.get("ema"), dict):  # a training checkpoint (official train.py or ours): take its EMA
        state = state["ema"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(
            f"{card['checkpoint']} does not fit {card['model']} {card['model_kwargs']} (for an "
            f"official checkpoint, check --model and --image-size): {e}"
        ) from e
    return model.to(device).eval()


def load_models(card: dict, vae_dir: str | Path, device):
    """(DiT, VAE) on `device`; checks that the model was trained on latents of this VAE's scale."""
    model, vae = build_dit(card, device), load_vae(vae_dir, device)
    trained_scale = card["scaling_factor"]
    if trained_scale is not None and not math.isclose(trained_scale, vae.config.scaling_factor, rel_tol=1e-6):
        raise ArtifactError(
            f"the DiT was trained on latents scaled by {trained_scale} but {vae_dir} has "
            f"scaling_factor {vae.config.scaling_factor}; run `dvc repro encode train`"
        )
    return model, vae


# --- generation -------------------------------------------------------------------------------------------------


class FixedShapeNet:
    """The DiT as the sampler sees it, run on blocks of exactly `rows` rows whatever the batch, so that every
    network call has one shape. The sampler's inputs are whole blocks; with guidance they are [cond; uncond]
    (official layout) and each block's cond rows go with its own uncond rows."""

    training = False

    def __init__(self, model: DiT, rows: int):
        self.model, self.rows = model, rows

    def __call__(self, x, t, y):  # (N, C, H, W), (N,), (N,) -> (N, 2C, H, W)
        r = self.rows
        return torch.cat([self.model(x[s : s + r], t[s : s + r], y[s : s + r]) for s in range(0, len(x), r)])

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels):  # x (2N, C, H, W) = [cond; uncond]
        n, r = len(x) // 2, self.rows
        outs = []
        for s in range(0, n, r):
            pair = [torch.cat([v[s : s + r], v[n + s : n + s + r]]) for v in (x, t, y)]
            outs.append(self.model.forward_with_cfg(*pair, cfg_scale=cfg_scale, cfg_channels=cfg_channels))
        return torch.cat([o[:r] for o in outs] + [o[r:] for o in outs])


def generate_images(
    model,
    vae,
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    seed: int,
    sampler: str,
    steps: int,
    cfg_scale: float,
    cfg_channels: int | None,
    num_classes: int,
    latent_shape: tuple,
    device,
    batch_size: int,
    micro_batch: int,
    precision: str,
    diffusion: dict,
    progress: bool = False,
    attention: str = "auto",
) -> np.ndarray:
    """uint8 (N, H, W, 3) images of global samples `indices` (N,) with classes `labels` (N,); `diffusion` is the
    model's training diffusion (model_card.read_diffusion: noise_schedule, diffusion_steps, learn_sigma).

    Image i depends only on (seed, indices[i], labels[i]) and the sampling settings, never on N, on batch_size
    or on which worker made it, for a given `micro_batch` (see the module docstring). `batch_size` images share
    one sampler loop. `attention` names the SDPA kernel (pipeline/attention.py)."""
    labels, indices = np.asarray(labels, dtype=np.int64), np.asarray(indices, dtype=np.int64)
    if labels.shape != indices.shape or labels.ndim != 1 or len(np.unique(indices)) != len(indices):
        raise ValueError(
            f"labels and indices must be 1-D of one length with distinct indices, got "
            f"{labels.shape} and {indices.shape}"
        )
    if batch_size < 1 or (indices < 0).any():
        raise ValueError(f"need batch_size >= 1 (got {batch_size}) and indices >= 0")
    wanted = dict(zip(indices.tolist(), labels.tolist()))
    blocks = np.unique(indices // micro_batch)
    per_loop = math.ceil(batch_size / micro_batch)
    net, found = FixedShapeNet(model, micro_batch), {}
    for start in tqdm(range(0, len(blocks), per_loop), desc="batches", disable=not progress):
        rows = (blocks[start : start + per_loop, None] * micro_batch + np.arange(micro_batch)).reshape(-1)
        y = torch.tensor([wanted.get(i, 0) for i in rows.tolist()])  # rows nobody asked for are padding
        with torch.inference_mode(), float32_mode(precision):
            with autocast(precision, device), attention_backend(attention):
                z = diffusion_sample(
                    net,
                    sampler=sampler,
                    steps=steps,
                    shape=(len(rows), *latent_shape),
                    y=y,
                    cfg_scale=cfg_scale,
                    cfg_channels=cfg_channels,
                    generators=generators(seed, rows, "noise"),
                    num_classes=num_classes,
                    device=device,
                    **diffusion,
                )
            images = torch.cat([decode_latents(vae, block) for block in z.split(micro_batch)]).numpy()
        found.update((i, image) for i, image in zip(rows.tolist(), images) if i in wanted)
    if not len(indices):
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.stack([found[i] for i in indices.tolist()])


# --- grids ------------------------------------------------------------------------------------------------------


def make_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """uint8 (rows * H, per_class * W, 3): row c holds the first `per_class` samples of class c in index order,
    black where a class has fewer; rows = min(num_classes, GRID_MAX_CLASSES)."""
    rows, (h, w) = min(num_classes, GRID_MAX_CLASSES), images.shape[1:3]
    grid = np.zeros((rows, per_class, h, w, 3), np.uint8)
    for c in range(rows):
        picked = np.flatnonzero(labels == c)[:per_class]
        grid[c, : len(picked)] = images[picked]
    return grid.transpose(0, 2, 1, 3, 4).reshape(rows * h, per_class * w, 3)
