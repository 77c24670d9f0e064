#!/usr/bin/env bash
# Profile a short sampler run (benchmarks/profile_sampler.py) with its NVTX ranges: per step, per block, per op.
#
#   bash benchmarks/profile_nsys.sh [--out-dir DIR] [profile_sampler args...]
#   e.g. bash benchmarks/profile_nsys.sh --preset dit-xl-2 --batch 8 --steps 5
#
# With `nsys` on PATH: `nsys profile -t cuda,nvtx` with the capture range limited to the profiled run
# (cudaProfilerApi), then the top kernels by GPU time (`nsys stats --report cuda_gpu_kern_sum`) and the NVTX ranges.
# NVTX comes from the optional `nvtx` package (CROSSFLOW_KERNELS_NVTX=1); without it, torch's emit_nvtx turns the
# record_function ranges (CROSSFLOW_KERNELS_NVTX=torch) into NVTX ranges instead.
# Without `nsys`: says so, and runs the same workload under torch.profiler (CROSSFLOW_KERNELS_NVTX=torch), writing a Chrome
# trace and printing the top ops. Without CUDA, profile_sampler defaults to the tiny preset in the Triton interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="benchmarks/results/profile"
if [[ "${1:-}" == "--out-dir" ]]; then OUT_DIR="$2"; shift 2; fi
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"

if command -v nsys >/dev/null 2>&1; then
  if "$PY" -c "import nvtx" 2>/dev/null; then
    MODE=(env CROSSFLOW_KERNELS_NVTX=1); EXTRA=()
  else
    echo "note: the optional 'nvtx' package is missing; using torch emit_nvtx with CROSSFLOW_KERNELS_NVTX=torch"
    MODE=(env CROSSFLOW_KERNELS_NVTX=torch); EXTRA=(--emit-nvtx)
  fi
  REP="$OUT_DIR/sampler"
  "${MODE[@]}" nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop \
    --force-overwrite=true -o "$REP" "$PY" -m benchmarks.profile_sampler --cuda-profiler-range "${EXTRA[@]}" "$@"
  # `|| true`: head closing the pipe early must not fail the script under pipefail.
  echo "== top kernels by GPU time =="
  nsys stats --force-export=true --report cuda_gpu_kern_sum --format table "$REP.nsys-rep" | head -n 40 || true
  echo "== NVTX ranges =="
  nsys stats --force-export=true --report nvtx_sum --format table "$REP.nsys-rep" | head -n 40 || true
  echo "report: $REP.nsys-rep"
else
  echo "nsys not found on PATH: falling back to torch.profiler (Chrome trace, CROSSFLOW_KERNELS_NVTX=torch ranges)"
  CROSSFLOW_KERNELS_NVTX=torch "$PY" -m benchmarks.profile_sampler --torch-profiler "$OUT_DIR/sampler_trace.json" "$@"
fi
