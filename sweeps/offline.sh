#!/usr/bin/env bash
# The offline sweep on one CPU machine: profiles/sweep-offline.yaml (synthetic shapes at 64 px, 16x16x4 latents,
# 800 steps of batch 64, FID of 400 samples at steps 200/400/600/800), then docs/results.md.
#
# Departure from the paper: DiT-S/B (S 12x384, B 12x768) are out of a CPU's reach, so the model-size study is
# DiT-Ti/4 vs DiT-S/4 (Ti: 6x192, a CPU-sized preset not in the paper), the patch-size study is DiT-Ti/8, /4, /2 and
# the conditioning study runs at DiT-Ti/4 (paper: XL/2).
#
# Training throughput, bench/bench_train.py on the idle 2-core CPU (batch 64, 16x16x4 latents): Ti/8 990 img/s,
# Ti/4 425 (adaLN 398, cross-attention 333, in-context 429), Ti/2 118, S/4 68.5, i.e. ~30 min of training for the
# 7 runs; 4 curve points of 400 samples each, ~9 min; the data stages once, ~7 min. See docs/results.md for the
# measured wall time (67 min).
#
#   sweeps/offline.sh                 # queue the 7 runs, run them, write docs/results.md
#   DRY_RUN=1 sweeps/offline.sh       # print the commands
exec "$(dirname "$0")/run.sh" sweep-offline DiT-Ti/4 DiT-Ti/8 DiT-Ti/4 DiT-Ti/2 DiT-S/4
