"""Sampling throughput of a DiT preset through `pipeline.diffusion.sample`, in img-steps/s.

One img-step is one image advanced by one sampler step; with guidance the doubled batch [cond; uncond] still counts
once per image. Also prints the hours that the paper's FID protocol (50K images x 250 DDPM steps) would take at that
rate, and the network-only rate (forward passes alone) to show the sampler's own overhead. Weights are random: only
the speed matters here. Example (the official DiT-XL/2 reaches ~1,010 img-steps/s on one H200, 3.44 h):

    python bench/bench_sampler.py --model DiT-XL/2 --latent-size 32 --batch 256 --sampler ddpm --steps 250 \
        --cfg-scale 1.5 --dtype bf16 --compile --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from timing import synchronize

from pipeline.attention import attention_backend
from pipeline.diffusion import DIT_DIFFUSION, SAMPLERS, sample


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2", help="a key of pipeline.model.DiT_models")
    p.add_argument("--latent-size", type=int, default=32, help="latent side (32 = 256x256 images with the SD-VAE)")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256, help="images per sampler loop (the doubled batch is 2x this)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.5, help="1 = no guidance (no doubled batch)")
    p.add_argument("--cfg-channels", type=int, default=None, help="3 = the official sampler; default all")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="bf16 = bf16 autocast")
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TF32 matmuls for fp32 (on in the official sample_ddp.py)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the network's forward")
    p.add_argument(
        "--attention",
        default="auto",
        help="SDPA kernel: auto | math | flash | efficient | cudnn (pipeline/attention.py, the sample.attention param)",
    )
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps of the untimed warm-up run (compilation)")
    p.add_argument("--forward-iters", type=int, default=20, help="network-only timed passes; 0 skips them")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-images", type=int, default=50_000, help="for the extrapolation (paper: FID-50K)")
    p.add_argument("--protocol-steps", type=int, default=250, help="for the extrapolation (paper: 250 DDPM steps)")
    return p.parse_args(argv)


def build_model(name: str, latent_size: int, in_channels: int, num_classes: int, device) -> torch.nn.Module:
    from pipeline.model import DiT_models  # the network is separate from the diffusion: imported only here

    if name not in DiT_models:
        raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(DiT_models)}")
    model = DiT_models[name](input_size=latent_size, in_channels=in_channels, num_classes=num_classes)
    return model.to(device).eval()


def compile_forward(model: torch.nn.Module, mode: str | None) -> None:
    """Compile `forward` in place: the plain call and forward_with_cfg (which calls self.forward) both use it."""
    model.forward = torch.compile(model.forward, mode=mode)


def time_sampling(model, args, steps: int, device: torch.device) -> float:
    """Seconds for one `sample(...)` call of `args.batch` images and `steps` steps."""
    y = torch.randint(0, args.num_classes, (args.batch,), generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(i) for i in range(args.batch)]
    shape = (args.batch, args.in_channels, args.latent_size, args.latent_size)
    synchronize(device)
    start = time.perf_counter()
    with (
        torch.inference_mode(),
        torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bf16"),
        attention_backend(args.attention),
    ):
        z = sample(
            model,
            sampler=args.sampler,
            steps=steps,
            shape=shape,
            y=y,
            cfg_scale=args.cfg_scale,
            cfg_channels=args.cfg_channels,
            generators=generators,
            num_classes=args.num_classes,
            device=device,
            **DIT_DIFFUSION,
            learn_sigma=model.config["learn_sigma"],
        )
    synchronize(device)
    if not torch.isfinite(z).all():
        raise SystemExit("the sampler produced non-finite latents")
    return time.perf_counter() - start


def time_network(model, args, device: torch.device) -> float:
    """Seconds per network evaluation of one sampler step (the doubled batch when guided)."""
    guided = args.cfg_scale != 1.0
    n = args.batch * (2 if guided else 1)
    x = torch.randn(n, args.in_channels, args.latent_size, args.latent_size, device=device)
    t = torch.randint(0, 1000, (n,), device=device)
    y = torch.randint(0, args.num_classes, (n,), device=device)
    with (
        torch.inference_mode(),
        torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bf16"),
        attention_backend(args.attention),
    ):
        call = (
            (lambda: model.forward_with_cfg(x, t, y, args.cfg_scale, args.cfg_channels))
            if guided
            else (lambda: model(x, t, y))
        )
        call()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.forward_iters):
            call()
        synchronize(device)
    return (time.perf_counter() - start) / args.forward_iters


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    model = build_model(args.model, args.latent_size, args.in_channels, args.num_classes, device)
    if args.compile:
        compile_forward(model, args.compile_mode)
    warmup_s = time_sampling(model, args, args.warmup_steps, device)
    seconds = time_sampling(model, args, args.steps, device)
    rate = args.batch * args.steps / seconds
    result = {
        "model": args.model,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "latent_size": args.latent_size,
        "batch": args.batch,
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "dtype": args.dtype,
        "tf32": args.tf32,
        "compile": args.compile,
        "attention": args.attention,
        "warmup_s": round(warmup_s, 2),
        "seconds": round(seconds, 3),
        "img_steps_per_s": round(rate, 1),
        "hours_for_protocol": round(args.num_images * args.protocol_steps / rate / 3600, 3),
    }
    if args.forward_iters:
        result["network_img_steps_per_s"] = round(args.batch / time_network(model, args, device), 1)
    if device.type == "cuda":
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(
        f"{args.model} {args.sampler}-{args.steps} batch {args.batch} cfg {args.cfg_scale} {args.dtype} "
        f"attention {args.attention}"
        f"{' compiled' if args.compile else ''} on {result['device']}: {rate:,.1f} img-steps/s; "
        f"{args.num_images:,} images x {args.protocol_steps} steps would take "
        f"{result['hours_for_protocol']:.2f} h"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
