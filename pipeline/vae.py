"""The `vae` stage: the autoencoder whose latent space DiT models (DiT Sec. 3.1, after LDM, Rombach et al. 2022).

Either a pretrained KL-VAE (the paper's stabilityai/sd-vae-ft-ema, downsample 8) or, for the offline default, a small
KL-VAE (downsample 4) trained here on the ingested images. Both end as a diffusers `save_pretrained` snapshot in
`models/vae/` whose `config.json` carries the latent `scaling_factor`; nothing downstream touches the hub again.
Pixels are in [-1, 1] as in DiT; latents leave `encode_images` unscaled and enter `decode_latents` scaled.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from huggingface_hub.errors import HFValidationError
from tqdm import tqdm

from pipeline.artifacts import atomic_write_json
from pipeline.autoencoder import decode_latents, encode_images, save_snapshot, to_pixels
from pipeline.determinism import holdout_split
from pipeline.formats import images as image_shards
from pipeline.params.load import ParamsError
from pipeline.params.vae import VAEParams
from pipeline.provenance import NO_INPUT, hub_revision, local_input
from pipeline.timing import mark_ready


def psnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR of uint8 images, in dB, over the whole set (peak 255)."""
    mse = (x.double() - y.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def load_pretrained(name_or_path: str) -> AutoencoderKL:
    """A pretrained AutoencoderKL from the hub (or its cache) or a local save_pretrained directory; fails fast."""
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=False)
    except (OSError, HFValidationError) as e:
        raise ParamsError(
            f"vae.pretrained={name_or_path!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Either allow hub downloads once (network access and HF_HUB_OFFLINE=0) so it lands in the HF cache, or "
            "put a directory written by AutoencoderKL.save_pretrained (config.json + weights) under inputs/, "
            "`dvc add` it and set vae.pretrained: null and vae.pretrained_dir to it, or set both to null and "
            f"{NO_INPUT} to train the small VAE on the ingested images."
        ) from e
    if vae.config.shift_factor:  # SD3/FLUX-style VAEs: z = (x - shift) * scale, which the latent contract lacks
        raise ValueError(
            f"vae.pretrained={name_or_path!r} has shift_factor={vae.config.shift_factor}; the latents "
            "contract (scale only, as in DiT and SD 1.x/2.x) cannot represent it"
        )
    return vae


def source_record(params: VAEParams) -> dict:
    """Where the weights came from: a hub id pinned by the commit it resolved to (from the hub cache that
    from_pretrained just used), a local snapshot (dvc.lock pins its content), or training here."""
    if params.pretrained is not None:
        return {"kind": "hub", "id": params.pretrained, "resolved_revision": hub_revision(params.pretrained)}
    if local_input(params.pretrained_dir) is not None:
        return {"kind": "local", "path": params.pretrained_dir}
    return {"kind": "trained"}


def reconstruct(vae: AutoencoderKL, images_uint8: np.ndarray, batch_size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, H, W, 3) through the posterior mean, in batches."""
    out = []
    for i in range(0, len(images_uint8), batch_size):
        x = torch.from_numpy(images_uint8[i : i + batch_size]).permute(0, 3, 1, 2)
        mean, _ = encode_images(vae, x)
        out.append(decode_latents(vae, mean * vae.config.scaling_factor))
    return torch.cat(out)


# --- training the small KL-VAE -----------------------------------------------------------------------------------


def build_vae(params: VAEParams, image_size: int) -> AutoencoderKL:
    n = len(params.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=params.block_out_channels,
        layers_per_block=params.layers_per_block,
        latent_channels=params.latent_channels,
        norm_num_groups=params.norm_num_groups,
        sample_size=image_size,
        scaling_factor=1.0,  # replaced by 1/std of the trained latents (train_small_vae)
    )
    # quant_conv maps encoder features to the posterior's (mean, logvar) channels. Its default init gives std ~ 1,
    # and with kl_weight ~ 1e-6 only the reconstruction gradient shrinks it: measured, that costs a short run most
    # of its steps. Starting narrower lets the decoder see the signal from step 0.
    with torch.no_grad():
        vae.quant_conv.bias[params.latent_channels :] = params.init_logvar
    return vae


def batch_order(num_images: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) image indices: seeded epoch permutations, concatenated, so the order is reproducible."""
    g = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch_size / num_images)
    return torch.cat([torch.randperm(num_images, generator=g) for _ in range(epochs)])[: steps * batch_size].view(
        steps, batch_size
    )


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, g: torch.Generator) -> torch.Tensor:
    """Negative ELBO with a Gaussian decoder, LDM style: per-image summed squared error + kl_weight * per-image KL."""
    posterior = vae.encode(x).latent_dist
    x_rec = vae.decode(posterior.sample(generator=g)).sample
    reconstruction = (x_rec - x).pow(2).flatten(1).sum(1).mean()
    return reconstruction + kl_weight * posterior.kl().mean()


def fit(vae: AutoencoderKL, train_images: np.ndarray, params: VAEParams) -> None:
    """Adam on `vae_loss` over seeded batches of `train_images` uint8 (N, H, W, 3)."""
    mark_ready()
    opt = torch.optim.Adam(vae.parameters(), lr=params.lr)
    g = torch.Generator().manual_seed(params.seed)
    order = batch_order(len(train_images), params.batch_size, params.train_steps, params.seed)
    vae.train()
    bar = tqdm(order, desc="vae", unit="step")
    for step, idx in enumerate(bar):
        x = to_pixels(torch.from_numpy(train_images[idx.numpy()]).permute(0, 3, 1, 2))
        loss = vae_loss(vae, x, params.kl_weight, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss_per_pixel=f"{loss.item() / x[0].numel():.4f}")
    vae.eval()


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images_uint8: np.ndarray, batch_size: int, seed: int) -> float:
    """1 / std of posterior samples over `images_uint8` (LDM's scale_by_std), so scaled latents have unit variance."""
    g = torch.Generator().manual_seed(seed)
    total, total_sq, n = 0.0, 0.0, 0
    for i in range(0, len(images_uint8), batch_size):
        x = to_pixels(torch.from_numpy(images_uint8[i : i + batch_size]).permute(0, 3, 1, 2))
        z = vae.encode(x).latent_dist.sample(generator=g).double()
        total, total_sq, n = total + z.sum().item(), total_sq + z.pow(2).sum().item(), n + z.numel()
    variance = total_sq / n - (total / n) ** 2
    return 1.0 / math.sqrt(variance)


def train_small_vae(images: np.ndarray, params: VAEParams) -> tuple[AutoencoderKL, np.ndarray]:
    """Train on all but the holdout; returns the VAE (scaling_factor set in its config) and the holdout images."""
    train_idx, holdout_idx = holdout_split(len(images), params.holdout, params.seed, "vae.holdout")
    torch.manual_seed(params.seed)
    vae = build_vae(params, image_size=images.shape[1])
    fit(vae, images[train_idx], params)
    vae.register_to_config(scaling_factor=latent_scale(vae, images[train_idx], params.batch_size, params.seed))
    return vae, images[holdout_idx]


# --- the stage ---------------------------------------------------------------------------------------------------


def run_vae(params: VAEParams, images_dir: str | Path, out_dir: str | Path, metrics_path: str | Path) -> dict:
    """Write the VAE snapshot to `out_dir` and its metrics (holdout PSNR, seconds) to `metrics_path`; return them
    with the facts of the snapshot (latent shape, scale, steps), which its config and the encode stage record.

    The pretrained path measures PSNR on a seeded subset of the first image shard only, so that it never decodes a
    whole ImageNet-sized dataset to pick a few hundred images."""
    start = time.perf_counter()
    if params.pretrained is not None and Path(params.pretrained).exists():
        raise ParamsError(
            f"vae.pretrained = {params.pretrained!r} is a local path, which DVC cannot see there: "
            "`dvc add` it, set vae.pretrained_dir to it and vae.pretrained: null"
        )
    pretrained = params.pretrained or local_input(params.pretrained_dir)
    if pretrained is None:
        images, _, _ = image_shards.read_images(images_dir)
        vae, holdout = train_small_vae(images, params)
    else:
        vae = load_pretrained(pretrained).eval()
        manifest = image_shards.read_manifest(images_dir)
        images, _ = image_shards.read_shard(images_dir, manifest["shards"][0], manifest["image_size"])
        held = holdout_split(len(images), min(params.holdout, len(images) - 1), params.seed, "vae.holdout")[1]
        holdout = images[held]
    reconstructions = reconstruct(vae, holdout, params.batch_size)
    latent = encode_images(vae, torch.from_numpy(holdout[:1]).permute(0, 3, 1, 2))[0]
    save_snapshot(vae, out_dir, source_record(params))
    metrics = {
        "psnr_db": round(psnr_db(reconstructions, torch.from_numpy(holdout)), 3),
        "holdout_images": len(holdout),
        "train_steps": 0 if pretrained is not None else params.train_steps,
        "latent_shape": list(latent.shape[1:]),
        "scaling_factor": vae.config.scaling_factor,
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(metrics_path, {k: metrics[k] for k in ("psnr_db", "seconds")})
    return metrics
