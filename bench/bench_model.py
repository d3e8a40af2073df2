"""Training-step throughput of our DiT and of diffusers' DiTTransformer2DModel with the same config.

One step is a full training step: forward, MSE loss, backward, AdamW (fused on CUDA). After a warmup, each model
runs several timed rounds and the median round is reported. On CUDA the models run one after the other, so that
each peak memory is the model's own; on CPU their rounds alternate, so that the load of a shared machine weighs on
both alike.

    python bench/bench_model.py --model DiT-S/2 --input-size 32 --batch-size 8 --device cpu
    python bench/bench_model.py --model DiT-XL/2 --input-size 32 --batch-size 256 --device cuda --dtype bf16 \
        --compile --no-diffusers

On CUDA it also prints MFU: model FLOPs per image = 3 (forward + backward) x 2 FLOPs per MAC x the forward MACs
of pipeline.flops, against --peak-tflops (989 = H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from timing import synchronize
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.flops import count_ops
from pipeline.model import DiT_models

PAPER_LR = 1e-4  # the paper's AdamW learning rate; it does not affect the speed


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/2", choices=list(DiT_models))
    parser.add_argument("--input-size", type=int, default=32, help="latent side (256px images -> 32)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, fp32 weights")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers peer")
    parser.add_argument("--activation-checkpointing", action="store_true", help="ours only: recompute each block")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3, 10 with --compile)")
    parser.add_argument("--iters", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    return parser.parse_args()


def build_ours(args):
    return DiT_models[args.model](
        input_size=args.input_size, num_classes=args.num_classes, activation_checkpointing=args.activation_checkpointing
    )


def build_diffusers(config, out_channels):
    """diffusers' DiT with the same architecture (and the official LayerNorm eps)."""
    model = DiTTransformer2DModel(
        num_attention_heads=config["num_heads"],
        attention_head_dim=config["hidden_size"] // config["num_heads"],
        in_channels=config["in_channels"],
        out_channels=out_channels,
        num_layers=config["depth"],
        sample_size=config["input_size"],
        patch_size=config["patch_size"],
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=config["num_classes"],
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )

    def forward(x, t, y):
        return model(x, timestep=t, class_labels=y).sample

    return model, forward


def check_flash_attention(model, args, device):
    """Fail loudly unless our attention runs on the flash SDPA kernel in bf16 (sdpa_kernel raises otherwise)."""
    tokens = (args.input_size // model.patch_size) ** 2
    x = torch.randn(2, tokens, model.config["hidden_size"], device=device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        model.blocks[0].attn(x)
    print("SDPA flash attention: ok")


def make_batch(args, in_channels, out_channels, device):
    g = torch.Generator().manual_seed(0)
    n, size = args.batch_size, args.input_size
    x = torch.randn(n, in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, args.num_classes, (n,), generator=g)
    target = torch.randn(n, out_channels, size, size, generator=g)
    return [v.to(device) for v in (x, t, y, target)]


def training_step(model, forward, batch, args, device):
    """A closure running one full training step of `model` (moved to `device`, in train mode)."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=PAPER_LR, weight_decay=0.0, fused=device.type == "cuda")
    forward = torch.compile(forward) if args.compile else forward
    x, t, y, target = batch

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = forward(x, t, y)
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def warm_up(step, args, device):
    for _ in range(args.warmup if args.warmup is not None else (10 if args.compile else 3)):
        step()
    synchronize(device)


def timed_round(step, args, device):
    """img/s of one round of args.iters steps."""
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    synchronize(device)
    return args.batch_size * args.iters / (time.perf_counter() - start)


def run_cuda(builders, batch, args, device):
    """One model after the other: {name: (rates, peak GiB)}."""
    results = {}
    for name, build in builders.items():
        step = training_step(*build(), batch, args, device)
        warm_up(step, args, device)
        torch.cuda.reset_peak_memory_stats()
        rates = [timed_round(step, args, device) for _ in range(args.rounds)]
        results[name] = rates, torch.cuda.max_memory_allocated() / 2**30
        del step
        torch._dynamo.reset()  # compiled graphs hold on to the model
        gc.collect()
        torch.cuda.empty_cache()
    return results


def run_cpu(builders, batch, args, device):
    """Rounds of the models alternate: {name: (rates, None)}."""
    steps = {name: training_step(*build(), batch, args, device) for name, build in builders.items()}
    for step in steps.values():
        warm_up(step, args, device)
    rates = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rates[name].append(timed_round(step, args, device))
    return {name: (r, None) for name, r in rates.items()}


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores, as the official training
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    probe = build_ours(args)  # the config the peer copies; rebuilt (same seed) when measured
    config, in_channels, out_channels = dict(probe.config), probe.in_channels, probe.out_channels
    macs, _ = count_ops(args.model, args.input_size)
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"{args.model} latent {args.input_size} batch {args.batch_size} {args.dtype} compile={args.compile} "
        f"on {hardware}, torch {torch.__version__}; forward {macs / 1e9:.2f} GMACs/image"
    )
    if device.type == "cuda" and args.dtype == "bf16":
        check_flash_attention(probe.to(device), args, device)
    del probe

    def ours():
        torch.manual_seed(0)
        model = build_ours(args)
        return model, model

    def peer():
        torch.manual_seed(0)
        return build_diffusers(config, out_channels)

    builders = {"ours": ours} if args.no_diffusers else {"ours": ours, "diffusers": peer}
    batch = make_batch(args, in_channels, out_channels, device)
    results = (run_cuda if device.type == "cuda" else run_cpu)(builders, batch, args, device)
    for name, (rates, peak) in results.items():
        line = f"{name:<10} {statistics.median(rates):9.2f} img/s   rounds: {', '.join(f'{r:.2f}' for r in rates)}"
        if peak is not None:
            mfu = statistics.median(rates) * 3 * 2 * macs / (args.peak_tflops * 1e12)
            line += f"   MFU {100 * mfu:.1f}%   peak memory {peak:.1f} GiB"
        print(line)
    if len(results) == 2:
        ratio = statistics.median(results["ours"][0]) / statistics.median(results["diffusers"][0])
        print(f"ratio ours/diffusers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
