"""Forward Gflops per image in the DiT paper's convention (Peebles & Xie 2023, Table 1).

The paper's "flops" are multiply-accumulates (MACs). We count them on the actual model: one forward pass on the
meta device (shapes only: no memory, no arithmetic) under torch.utils.flop_counter.FlopCounterMode, which counts
2 FLOPs per MAC for linears, convolutions and the attention matmuls, halved. On top of that, each element
normalised by a LayerNorm counts as one op. With this term the count reproduces the paper's two-decimal figures
(e.g. DiT-XL/2 118.64, DiT-XL/4 29.05, DiT-L/2 80.71); without it XL/2 gives 118.62 and XL/4 29.04 (-> 29.0, not
Table 1's 29.1), and with fvcore's default of 4 ops per normalised element XL/2 gives 118.69 (-> 118.7). Other
elementwise work (activations, modulation, residuals, softmax) is not counted, as in fvcore.

Table 1 prints one decimal: the two-decimal figures rounded once more (`paper_round`).

`python -m pipeline.flops` prints parameters and Gflops of every preset.
"""

from __future__ import annotations

import argparse
import math
from decimal import ROUND_HALF_UP, Decimal

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model import CONDITIONINGS, DiT_models

SD_VAE_DOWNSAMPLE = 8  # the paper's latents: 256x256 images -> 32x32x4 with the SD VAE
LAYER_NORM_OPS_PER_ELEMENT = 1  # see the module docstring
aten = torch.ops.aten


def _normalised_elements(input_shape, *args, **kwargs):
    """FlopCounterMode formula for aten.native_layer_norm: the number of normalised elements."""
    return math.prod(input_shape)


def build_on_meta(model_name, latent_size, conditioning="adaLN-Zero"):
    """The named preset with shapes but no storage; its parameters and flops are those of the real model."""
    if model_name not in DiT_models:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(DiT_models)}")
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
    with torch.device("meta"):
        return DiT_models[model_name](input_size=latent_size, conditioning=conditioning).eval()


def count_ops(model_name, latent_size, conditioning="adaLN-Zero"):
    """(MACs, LayerNorm-normalised elements) of one forward pass for one latent of latent_size^2."""
    model = build_on_meta(model_name, latent_size, conditioning)
    with torch.device("meta"):
        x = torch.empty(1, model.in_channels, latent_size, latent_size)
        t, y = torch.zeros(1), torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False, custom_mapping={aten.native_layer_norm: _normalised_elements})
    with counter, torch.no_grad():
        model(x, t, y)
    counts = dict(counter.get_flop_counts()["Global"])
    normalised = counts.pop(aten.native_layer_norm, 0)
    return sum(counts.values()) // 2, normalised  # FlopCounterMode counts 2 FLOPs per MAC


def count_gflops_latent(model_name, latent_size, conditioning="adaLN-Zero"):
    macs, normalised = count_ops(model_name, latent_size, conditioning)
    return (macs + LAYER_NORM_OPS_PER_ELEMENT * normalised) / 1e9


def count_gflops(model_name, image_size=256, conditioning="adaLN-Zero"):
    """Forward Gflops (GMACs, the paper's convention) per image of image_size^2 pixels (latent = image_size // 8)."""
    if image_size % SD_VAE_DOWNSAMPLE:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE downsampling {SD_VAE_DOWNSAMPLE}")
    return count_gflops_latent(model_name, image_size // SD_VAE_DOWNSAMPLE, conditioning)


def count_parameters(model_name, latent_size, conditioning="adaLN-Zero"):
    """All parameters, the frozen pos_embed included (as in the paper's 675M for DiT-XL/2)."""
    return sum(p.numel() for p in build_on_meta(model_name, latent_size, conditioning).parameters())


def paper_round(gflops):
    """One decimal as in Table 1, from the two-decimal figure (29.0479 -> 29.05 -> 29.1)."""
    two = Decimal(gflops).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return float(two.quantize(Decimal("0.1"), ROUND_HALF_UP))


def main():
    parser = argparse.ArgumentParser(description="Parameters and forward Gflops of every DiT preset.")
    parser.add_argument("--image-size", type=int, default=256, help="pixels; the latent is image_size // 8")
    args = parser.parse_args()
    latent = args.image_size // SD_VAE_DOWNSAMPLE
    print(f"image {args.image_size}x{args.image_size} (latent {latent}x{latent}), adaLN-Zero")
    print(f"{'model':<10} {'params (M)':>11} {'Gflops':>9} {'1 dec.':>8}")
    for name in DiT_models:
        gflops = count_gflops(name, args.image_size)
        params = count_parameters(name, latent) / 1e6
        print(f"{name:<10} {params:>11.2f} {gflops:>9.2f} {paper_round(gflops):>8.1f}")
    print("\nDiT-XL/2 by conditioning (paper Fig. 5)")
    base = count_gflops("DiT-XL/2", args.image_size)
    for conditioning in CONDITIONINGS:
        gflops = count_gflops("DiT-XL/2", args.image_size, conditioning)
        print(f"{conditioning:<16} {gflops:>9.2f} Gflops ({100 * (gflops / base - 1):+.1f}%)")


if __name__ == "__main__":
    main()
