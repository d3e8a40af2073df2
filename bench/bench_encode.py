"""Encode throughput (images/s) of the `encode` stage.

CPU (default): the default offline setting, end to end. It ingests the default synthetic set (params.yaml `ingest`,
2000 images at 32x32) into a temp dir, snapshots the default small VAE architecture (params.yaml `vae`; random
weights cost the same as trained ones, or pass --vae models/vae), then times the single-process reference
(`encode_local`) and the Ray stage (`run_encode`) with 1 and with 2 CPU actors. Ray figures include starting the
actors (each imports torch and loads the VAE), which dominates on a set this small.

    python bench/bench_encode.py                      # CPU, 1 and 2 actors
    python bench/bench_encode.py --actors 1 2 4 --num-images 20000

CUDA: the VAE encoder at the paper's scale: an AutoencoderKL with the stabilityai/sd-vae-ft-ema architecture
(random weights) on 256x256 images, through `pipeline.autoencoder.encode_images`, in bf16 (or fp32).

    python bench/bench_encode.py --device cuda --batch-size 64 --dtype bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from timing import synchronize

from pipeline.autoencoder import encode_images, save_snapshot
from pipeline.cluster import lock_ray
from pipeline.encode import encode_local, run_encode
from pipeline.ingest import ingest
from pipeline.params.encode import EncodeParams
from pipeline.params.ingest import IngestParams
from pipeline.params.load import load_section
from pipeline.params.vae import VAEParams
from pipeline.vae import build_vae

# The stabilityai/sd-vae-ft-ema config.json (the VAE of the paper), for a same-sized model with random weights.
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    act_fn="silu",
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="CPU actor counts to time (cpu)")
    parser.add_argument("--num-images", type=int, default=None, help="synthetic set size (default: params.yaml)")
    parser.add_argument("--vae", default=None, help="a VAE snapshot dir to use instead of random weights (cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder forward (cuda)")
    parser.add_argument("--image-size", type=int, default=256, help="(cuda)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="VAE weights and inputs (cuda)")
    parser.add_argument("--iters", type=int, default=10, help="forwards per timed round (cuda)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, median reported (cuda)")
    return parser.parse_args()


def bench_cpu(args) -> None:
    import ray

    encode = load_section(EncodeParams, "encode", args.params)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ingest_params = load_section(IngestParams, "ingest", args.params)
        if args.num_images:  # a larger set amortises the actors' start-up
            synthetic = dataclasses.replace(ingest_params.synthetic, num_images=args.num_images)
            ingest_params = dataclasses.replace(ingest_params, synthetic=synthetic)
        ingest(ingest_params, tmp / "images")
        vae_dir = Path(args.vae) if args.vae else tmp / "vae"
        if not args.vae:
            vae_params = load_section(VAEParams, "vae", args.params)
            torch.manual_seed(vae_params.seed)
            save_snapshot(build_vae(vae_params, ingest_params.image_size), vae_dir)
        rows = []
        start = time.perf_counter()
        manifest = encode_local(encode, tmp / "images", vae_dir, tmp / "local")
        rows.append(("single process (no Ray)", manifest["count"] / (time.perf_counter() - start)))
        # Each CPU actor takes a CPU and reading takes one more (encode.check_resources); on a small machine
        # the logical count exceeds the cores, so actors share them.
        lock_ray()
        ray.init(num_cpus=max(os.cpu_count() or 1, max(args.actors) + 1), include_dashboard=False)
        for n in args.actors:
            metrics = run_encode(
                dataclasses.replace(encode, num_actors=n, use_gpu=False),
                tmp / "images",
                vae_dir,
                tmp / f"ray{n}",
                tmp / f"encode{n}.json",
            )
            rows.append((f"Ray, {n} CPU actor(s), incl. actor start", metrics["img_per_s"]))
        ray.shutdown()
    print(
        f"\nencode throughput, {manifest['count']} images of {manifest['image_size']}px, flip={encode.flip}, "
        f"{os.cpu_count()} CPU cores, torch threads per encoder = 1 (encode.CPU_THREADS)"
    )
    for name, img_per_s in rows:
        print(f"  {name:<42} {img_per_s:8.1f} img/s")


@torch.no_grad()
def bench_cuda(args) -> None:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    vae = AutoencoderKL(**SD_VAE_CONFIG).to("cuda", dtype).eval()
    images = torch.randint(
        0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8, device="cuda"
    )
    for _ in range(3):  # warmup: cuDNN autotuning, allocator
        encode_images(vae, images)
    rounds = []
    for _ in range(args.rounds):
        synchronize("cuda")
        start = time.perf_counter()
        for _ in range(args.iters):
            encode_images(vae, images)
        synchronize("cuda")
        rounds.append(args.iters * args.batch_size / (time.perf_counter() - start))
    print(
        f"SD-VAE-sized encoder (random weights), {args.image_size}px, batch {args.batch_size}, {args.dtype}, "
        f"{torch.cuda.get_device_name()}: {statistics.median(rounds):.1f} img/s "
        f"(rounds: {', '.join(f'{r:.0f}' for r in rounds)}); peak memory "
        f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        bench_cpu(args)
    else:
        bench_cuda(args)


if __name__ == "__main__":
    main()
