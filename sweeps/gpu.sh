#!/usr/bin/env bash
# The GPU sweep: profiles/sweep-gpu.yaml (CIFAR-10 at 128 px, sd-vae-ft-ema, 16x16x4 latents, 50K steps of batch 256,
# bf16 + compile, FID of 10K samples with 250 DDPM steps and Inception at every 10K steps); results in `dvc exp show`.
# The paper's DiT-S and DiT-B at patches 8, 4 and 2 (the size study at each patch, the patch study of each size), and
# the conditioning study at DiT-B/2 (paper: XL/2): 9 runs.
#
# Time, estimated from Gflops (not measured here): at ~30% of an H100's bf16 peak, B/2 trains its 12.8M images in
# ~25 min and a curve point takes ~1.5 min; the 9 runs take roughly 3-4 h on one H100.
#
#   sweeps/gpu.sh                     # needs the hub (dataset, VAE) and Inception's weights, and one GPU
#   DRY_RUN=1 sweeps/gpu.sh           # print the commands
exec "$(dirname "$0")/run.sh" sweep-gpu DiT-B/2 DiT-S/8 DiT-S/4 DiT-S/2 DiT-B/8 DiT-B/4 DiT-B/2
