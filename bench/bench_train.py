"""Training throughput of the train stage's own step (pipeline.train.run_step) on random latents held on the device.

Each step is exactly the stage's: seeded draws, posterior sample and flip from the latents store, timesteps and
noise, forward + hybrid loss (MSE + VB), backward, grad norm, AdamW (fused on CUDA), foreach EMA.

    python bench/bench_train.py                  # CPU: the offline default of params.yaml (DiT-Ti/2, 8x8x4, batch 32)
    python bench/bench_train.py --device cuda    # DiT-XL/2 and DiT-B/2, latent 32x32x4, batch 256, bf16, compiled
    python bench/bench_train.py --device cuda --model DiT-B/2 \
        --compile-mode default reduce-overhead max-autotune-no-cudagraphs

Prints img/s, ms/step, MFU (3 x forward FLOPs per image for forward + backward, 2 FLOPs per MAC of
pipeline.flops, against --peak-tflops; 989 = H100/H200 dense bf16) and peak memory. Reference points (official
train.py, bf16): DiT-XL/2 583 img/s, DiT-B/2 1,542 img/s.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from timing import synchronize

import pipeline.train as T
from pipeline.flops import count_gflops_latent
from pipeline.params.load import load_section, read_yaml
from pipeline.params.train import TrainParams

STORE_EXAMPLES = 4096  # random latents in the store (per flip); only their count matters, not their values
SCALING_FACTOR = 0.18215  # SD-VAE's; the speed does not depend on it
GPU_MODELS = ("DiT-XL/2", "DiT-B/2")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--params", default="params.yaml", help="the train section is the base configuration")
    parser.add_argument("--model", nargs="+", default=None, help=f"presets (cuda default: {' '.join(GPU_MODELS)})")
    parser.add_argument("--batch-size", type=int, default=None, help="cuda default 256, cpu default: params.yaml")
    parser.add_argument("--latent-size", type=int, default=None, help="cuda default 32, cpu default: params.yaml")
    parser.add_argument("--num-classes", type=int, default=None, help="cuda default 1000, cpu default: params.yaml")
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None, help="cuda default bf16")
    parser.add_argument(
        "--compile-mode",
        nargs="+",
        default=None,
        help="torch.compile modes to compare, or 'none' (cuda default: default; cpu: none)",
    )
    parser.add_argument(
        "--conditioning",
        nargs="+",
        default=None,
        help="conditionings to compare (default: params.yaml's train.conditioning)",
    )
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["auto"],
        help="SDPA kernels to time (train.attention): auto math flash efficient cudnn",
    )
    parser.add_argument(
        "--fp8",
        nargs="+",
        default=["none"],
        choices=["none", "float8", "emulate"],
        help="train.fp8 modes to time; same seed and data, so the final losses compare (parity)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3, 15 when compiled)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    return parser.parse_args()


def offline_defaults(params_path: str) -> dict:
    """Latent side, channels and classes of the offline default pipeline (ingest + small VAE of params.yaml)."""
    params = read_yaml(params_path)
    downsample = 2 ** (len(params["vae"]["block_out_channels"]) - 1)
    return {
        "latent_size": params["ingest"]["image_size"] // downsample,
        "channels": params["vae"]["latent_channels"],
        "num_classes": params["ingest"]["synthetic"]["num_classes"],
    }


def random_latents(n: int, shape: tuple[int, int, int], num_classes: int, device) -> T.LatentBatches:
    """A posterior store with both flips, fp16 as the encode stage writes it, kept on the device."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "label": torch.randint(0, num_classes, (n,), generator=g),
        "mean": torch.randn(n, 2, *shape, generator=g).half(),
        "std": torch.rand(n, 2, *shape, generator=g).half() * 0.1,
    }
    return T.LatentBatches(tensors, SCALING_FACTOR, seed=0, device=torch.device(device))


def bench_one(p: TrainParams, latent_shape, num_classes: int, device: str, warmup: int, steps: int) -> dict:
    torch.manual_seed(p.seed)
    model = T.build_model(p, latent_shape, num_classes)
    state = T.make_train_state(model, p, torch.device(device), world=1, ckpt=None)
    data = random_latents(max(STORE_EXAMPLES, p.global_batch_size), latent_shape, num_classes, device)
    for step in range(warmup):
        T.run_step(state, data, step, 0, 1)
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(warmup, warmup + steps):
        stats = T.run_step(state, data, step, 0, 1)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    cpu_seconds = (time.process_time() - cpu_start) / steps  # this process's CPU time: steadier on a shared machine
    loss = stats[0].item()
    img_per_s = p.global_batch_size / seconds
    flops_per_img = 3 * 2 * count_gflops_latent(p.model, latent_shape[-1], p.conditioning) * 1e9
    return {
        "img_per_s": img_per_s,
        "ms_per_step": seconds * 1e3,
        "cpu_ms_per_step": cpu_seconds * 1e3,
        "loss": loss,
        "tflops": img_per_s * flops_per_img / 1e12,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
    }


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda:
        T.configure_torch(torch.device("cuda", 0), args.precision or "bf16")
    base = load_section(TrainParams, "train", args.params)
    offline = offline_defaults(args.params)
    latent = args.latent_size or (32 if cuda else offline["latent_size"])
    latent_shape = (offline["channels"] if not cuda else 4, latent, latent)
    num_classes = args.num_classes or (1000 if cuda else offline["num_classes"])
    modes = args.compile_mode or (["default"] if cuda else ["none"])
    print(
        f"device={args.device} latent={latent_shape} classes={num_classes} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}" + (f" gpu={torch.cuda.get_device_name()}" if cuda else "")
    )
    variants = [
        (m, c)
        for m in args.model or (GPU_MODELS if cuda else [base.model])
        for c in args.conditioning or [base.conditioning]
    ]
    for name, conditioning in variants:
        for mode, attention, fp8 in ((m, a, f) for m in modes for a in args.attention for f in args.fp8):
            p = replace(
                base,
                model=name,
                conditioning=conditioning,
                num_workers=0,
                use_gpu=cuda,
                global_batch_size=args.batch_size or (256 if cuda else base.global_batch_size),
                precision=args.precision or ("bf16" if cuda else base.precision),
                compile=mode != "none",
                compile_mode=mode if mode != "none" else base.compile_mode,
                activation_checkpointing=args.activation_checkpointing,
                attention=attention,
                fp8=fp8,
            )
            warmup = args.warmup if args.warmup is not None else (15 if p.compile else 3)
            r = bench_one(p, latent_shape, num_classes, args.device, warmup, args.steps)
            print(
                f"{name:11s} {conditioning:15s} batch={p.global_batch_size} {p.precision} compile={mode:17s} "
                f"attention={attention:9s} fp8={fp8:7s} "
                f"{r['img_per_s']:9.1f} img/s  {r['ms_per_step']:8.1f} ms/step  "
                + ("" if cuda else f"{r['cpu_ms_per_step']:8.1f} CPU-ms/step  ")
                + (
                    f"MFU={r['tflops'] / args.peak_tflops:6.1%} ({r['tflops']:.0f} TFLOP/s)  "
                    f"peak={r['peak_gb']:.1f} GiB  "
                    if cuda
                    else ""
                )
                + f"loss={r['loss']:.4f}",
                flush=True,
            )
            torch._dynamo.reset()  # drop the compiled graphs of this model before building the next
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
