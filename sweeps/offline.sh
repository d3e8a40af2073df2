#!/usr/bin/env bash
# The offline study on this CPU: the plan in sweeps/study-plan.yaml / docs/study-plan.md, 48 runs in
# ~4.8 h, run in parts. Each call runs the planned runs that have no record in docs/results/runs/ yet, stopping
# before it would cross HOURS (default 2); commit the records it writes, then re-render docs/results.md.
#
#   sweeps/offline.sh                  # = python -m pipeline.study.sweep run --hours 2
#   python -m pipeline.study.sweep plan      # the runs, the count and the estimate, without running anything
#   python -m pipeline.study.report          # docs/results.md and its figures from the records
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
export RAY_AUTH_MODE=token  # the local Ray makes its token in ~/.ray/auth_token
python -m pipeline.study.sweep run --hours "${HOURS:-2}"
python -m pipeline.study.report
