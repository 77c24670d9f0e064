#!/usr/bin/env bash
# Smoke test of the benchmark code (CPU is fine): every suite body once on tiny shapes (automatic without CUDA; forced
# here with --bench-tiny), the markdown report + plots rendered from the JSON that run wrote, the profiling script
# (torch.profiler fallback without nsys), and the GPU check (`run_gpu.sh --smoke`: every stage body on tiny shapes,
# budgets enforced) with the README table rendered from its JSON. Outputs go to a temporary directory (or $1), never
# to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-$(mktemp -d "${TMPDIR:-/tmp}/crossflow-bench-smoke.XXXXXX")}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
"$PY" -m pytest benchmarks -q -p no:cacheprovider --bench-tiny --benchmark-columns=median,rounds \
  --benchmark-json="$OUT/smoke.json"
"$PY" -m benchmarks.report "$OUT/smoke.json" --out "$OUT/report"
test -s "$OUT/report/report.md" || { echo "benchmark smoke: no report was written" >&2; exit 1; }
bash benchmarks/profile_nsys.sh --out-dir "$OUT/profile" --preset tiny --batch 1 --steps 2
bash benchmarks/run_gpu.sh --plan
bash benchmarks/run_gpu.sh --smoke --out "$OUT/gpu_check"  # exits 1 unless every stage ends ok
# The tests stage's per-test file (what a killed stage keeps), summarised into the results by the driver.
test -s "$OUT/gpu_check/pytest_gpu.jsonl" || { echo "GPU-check smoke: no per-test results file" >&2; exit 1; }
"$PY" -c 'import json, sys; assert json.load(open(sys.argv[1]))["stages"]["tests"]["results"]["per_test"]' \
  "$OUT/gpu_check/gpu_check.json" || { echo "GPU-check smoke: no per-test summary" >&2; exit 1; }
"$PY" -m benchmarks.report "$OUT/gpu_check/gpu_check.json" --readme > "$OUT/gpu_check/readme_table.md"
grep -q "CPU smoke run" "$OUT/gpu_check/readme_table.md" || { echo "GPU-check smoke: no README table" >&2; exit 1; }
# crossflow_kernels.attention's routing table: the attention stage wrote one; the report CLI derives the same from the JSON.
"$PY" -m benchmarks.report "$OUT/gpu_check/gpu_check.json" --routing-table "$OUT/routes_cli.json"
"$PY" - "$OUT/gpu_check" "$OUT/routes_cli.json" <<'PYEOF'
import json, pathlib, sys
stage = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob("attention-routes_*.json")]
cli = json.loads(pathlib.Path(sys.argv[2]).read_text())
assert len(stage) == 1 and stage[0]["entries"] and stage[0]["entries"] == cli["entries"], "routing tables differ"
PYEOF
echo "benchmark smoke OK: $OUT"
