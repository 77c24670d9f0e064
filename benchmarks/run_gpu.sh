#!/usr/bin/env bash
# The GPU check: one prepared command of at most 9 minutes on a bare GPU machine (torch + triton, no network).
# Stages in priority order, each killed at its own budget, each case saved as it ends; see benchmarks/gpu_session/gpu_check.py.
#
#   bash benchmarks/run_gpu.sh            # everything; results under $OUT (else --out DIR, else a new temp dir):
#                                         #   gpu_check.json, gpu_check.log, pytest_gpu.xml, ncu_attention.{ncu-rep,txt}
#   bash benchmarks/run_gpu.sh --plan     # the stages and their budgets (sum <= 540 s); no device needed
#   bash benchmarks/run_gpu.sh --smoke    # every stage body on tiny shapes on the CPU (CI: benchmarks/smoke.sh)
#   bash benchmarks/run_gpu.sh --only attention,ncu --total 200
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m benchmarks.gpu_session.gpu_check "$@"
