#!/usr/bin/env bash
# One stage of the GPU verification per call, sized for a lent machine (10 minutes a command, 30 minutes a session).
# Each stage writes its logs and JSON under OUT (default $OUT, else benchmarks/results) and prints a short table last.
#
#   bash benchmarks/run_gpu.sh tests    # python -m pytest (GPU tests included), junit XML + log
#   bash benchmarks/run_gpu.sh kernels  # device limits + the quick kernel matrix (bf16, one batch per model)
#   bash benchmarks/run_gpu.sh sampler  # sampler throughput, dit-xl-2 then dit-h-2-512 (50 steps, guidance 7)
#   bash benchmarks/run_gpu.sh report   # markdown + plots from every JSON in OUT
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:?usage: run_gpu.sh tests|kernels|sampler|report}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
DEV="$(python3 -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' |
       tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')"
DAY="$(date +%F)"
case "$STAGE" in
  tests)
    python3 -m pytest -q -p no:cacheprovider --junitxml="$DEST/${DAY}_${DEV}_tests.xml" 2>&1 | tee "$DEST/tests.log" |
      tail -n 25
    ;;
  kernels)
    python3 -m pytest -q -p no:cacheprovider benchmarks/bench_device_limits.py benchmarks/bench_kernels.py \
      --bench-dtypes bf16 --bench-shapes xl256-b8,xl512-b8,h512-b8 \
      --benchmark-json="$DEST/${DAY}_${DEV}_kernels-quick.json" > "$DEST/kernels.log" 2>&1
    tail -n 3 "$DEST/kernels.log"
    python3 -m benchmarks.report "$DEST/${DAY}_${DEV}_kernels-quick.json" --out "$DEST/report-kernels" --print | head -60
    ;;
  sampler)
    for p in dit-xl-2 dit-h-2-512; do
      python3 -m pytest -q -p no:cacheprovider benchmarks/bench_device_limits.py benchmarks/bench_sampler.py \
        --bench-presets "$p" --bench-batches 1,16 --benchmark-json="$DEST/${DAY}_${DEV}_sampler-$p.json" \
        > "$DEST/sampler-$p.log" 2>&1
      tail -n 3 "$DEST/sampler-$p.log"
    done
    python3 -m benchmarks.report "$DEST/${DAY}_${DEV}"_sampler-*.json --out "$DEST/report-sampler" --print | head -40
    ;;
  report)
    python3 -m benchmarks.report "$DEST"/*.json --out "$DEST/report" --print | head -80
    ;;
  *)
    echo "run_gpu.sh: unknown stage '$STAGE' (tests|kernels|sampler|report)" >&2
    exit 2
    ;;
esac
