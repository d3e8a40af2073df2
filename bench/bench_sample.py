"""Sampling throughput (img/s) of the sample stage's library path, `generate_images`, with random weights.

The default is the offline default model: DiT-Ti/2 on 8x8x4 latents (32 px images) with the small VAE of
params.yaml (block_out_channels 32, 64, 64), 10 classes, cfg 1.5, comparing DPM-Solver++ at 25 steps with the
paper's DDPM at 250 steps. Random weights cost what trained ones cost. On a GPU, the paper's setting:

    python bench/bench_sample.py --device cuda --model DiT-XL/2 --latent-size 32 --vae-arch sd \
        --num-classes 1000 --num-images 64 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from diffusers import AutoencoderKL
from timing import synchronize

from pipeline.diffusion import DIT_DIFFUSION
from pipeline.generate import generate_images
from pipeline.model import DiT_models

VAE_ARCHS = {  # (block_out_channels, layers_per_block): the small VAE trained here, and SD's (sd-vae-ft-ema)
    "small": ((32, 64, 64), 1),
    "sd": ((128, 256, 512, 512), 2),
}


def random_models(args, device):
    torch.manual_seed(0)
    model = DiT_models[args.model](input_size=args.latent_size, num_classes=args.num_classes)
    with torch.no_grad():  # adaLN-Zero starts as the identity; perturb so every layer does real work
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    channels, layers = VAE_ARCHS[args.vae_arch]
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=1.0,
    )
    return model.to(device).eval(), vae.to(device).eval()


def run(model, vae, args, sampler: str, steps: int, n: int, device) -> float:
    """Seconds to generate n images."""
    indices = np.arange(n, dtype=np.int64)
    synchronize(device)
    start = time.perf_counter()
    generate_images(
        model,
        vae,
        indices % args.num_classes,
        indices,
        seed=0,
        sampler=sampler,
        steps=steps,
        cfg_scale=args.cfg_scale,
        cfg_channels=None,
        num_classes=args.num_classes,
        latent_shape=(4, args.latent_size, args.latent_size),
        device=device,
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        precision=args.precision,
        diffusion={**DIT_DIFFUSION, "learn_sigma": model.config["learn_sigma"]},
    )
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="DiT-Ti/2")
    ap.add_argument("--latent-size", type=int, default=8)
    ap.add_argument("--vae-arch", choices=sorted(VAE_ARCHS), default="small")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=8, help="images per network call (sample.micro_batch)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="DiT under bf16 autocast or not")
    ap.add_argument("--runs", default="dpm-solver++:25,ddpm:250", help="sampler:steps pairs")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, vae = random_models(args, device)
    run(model, vae, args, "ddim", 2, args.micro_batch, device)  # warm-up: allocator, kernels, lazy imports
    results = []
    print(
        f"{args.model} latent {args.latent_size} vae {args.vae_arch} cfg {args.cfg_scale} on {device} "
        f"({torch.get_num_threads()} threads), {args.num_images} images, batch {args.batch_size}"
    )
    print(f"{'sampler':>14} {'steps':>6} {'seconds':>9} {'img/s':>9} {'img*steps/s':>12}")
    for spec in args.runs.split(","):
        sampler, steps = spec.split(":")
        seconds = run(model, vae, args, sampler, int(steps), args.num_images, device)
        row = {
            "sampler": sampler,
            "steps": int(steps),
            "images": args.num_images,
            "seconds": seconds,
            "img_per_s": args.num_images / seconds,
            "img_steps_per_s": args.num_images * int(steps) / seconds,
        }
        results.append(row)
        print(f"{sampler:>14} {steps:>6} {seconds:9.2f} {row['img_per_s']:9.2f} {row['img_steps_per_s']:12.1f}")
    if len(results) >= 2:
        (a, b), ratio = results[:2], results[0]["img_per_s"] / results[1]["img_per_s"]
        print(f"{a['sampler']}/{a['steps']} is {ratio:.1f}x the img/s of {b['sampler']}/{b['steps']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "device": str(device),
                    "model": args.model,
                    "latent_size": args.latent_size,
                    "vae_arch": args.vae_arch,
                    "threads": torch.get_num_threads(),
                    "results": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
