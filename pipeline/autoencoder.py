"""The VAE as every stage after `vae` uses it: load the DVC-versioned snapshot, encode pixels, decode latents.

DiT models the latent space of a KL-VAE (DiT Sec. 3.1, after LDM, Rombach et al. 2022). The snapshot in
`models/vae/` is a diffusers `save_pretrained` directory whose `config.json` carries the latent `scaling_factor`.
Pixels are in [-1, 1] as in DiT; latents leave `encode_images` unscaled and enter `decode_latents` scaled. How the
weights are made (a pretrained download, or the small VAE trained here) is the `vae` stage's business
(pipeline/vae.py), kept apart so that editing the trainer reruns only that stage.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from pipeline.artifacts import ArtifactError, atomic_write_json, staged_dir

SOURCE_FILE = "source.json"  # in the snapshot: where its weights came from (`vae.source_record`)


def to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) in [0, 255] -> float32 (N, 3, H, W) in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounded as the official sampling scripts store images."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_snapshot(vae: AutoencoderKL, out_dir: str | Path, source: dict | None = None) -> Path:
    """The save_pretrained snapshot, plus `source.json` (`source_record`) when given."""
    with staged_dir(out_dir) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        if source is not None:
            atomic_write_json(tmp / SOURCE_FILE, source)
    return Path(out_dir)


def load_vae(snapshot_dir: str | Path, device: str | torch.device = "cpu") -> AutoencoderKL:
    """The DVC-versioned snapshot written by the `vae` stage, in eval mode on `device`. Never reads the hub."""
    snapshot_dir = Path(snapshot_dir)
    if not (snapshot_dir / "config.json").exists():
        raise ArtifactError(f"{snapshot_dir}/config.json is missing; run `dvc repro vae` to produce the VAE snapshot")
    vae = AutoencoderKL.from_pretrained(snapshot_dir, local_files_only=True, low_cpu_mem_usage=False)
    return vae.to(device).eval()


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, H, W) in [0, 255], or float (N, 3, H, W) in [-1, 1] -> posterior (mean, std), each float32
    (N, C, h, w), *unscaled* (raw VAE latents)."""
    x = to_pixels(images) if images.dtype == torch.uint8 else images
    # One memory layout for every call: an NHWC view (e.g. a permuted image batch) makes the conv backends pick
    # other kernels, which round differently.
    x = x.to(device=vae.device, dtype=vae.dtype).contiguous()
    posterior = vae.encode(x).latent_dist
    return posterior.mean.float().contiguous(), posterior.std.float().contiguous()  # conv outputs may be NHWC


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z_scaled: torch.Tensor) -> torch.Tensor:
    """Scaled latents (N, C, h, w) as DiT models them -> uint8 images (N, H, W, 3). Undoes the latent scale first,
    decode(z / scaling_factor), as the official sample scripts do."""
    z = z_scaled.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    return to_uint8(vae.decode(z).sample)
