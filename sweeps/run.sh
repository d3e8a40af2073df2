#!/usr/bin/env bash
# Queue the DiT paper's three studies as DVC experiments on one profile and run them: the GPU sweep (sweeps/gpu.sh)
# and the machinery check (sweep-smoke). The offline study has its own plan and runner (sweeps/offline.sh,
# python -m pipeline.study.sweep); this script's results are read with `dvc exp show` (pipeline.study.report renders the
# offline plan's records only).
#
#   sweeps/run.sh PROFILE COND_MODEL MODEL...
#
# Experiments (each `dvc exp run --queue -n <name> curve <profile overrides> -S train.model=.. -S train.conditioning=..`,
# which runs the DAG up to the curve stage only: no sample/evaluate/register for sweep runs):
#   - every MODEL with adaLN-Zero: the model-size study (sizes at one patch) and the patch-size study (patches of
#     one size);
#   - COND_MODEL with adaLN, cross-attention and in-context (its adaLN-Zero run must be among the MODELs): Fig. 5.
# Names are <profile without "sweep-">-<size><patch>-<conditioning>, e.g. offline-Ti4-adaLN-Zero.
# Then `dvc exp run --run-all --jobs 1` (this runs *every* queued experiment, also ones queued before). Data stages
# (ingest, vae, encode, reference) run in the first experiment only; the others restore them from DVC's run cache.
#
# Commit your changes first: a queued experiment runs a copy of the last commit plus the tracked files' changes.
# Environment: DRY_RUN=1 prints the commands instead of running them; QUEUE_ONLY=1 stops after queueing;
# REPLACE=1 removes existing experiments of the same names first (otherwise they are an error).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
export RAY_AUTH_MODE=token  # the local Ray makes its token in ~/.ray/auth_token
[ $# -ge 3 ] || { sed -n '2,20p' "$0"; exit 2; }
profile=$1 cond_model=$2
shift 2
models=("$@")
run() { if [ "${DRY_RUN:-0}" = 1 ]; then echo "$*"; else "$@"; fi; }
case " ${models[*]} " in *" $cond_model "*) ;; *) echo "COND_MODEL $cond_model must be one of the MODELs" >&2; exit 2;; esac

variants=()
for m in "${models[@]}"; do variants+=("$m adaLN-Zero"); done
for c in adaLN cross-attention in-context; do variants+=("$cond_model $c"); done

overrides=$(python -m pipeline.profiles "$profile")  # fails on a key params.yaml lacks
names=()
for v in "${variants[@]}"; do
  read -r model conditioning <<< "$v"
  short=${model#DiT-}
  names+=("${profile#sweep-}-${short/\//}-$conditioning")
done

existing=$(dvc exp list --name-only 2>/dev/null || true)
clash=()
for n in "${names[@]}"; do if grep -qx -- "$n" <<< "$existing"; then clash+=("$n"); fi; done
if [ ${#clash[@]} -gt 0 ]; then
  if [ "${REPLACE:-0}" = 1 ]; then run dvc exp remove "${clash[@]}"
  else echo "experiments ${clash[*]} exist; rerun with REPLACE=1 to replace them" >&2; exit 1; fi
fi

for i in "${!variants[@]}"; do
  read -r model conditioning <<< "${variants[$i]}"
  # shellcheck disable=SC2086  # $overrides is a list of -S key=value words
  run dvc exp run --queue -n "${names[$i]}" curve $overrides -S "train.model=$model" \
    -S "train.conditioning=$conditioning"
done
[ "${QUEUE_ONLY:-0}" = 1 ] && { echo "queued ${names[*]}; run: dvc exp run --run-all --jobs 1"; exit 0; }
run dvc exp run --run-all --jobs 1
run dvc exp show --drop '.*' --keep 'Experiment|train\.(model|conditioning)|metrics/curve\.json:(fid|class_consistency|gflops)'
