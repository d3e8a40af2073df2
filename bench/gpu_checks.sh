#!/usr/bin/env bash
# Every GPU figure of the README's benchmark table, in one run on one GPU (H100/H200 class), highest priority first.
# Each step has its own time limit and appends to $OUT/gpu_checks.log, so a cut-short run keeps what it measured.
#
#   OUT=/tmp/gpu bash bench/gpu_checks.sh
#
# The machine needs torch (CUDA) and diffusers; pip wheels found in .whl/ are installed into /tmp/site first
# (for offline GPU boxes). Nothing here downloads: the SD-VAE and DiT weights are random (timing only).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor

step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "### $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.out" 2>&1
  local rc=$?
  grep -vE "UserWarning|warnings.warn|^\s*$" "$OUT/$name.out" | tail -n 12 | tee -a "$LOG"
  echo "### $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$LOG"

# Issues 2 and 4: DiT-XL/2 training step, latent 32, batch 256, bf16, compiled (goal >= 700 img/s on an H200).
step 180 train_xl2 python3 bench/bench_train.py --device cuda --model DiT-XL/2 --steps 20
# Issue 4: DiT-B/2, compiled with and without CUDA graphs (goal 2x the official 1,542 img/s).
step 150 train_b2 python3 bench/bench_train.py --device cuda --model DiT-B/2 --compile-mode default reduce-overhead --steps 50
# Issue 5: guided DiT-XL/2 sampling, bf16 + compile, img-steps/s (goal: 50K x 250 steps in <= 2.5 h).
step 120 sampler_xl2 python3 bench/bench_sampler.py --model DiT-XL/2 --latent-size 32 --batch 256 --sampler ddpm \
  --steps 50 --protocol-steps 250 --cfg-scale 1.5 --cfg-channels 3 --dtype bf16 --compile --device cuda \
  --warmup-steps 5 --forward-iters 20
# Issue 3: SD-VAE-sized encoder at 256x256, bf16.
step 50 encode_sdvae python3 bench/bench_encode.py --device cuda --batch-size 64 --dtype bf16
# Issue 2: our model vs diffusers' DiTTransformer2DModel, same config, eager bf16 (the ratio, no compile).
step 80 model_vs_diffusers python3 bench/bench_model.py --model DiT-B/2 --input-size 32 --batch-size 256 \
  --device cuda --dtype bf16
echo "### done" | tee -a "$LOG"
