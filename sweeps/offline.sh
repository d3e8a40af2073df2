#!/usr/bin/env bash
# The offline sweep on one CPU machine: profiles/sweep-offline.yaml (synthetic shapes at 64 px, 16x16x4 latents,
# 2000 steps of batch 64, FID of 1000 samples at steps 500/1000/1500/2000), then docs/results.md.
#
# Departure from the paper: DiT-S/B (S 12x384, B 12x768) are out of a CPU's reach, so the model-size study is
# DiT-Ti/4 vs DiT-S/4 (Ti: 6x192, a CPU-sized preset not in the paper), the patch-size study is DiT-Ti/8, /4, /2 and
# the conditioning study runs at DiT-Ti/4 (paper: XL/2).
#
# Training throughput, bench/bench_train.py on the idle 2-core CPU (batch 64, 16x16x4 latents), and run time of the
# 2000 steps: Ti/8 990 img/s (2.2 min), Ti/4 425 (5.0 min; adaLN 398: 5.4, cross-attention 333: 6.4, in-context 429:
# 5.0), Ti/2 118 (18 min), S/4 68.5 (31 min): 73 min of training. Curve points (1000 samples, 20 DPM-Solver++ steps):
# Ti/8 17 s, Ti/4 26 s, Ti/2 66 s, S/4 134 s each, 4 per run: 22 min. Data stages once (ingest, VAE 2000 steps at
# 64 px, encode, reference): ~7 min. Total ~1.7-1.8 h with per-experiment overheads.
#
#   sweeps/offline.sh                 # queue the 7 runs, run them, write docs/results.md
#   DRY_RUN=1 sweeps/offline.sh       # print the commands
exec "$(dirname "$0")/run.sh" sweep-offline DiT-Ti/4 DiT-Ti/8 DiT-Ti/4 DiT-Ti/2 DiT-S/4
