"""The GPU check: one prepared command of at most 9 minutes on a bare GPU machine (entry: `benchmarks/run_gpu.sh`).

  bash benchmarks/run_gpu.sh                 # every stage, results under $OUT (else --out, else a temp dir)
  bash benchmarks/run_gpu.sh --plan          # the stages and their budgets; touches no device
  bash benchmarks/run_gpu.sh --smoke         # every stage body on tiny shapes on the CPU (CI), < ~1 minute
  bash benchmarks/run_gpu.sh --only attention,sampler --total 300

Stages run in priority order (`STAGES`), each in a forked child with its own time budget: a child over budget is killed
with its process group (pytest workers, ncu) and recorded as `timeout`, and the next stage starts. The driver never
touches CUDA, so each child initialises it afresh. A stage body writes every finished case into the one results file as
it goes (atomic replace), so a killed stage loses only its unfinished case and a killed command loses nothing that was
finished. What comes back (at most 7 files, the limit being 8): `gpu_check.json` (schema below), `gpu_check.log`
(everything printed), `pytest_gpu.xml` (JUnit of the GPU tests, written when pytest ends), `pytest_gpu.jsonl` (one line
per test as it finishes: what a killed tests stage keeps), `ncu_attention.ncu-rep` and `ncu_attention.txt` (Nsight
Compute on one attention launch, when `ncu` is there), and `attention-routes_<device>.json`
(`crossflow_kernels.attention`'s SDPA routing table, derived from the attention stage by
`benchmarks.report.write_routing_table`; `--save` puts it in crossflow_kernels/routes/, the package data).

Schema `crossflow-gpu-check/1` of gpu_check.json:
  {schema, smoke, started, finished (null while running), total_budget_s, plan: [{name, budget_s, title}],
   env: {device_name, torch, triton, cuda, capability, cudnn, sm_count, python, commit},
   stages: {<name>: {status: running|ok|failed|timeout|skipped, budget_s, wall_s, error, note,
                     results: {...}, cases: [{...}, ...]}}}
Cases: attention {shape [2B, H, T, D], batch, heads, head_dim, tokens, model, mode, provider, backend, dtype, status
ok|unavailable|error, ms_p50/p20/p80, timer, flops, tflops, reason}; adaln {op, shape, shape_id, mode, provider,
backend, dtype, status, ms_*, bytes, gbps, warmup_s}; sampler {preset, batch, steps, provider, backend, dtype, status,
latency_s, latency_all_s, images_per_s, warmup_s, flops, tflops, peak_mem_gb}. `benchmarks/report.py` renders the
README's results table from this file (`python -m benchmarks.report gpu_check.json --readme`).

Budgets (`--plan`): estimates for a bare machine (cold Triton and Inductor caches, 16 CPU cores), not measurements.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.bench_diffusers import stage_diffusers  # stdlib-only at import; its stage imports diffusers
from benchmarks.report import GPU_CHECK_SCHEMA as SCHEMA  # the schema's reader and summaries live with the report
from benchmarks.report import attention_summary, write_routing_table
from benchmarks.report import read_gpu_check as read_results

ROOT = Path(__file__).resolve().parents[2]
TOTAL_BUDGET_S = 540  # one device command is at most 10 minutes; 60 s stay for the machine's start-up of python
RESULTS_NAME, LOG_NAME = "gpu_check.json", "gpu_check.log"
JUNIT_NAME, NCU_NAME, TESTS_JSONL = "pytest_gpu.xml", "ncu_attention", "pytest_gpu.jsonl"
KILL_GRACE_S = 3.0  # SIGTERM, then SIGKILL this much later
MIN_STAGE_S = 10  # a stage with less time than this left is skipped, not started
MAX_FILES = 8  # what a device run brings back from $OUT


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# The results file: one JSON, replaced atomically after every change (one writer at a time: the driver or one child)
# ---------------------------------------------------------------------------------------------------------------------


def write_results(path: Path, data: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class StageContext:
    """What a stage body gets: where to write, whether this is the smoke, its deadline, and the recorder."""

    def __init__(self, name: str, out: Path, smoke: bool, deadline: float):
        self.name, self.out, self.smoke, self.deadline = name, Path(out), smoke, deadline
        self.path = self.out / RESULTS_NAME

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _update(self, fn: Callable[[dict], None]) -> None:
        data = read_results(self.path)
        fn(data["stages"].setdefault(self.name, {}))
        write_results(self.path, data)

    def add_case(self, case: dict[str, Any]) -> None:
        """Record one finished case now (a later kill keeps it)."""
        self._update(lambda st: st.setdefault("cases", []).append(case))

    def set_result(self, **results: Any) -> None:
        self._update(lambda st: st.setdefault("results", {}).update(results))

    def log(self, msg: str) -> None:
        _log(msg)

    def need_cuda(self) -> None:
        """For stage bodies kept in other modules (they import nothing from here)."""
        _need_cuda(self)

    def set_env(self, env: dict[str, Any]) -> None:
        data = read_results(self.path)
        data["env"] = {**data.get("env", {}), **env}
        write_results(self.path, data)

    def cases(self) -> list[dict[str, Any]]:
        return read_results(self.path)["stages"].get(self.name, {}).get("cases", [])


# ---------------------------------------------------------------------------------------------------------------------
# Stage bodies (heavy imports happen here, in the child)
# ---------------------------------------------------------------------------------------------------------------------


def _env_info() -> dict[str, Any]:
    import platform

    import torch

    from benchmarks import _common

    env = {**_common.env_info(), "python": platform.python_version(), "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   memory_gb=round(p.total_memory / 2**30, 1))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        env["commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    env["commit"] = env["commit"] or os.environ.get("CROSSFLOW_COMMIT")  # the device copy may have no .git
    return env


def _need_cuda(ctx: StageContext) -> None:
    """Fail the stage without CUDA (outside the smoke); record the environment if no earlier stage did."""
    import torch

    if not ctx.smoke and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the GPU check needs one (use --smoke for the CPU run of the stage bodies)")
    if not read_results(ctx.path).get("env"):
        ctx.set_env(_env_info())


def stage_limits(ctx: StageContext) -> None:
    """Copy GB/s (bytes read + written) and bf16 matmul TFLOP/s, as `benchmarks/_common.measure_limits`."""
    from benchmarks import _common

    _need_cuda(ctx)
    ctx.set_result(**_common.measure_limits(tiny=ctx.smoke))


def _junit_summary(xml_path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    root = ET.parse(xml_path).getroot()
    cases = root.iter("testcase")
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures, skipped, durations = [], {}, []
    for c in cases:
        nodeid = f"{c.get('classname', '')}::{c.get('name', '')}"
        durations.append((float(c.get("time") or 0.0), nodeid))
        child = next((e for e in c if e.tag in ("failure", "error", "skipped")), None)
        if child is None:
            counts["passed"] += 1
        elif child.tag == "skipped":
            counts["skipped"] += 1
            reason = (child.get("message") or "").removeprefix("Skipped: ")
            skipped.setdefault(reason, []).append(nodeid)
        else:
            counts["failed" if child.tag == "failure" else "errors"] += 1
            failures.append({"test": nodeid, "kind": child.tag, "message": (child.get("message") or "")[:500]})
    return {
        **counts, "failures": failures,
        "skipped_reasons": [{"reason": r, "count": len(ids), "example": ids[0]} for r, ids in sorted(skipped.items())],
        "slowest": [{"test": n, "s": round(s, 2)} for s, n in sorted(durations, reverse=True)[:10]],
    }


def tests_jsonl_summary(path: Path) -> dict[str, Any]:
    """Counts and failures from the per-test results file (`gpu_pytest --results-file`): what a killed run keeps."""
    counts, failures = dict(passed=0, failed=0, errors=0, skipped=0), []
    if not path.exists():
        return {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if r["outcome"] == "passed":
            counts["passed"] += 1
        elif r["outcome"] == "skipped":
            counts["skipped"] += 1
        else:
            counts["failed" if r["when"] == "call" else "errors"] += 1
            failures.append({"test": r["nodeid"], "kind": r["when"], "message": r.get("message", "")})
    return {**counts, "failures": failures, "source": path.name}


def after_tests(ctx: StageContext) -> None:
    """Run by the driver when the tests stage ends, killed or not: the per-test file's summary into the results."""
    ctx.set_result(per_test=tests_jsonl_summary(ctx.out / TESTS_JSONL))


# The tests' own smoke target: the runner on CPU, not the whole suite (tests/test_gpu_check.py points it elsewhere).
SMOKE_TEST_TARGETS = ["tests/crossflow_kernels/test_euler.py"]


def stage_tests(ctx: StageContext) -> None:
    """`pytest -m gpu`, most informative tests first, each one's result written as it finishes, with pytest-xdist
    workers when installed (the test extra has it) and a per-test timeout (benchmarks/gpu_session/gpu_pytest.py).
    Serially, tests that would start in the stage's last 20 s are skipped, so pytest still ends and writes its JUnit
    file."""
    import importlib.util

    _need_cuda(ctx)
    workers = 0 if ctx.smoke or importlib.util.find_spec("xdist") is None else 8
    per_test = 20 if ctx.smoke else 90  # + the 15 s hard limit: a stuck test ends inside the budget
    junit, per_test_file = ctx.out / JUNIT_NAME, ctx.out / TESTS_JSONL
    targets = SMOKE_TEST_TARGETS if ctx.smoke else ["tests"]
    stop_at = time.time() + ctx.remaining() - 20
    cmd = [sys.executable, "-m", "pytest", *targets, "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "-p", "benchmarks.gpu_session.gpu_pytest", f"--test-timeout={per_test}", f"--junitxml={junit}",
           "-o", "addopts=-ra",
           f"--results-file={per_test_file}", f"--stop-at={stop_at:.0f}", "--priority-order",
           "--continue-on-collection-errors"]  # one module that fails to import must not cancel every GPU test
    if workers:
        cmd += ["-n", str(workers)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # no network there: fail fast, never hang on a fetch
    _log("tests: " + " ".join(cmd[1:]))
    t0 = time.monotonic()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    summary = _junit_summary(junit) if junit.exists() else {}
    ctx.set_result(returncode=rc, wall_s=round(time.monotonic() - t0, 1), workers=workers or 1,
                   per_test_timeout_s=per_test, command=" ".join(cmd[1:]), **summary)
    if rc not in (0, 5):  # 5: nothing collected (e.g. every GPU test deselected)
        raise RuntimeError(f"pytest -m gpu exited {rc}: {summary.get('failed', '?')} failed, "
                           f"{summary.get('errors', '?')} errors (see results.failures and {LOG_NAME})")


# Attention shapes: head dim -> (model, heads). d72 and d64 are the DiT-XL/2 and CrossFlow DiT-H/2 presets; no preset
# has d128, so it takes DiT-H's width 1280 as 10 heads of 128.
ATTN_MODELS = {72: ("dit-xl-2", 16), 64: ("dit-h-2-512", 20), 128: ("w1280-d128", 10)}
ATTN_TOKENS, ATTN_BATCHES = (256, 1024, 4096), (1, 8)
SDPA_PROVIDERS = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math")
MATH_MAX_SCORE_BYTES = 4 << 30  # the math backend materialises B·H·T² scores; bigger ones cost seconds, not insight


def attention_shapes(smoke: bool) -> list[dict[str, Any]]:
    if smoke:  # interpreter-sized: one non-power-of-two head dim (the padded path), T 32
        return [dict(model="tiny-d72", batch=1, heads=2, tokens=32, head_dim=72)]
    return [dict(model=ATTN_MODELS[d][0], batch=b, heads=ATTN_MODELS[d][1], tokens=t, head_dim=d)
            for d in (72, 64, 128) for t in ATTN_TOKENS for b in ATTN_BATCHES]


def _measure(fn: Callable[[], Any]) -> dict[str, Any]:
    """`_common.measure`, with do_bench's warm-up and repetition windows halved: 250 cases fit the budget, and every
    timed kernel still runs tens to thousands of times."""
    import torch

    from benchmarks import _common

    if not torch.cuda.is_available():
        return _common.measure(fn)
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=10, rep=50, quantiles=[0.5, 0.2, 0.8])
    return {"ms_p50": p50, "ms_p20": p20, "ms_p80": p80, "timer": "do_bench(warmup=10 ms, rep=50 ms)"}


def _raise_recompile_limit(n: int = 64) -> None:
    import torch

    cfg = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(cfg, knob):
            setattr(cfg, knob, max(getattr(cfg, knob), n))


def _bench_case(f: Callable, args: list, kw: dict, mode: str, provider: str, ctx_mgr=None) -> dict[str, Any]:
    """Warm up and time one (callable, inputs, mode) as `bench_kernels.test_kernel` does. A baseline that rejects the
    case returns {status: unavailable, reason}; ours failing raises."""
    import contextlib

    import pytest

    from benchmarks import bench_kernels

    if mode != "fwd":
        args = [a.detach().requires_grad_() for a in args]
    try:
        with ctx_mgr if ctx_mgr is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            fn = bench_kernels._guarded(lambda: bench_kernels._timed_fn(f, args, kw, mode), provider)
            bench_kernels._guarded(fn, provider)
            warmup_s = time.perf_counter() - t0
            timing = _measure(fn)
    except pytest.skip.Exception as e:
        return {"status": "unavailable", "reason": str(e.msg if hasattr(e, "msg") else e)[:400]}
    return {"status": "ok", "warmup_s": round(warmup_s, 3), **timing}


def prewarm_attention(head_dim: int, smoke: bool = False) -> None:
    """Compile our attention forward and backward at one head dim for exactly the shapes the stage times (every T and
    batch: the autotune keys are the T and B·H buckets) in each layout it times. Run in one process per head dim in
    parallel: Triton's autotuner compiles its configs one after another, and the on-disk cache then serves the
    benchmarking process (whose autotuner still times the kept configs once per key)."""
    import torch

    import crossflow_kernels
    from benchmarks import _common

    smoke = smoke or not torch.cuda.is_available()  # the smoke's prewarm processes: the interpreter, fp32, tiny
    dtype = torch.float32 if smoke else torch.bfloat16
    attn = crossflow_kernels.OPS["attention"].triton
    for s in (s for s in attention_shapes(smoke) if s["head_dim"] == head_dim):
        shape = (2 * s["batch"], s["heads"], s["tokens"], head_dim)
        for layout in ATTN_LAYOUTS:
            q, k, v = attention_inputs(shape, layout, dtype, _common.device())
            do = torch.randn_like(q)
            q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
            with torch.no_grad():
                attn(q, k, v)  # the forward alone: the stage's `fwd` mode, same kernel and key
            torch.autograd.grad(attn(q, k, v), (q, k, v), do)
    _common.sync()


# The layouts the stage times: contiguous (B, H, T, D) tensors, and the model's own fused qkv projection viewed as
# (B, H, T, D) (strided: what the routing table is applied to). The model's layout is timed for ours and the two
# fastest SDPA backends only (math and efficient never won a contiguous case we know of).
ATTN_LAYOUTS = ("bhtd", "qkv")
QKV_PROVIDERS = ("triton", "sdpa_cudnn", "sdpa_flash")


def attention_inputs(shape, layout: str, dtype, device) -> list:
    """q, k, v of `shape` (B, H, T, D) in `layout`: "bhtd" three contiguous tensors, "qkv" the unbound (B, T, 3, H, D)
    projection transposed to (B, H, T, D), as the DiT's attention calls it."""
    import torch

    b, h, t, d = shape
    if layout == "bhtd":
        return [torch.randn(shape, device=device, dtype=dtype) for _ in range(3)]
    return [x.transpose(1, 2) for x in torch.randn(b, t, 3, h, d, device=device, dtype=dtype).unbind(2)]


def _prewarm(ctx: StageContext, head_dims, limit_s: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "benchmarks.gpu_session.gpu_check", "--prewarm-attention"]
    procs = {d: subprocess.Popen([*cmd, str(d)], cwd=ROOT, env=env) for d in head_dims}
    codes = {}
    for d, proc in procs.items():
        try:
            codes[d] = proc.wait(timeout=max(1.0, limit_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes[d] = "timeout"
    return {"prewarm_s": round(time.monotonic() - t0, 1), "prewarm_exit": {str(d): c for d, c in codes.items()}}


def stage_attention(ctx: StageContext) -> None:
    """Ours (`crossflow_kernels.attention`'s Triton implementation) vs every SDPA backend, fwd then fwd+bwd, bf16 (fp32
    smoke)."""
    import torch

    from benchmarks import _common, bench_kernels

    _need_cuda(ctx)
    dev = _common.device()
    dtype = torch.float32 if ctx.smoke else torch.bfloat16  # the interpreter has no bf16
    providers = {"triton": bench_kernels._triton, **{p: bench_kernels.ATTN_PROVIDERS[p] for p in SDPA_PROVIDERS}}
    from torch.nn.attention import SDPBackend

    names = ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "cudnn_sdp_enabled", "math_sdp_enabled",
             "is_flash_attention_available")
    flags = {f: getattr(torch.backends.cuda, f)() for f in names if hasattr(torch.backends.cuda, f)}
    ctx.set_result(dtype=str(dtype).removeprefix("torch."), sdpa_backends_in_torch=sorted(SDPBackend.__members__),
                   sdpa_flags=flags, note="batch = images; attention sees 2B rows (cond + uncond in one forward)")
    # A failed or slow pre-warm costs only its time: the cases compile whatever is missing.
    warm = _prewarm(ctx, sorted({s["head_dim"] for s in attention_shapes(ctx.smoke)}), ctx.remaining() / 2)
    ctx.set_result(**warm)
    _log(f"attention: pre-warm {warm}")
    for mode in ("fwd", "fwd_bwd"):  # every shape's forward first: the part most worth having if time runs out
        for s, layout in ((s, lay) for s in attention_shapes(ctx.smoke) for lay in ATTN_LAYOUTS):
            rows = 2 * s["batch"]
            shape = (rows, s["heads"], s["tokens"], s["head_dim"])
            torch.manual_seed(0)
            qkv = attention_inputs(shape, layout, dtype, dev)
            _, flops = bench_kernels._attn_cost(shape, mode, qkv[0].element_size())
            for name, factory in providers.items():
                if layout != "bhtd" and name not in QKV_PROVIDERS:
                    continue
                case = dict(s, shape=list(shape), layout=layout, mode=mode, provider=name,
                            dtype=str(dtype).removeprefix("torch."), flops=flops)
                score_bytes = rows * s["heads"] * s["tokens"] ** 2 * qkv[0].element_size()
                if name == "sdpa_math" and score_bytes > MATH_MAX_SCORE_BYTES:
                    case.update(status="skipped", reason=f"math backend would materialise {score_bytes / 2**30:.1f} "
                                f"GiB of scores (> {MATH_MAX_SCORE_BYTES >> 30} GiB cap): seconds per case")
                    ctx.add_case(case)
                    continue
                f, backend, *cm = factory("attention", ctx.smoke)
                case["backend"] = backend
                try:
                    case.update(_bench_case(f, qkv, {}, mode, name, cm[0] if cm else None))
                except Exception as e:  # noqa: BLE001 - one failed case (OOM, a bug of ours) must not end the stage
                    case.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                if case["status"] == "ok":
                    case["tflops"] = flops / (case["ms_p50"] * 1e-3) / 1e12
                ctx.add_case(case)
                _log(f"attention {mode} {shape} {layout} {name}: {case['status']} "
                     + (f"{case['tflops']:.4g} TFLOP/s" if case["status"] == "ok" else case.get("reason", "")[:120]))
            del qkv
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    ctx.set_result(summary=attention_summary(ctx.cases()))
    # The routing table `crossflow_kernels.attention` reads, from exactly these cases (as the report CLI derives it).
    table = write_routing_table(read_results(ctx.path), RESULTS_NAME, ctx.out)
    ctx.set_result(routing_table=table.name)


ADALN_SHAPES = ("xl256-b8", "h512-b8", "xl256-b1")


def stage_adaln(ctx: StageContext) -> None:
    """adaLN and gated adaLN: ours vs eager torch vs `torch.compile` of the reference. One compiled callable per op
    (dynamic=False): dynamo compiles once per shape and grad mode, never from a reset cache."""
    import torch

    import crossflow_kernels
    from benchmarks import _common, bench_kernels

    _need_cuda(ctx)
    dev = _common.device()
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    ops = [op for op in ("adaln_modulate", "gated_residual_adaln") if op in crossflow_kernels.OPS]
    shapes = _common.kernel_shapes(tiny=True) if ctx.smoke else sorted(
        _common.kernel_shapes(False, list(ADALN_SHAPES)), key=lambda s: ADALN_SHAPES.index(s.id))  # b8 ones first
    _raise_recompile_limit()  # 3 shapes x 2 grad modes per op: past the default limit, dynamo would fall back to eager
    compiled = {}
    for op in ops:
        ref = crossflow_kernels.OPS[op].ref
        # Inductor's C++ build takes minutes on a small CPU; the smoke only runs the body (and says so).
        compiled[op] = torch.compile(ref, backend="eager") if ctx.smoke else torch.compile(ref, dynamic=False)
    backend_of = {"triton": "triton" + (" (interpreter)" if crossflow_kernels.interpreting() else ""), "torch": "torch",
                  "torch_compile": "torch.compile(backend=eager) [smoke]" if ctx.smoke
                  else "torch.compile(inductor, default mode, dynamic=False), one compile per shape and mode"}
    ctx.set_result(dtype=str(dtype).removeprefix("torch."), shapes=[s.id for s in shapes])
    for mode in ("fwd", "fwd_bwd"):
        for s in shapes:
            for op in ops:
                spec = bench_kernels.SPECS[op]
                dims = spec.shape(s)
                torch.manual_seed(0)
                args, kw = spec.inputs(dims, dict(device=dev, dtype=dtype))
                fns = {"triton": crossflow_kernels.OPS[op].triton, "torch": crossflow_kernels.OPS[op].ref,
                       "torch_compile": compiled[op]}
                _, nbytes = spec.cost(dims, mode, args[0].element_size())
                for name, f in fns.items():
                    case = dict(op=op, shape=list(dims), shape_id=s.id, mode=mode, provider=name,
                                backend=backend_of[name], dtype=str(dtype).removeprefix("torch."), bytes=nbytes)
                    try:
                        case.update(_bench_case(f, args, kw, mode, name))
                    except Exception as e:  # noqa: BLE001
                        case.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    if case["status"] == "ok":
                        case["gbps"] = nbytes / (case["ms_p50"] * 1e-3) / 1e9
                    ctx.add_case(case)
                    _log(f"adaln {op} {mode} {s.id} {name}: {case['status']} "
                         + (f"{case['gbps']:.4g} GB/s, warm-up {case['warmup_s']:.1f} s" if case["status"] == "ok"
                            else case.get("reason", "")[:120]))


SAMPLER_PRESET, SAMPLER_BATCHES, SAMPLER_STEPS, SAMPLER_ROUNDS = "dit-xl-2", (1, 8), 50, 2
COMPILE_MIN_LEFT_S = 30  # a cold regional compile of DiT-XL/2 and its runs need about this; else skipped, said so


def _compile_regional(api, model, tiny: bool):
    """`torch.compile` default mode of each DiT block in place (regional compilation: the 28 blocks share one compiled
    graph, so cold start is one block's compile per batch, not the whole unrolled model's); embedders and the final
    layer (well under 1% of the FLOPs) stay eager. Torch reference ops (`crossflow_kernels.use_backend("torch")` at
    trace time)."""
    from benchmarks import bench_sampler

    euler = api.EulerSampler(guidance_scale=bench_sampler.GUIDANCE)
    _raise_recompile_limit()  # should the blocks not share one graph, each compiles (slow, but never silently eager)
    kw = dict(backend="eager") if tiny else dict(dynamic=False)
    for block in model.blocks:
        block.compile(**kw)
    where = "backend=eager [smoke]" if tiny else "default mode, dynamic=False"
    return bench_sampler._on_torch(euler, model), f"torch, compile per block ({where})"


def stage_sampler(ctx: StageContext) -> None:
    """DiT-XL/2 256 px, random weights, guidance 7: official-style eager (two passes of B), batched eager, FastSampler,
    and torch.compile (default mode, regional) last, since it alone compiles; images/s per batch."""
    import statistics

    import pytest  # bench_sampler's providers say "unavailable" with pytest.skip (a BaseException)
    import torch

    from benchmarks import _common, bench_sampler

    _need_cuda(ctx)
    api = _common.crossflow_api()
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    preset, batches, steps = ("tiny", (1,), 2) if ctx.smoke else (SAMPLER_PRESET, SAMPLER_BATCHES, SAMPLER_STEPS)
    cfg, model = _common.build_flow(preset, dtype)
    providers = {"official_eager": lambda a, m, t: (bench_sampler._official(m, bench_sampler.GUIDANCE), "torch"),
                 "batched_eager": bench_sampler._batched_eager, "fast": bench_sampler._fast}
    order = [(b, p) for b in batches for p in providers] + [(b, "compile_default") for b in batches]
    ctx.set_result(preset=preset, steps=steps, rounds=SAMPLER_ROUNDS, guidance_scale=bench_sampler.GUIDANCE,
                   dtype=str(dtype).removeprefix("torch."), order=[f"{p}-b{b}" for b, p in order])
    compiled = None
    for batch, name in order:
        case = dict(preset=preset, batch=batch, steps=steps, provider=name, dtype=str(dtype).removeprefix("torch."),
                    guidance_scale=bench_sampler.GUIDANCE)
        if name == "compile_default" and not ctx.smoke and ctx.remaining() < COMPILE_MIN_LEFT_S:
            case.update(status="skipped", reason=f"{ctx.remaining():.0f} s left in the stage budget, "
                        f"a cold compile needs about {COMPILE_MIN_LEFT_S} s")
            ctx.add_case(case)
            continue
        try:
            if name == "compile_default":
                if compiled is None:
                    compiled = _compile_regional(api, model, ctx.smoke)
                run, backend = compiled
            else:
                run, backend = providers[name](api, model, ctx.smoke)
            case["backend"] = backend
            z0 = torch.randn(batch, *cfg.latent_shape, device=_common.device(), dtype=dtype)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()  # warm-up: compile / autotune / graph capture (FastSampler's graph is per steps)
            run(z0, steps if name == "fast" else min(3, steps))
            _common.sync()
            warmup_s = time.perf_counter() - t0
            times = []
            for _ in range(SAMPLER_ROUNDS):
                t0 = time.perf_counter()
                run(z0, steps)
                _common.sync()
                times.append(time.perf_counter() - t0)
            latency = statistics.median(times)
            if name == "compile_default":  # how many graphs dynamo compiled so far: 1 per batch if the blocks share
                from torch._dynamo.utils import counters

                case["dynamo_unique_graphs"] = counters["stats"]["unique_graphs"]
            flops = steps * _common.flow_flops_per_forward(cfg, 2 * batch)
            case.update(status="ok", timer="perf_counter+sync", latency_s=latency, latency_all_s=times,
                        images_per_s=batch / latency, s_per_image=latency / batch, warmup_s=warmup_s, flops=flops,
                        tflops=flops / latency / 1e12,
                        peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None)
        except (Exception, pytest.skip.Exception) as e:  # noqa: BLE001 - FastSampler missing, a failed capture: go on
            status = "unavailable" if isinstance(e, pytest.skip.Exception) else "error"
            case.update(status=status, reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        ctx.add_case(case)
        _log(f"sampler {preset} b{batch} {name}: {case['status']} "
             + (f"{case['images_per_s']:.4g} images/s (warm-up {case['warmup_s']:.1f} s)" if case["status"] == "ok"
                else case.get("reason", "")[:120]))


def find_ncu() -> str | None:
    import glob
    import shutil

    found = shutil.which("ncu")
    if found:
        return found
    cands = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu") + glob.glob("/usr/local/cuda*/bin/ncu"))
    return cands[-1] if cands else None


NCU_SHAPE = (16, 16, 1024, 72)  # DiT-XL/2 at 512 px, batch 8 with CFG: (2B, H, T, D)


def ncu_workload(smoke: bool) -> None:
    """One forward of `crossflow_kernels.attention` (Triton) between cudaProfilerStart/Stop, after a warm-up that
    autotunes."""
    import torch

    import crossflow_kernels
    from benchmarks import _common

    dev = _common.device()
    shape, dtype = ((1, 2, 32, 72), torch.float32) if smoke else (NCU_SHAPE, torch.bfloat16)
    q, k, v = (torch.randn(shape, device=dev, dtype=dtype) for _ in range(3))
    attn = crossflow_kernels.OPS["attention"].triton
    with torch.no_grad():
        attn(q, k, v)
        _common.sync()
        if torch.cuda.is_available():
            torch.cuda.profiler.start()
        attn(q, k, v)
        _common.sync()
        if torch.cuda.is_available():
            torch.cuda.profiler.stop()


NCU_NO_PERMISSION = "ERR_NVGPUCTRPERM"  # ncu's message when the driver keeps the counters to admins


def counters_admin_only(params: Path = Path("/proc/driver/nvidia/params")) -> bool:
    """Does the NVIDIA driver restrict GPU performance counters to admins (RmProfilingAdminOnly: 1) while we are not
    root? Then ncu fails with ERR_NVGPUCTRPERM: containers often run so. False when unknown."""
    try:
        text = params.read_text()
    except OSError:
        return False
    admin_only = any(line.replace(" ", "") == "RmProfilingAdminOnly:1" for line in text.splitlines())
    return admin_only and os.geteuid() != 0


def run_watching(cmd: list[str], env: dict, stop_on: str) -> tuple[int, bool]:
    """Run `cmd`, echoing its output; kill it the moment a line contains `stop_on`. -> (return code, stopped)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    stopped = False
    for line in proc.stdout:
        print(line, end="", flush=True)
        if stop_on in line:
            stopped = True
            proc.kill()
            break
    proc.stdout.close()
    return proc.wait(), stopped


def stage_ncu(ctx: StageContext) -> None:
    """Nsight Compute (`--clock-control none`, full set) on one attention forward launch; smoke: the workload alone.
    Without permission for the GPU counters (common in containers) it says so in the result within about a second
    (the driver's setting, or ncu's first ERR_NVGPUCTRPERM line) instead of spending the stage."""
    _need_cuda(ctx)
    ncu = None if ctx.smoke else find_ncu()
    if ncu is not None and counters_admin_only():
        ctx.set_result(ncu=ncu, counters_permission=False, note="ncu not run: the driver restricts GPU performance "
                       "counters to admins (RmProfilingAdminOnly=1) and this is not root (ERR_NVGPUCTRPERM)")
        return
    if ncu is None:
        ncu_workload(ctx.smoke)
        ctx.set_result(ncu=None, note="ncu not run (" + ("smoke" if ctx.smoke else "not found") +
                       "): the profiled workload ran alone")
        return
    rep = ctx.out / NCU_NAME
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
           "--kernel-name", "regex:attn|attention", "--launch-count", "1", "--set", "full", "-f", "-o", str(rep),
           sys.executable, "-m", "benchmarks.gpu_session.gpu_check", "--ncu-workload"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    _log("ncu: " + " ".join(cmd))
    rc, no_permission = run_watching(cmd, env, NCU_NO_PERMISSION)
    if no_permission:
        ctx.set_result(ncu=ncu, counters_permission=False, returncode=rc, note="ncu stopped: no permission for the "
                       "GPU performance counters here (ERR_NVGPUCTRPERM); run as root or with the driver's "
                       "NVreg_RestrictProfilingToAdminUsers=0")
        return
    report = rep.with_suffix(".ncu-rep")
    txt = ctx.out / f"{NCU_NAME}.txt"
    details = subprocess.run([ncu, "--import", str(report), "--page", "details", "--print-units", "base"],
                             capture_output=True, text=True) if report.exists() else None
    if details is not None:
        txt.write_text(details.stdout + details.stderr)
    ctx.set_result(ncu=ncu, returncode=rc, shape=list(NCU_SHAPE), dtype="bfloat16",
                   report=report.name if report.exists() else None, details=txt.name if details else None,
                   metrics=_ncu_metrics(details.stdout) if details else {})
    if rc != 0 or not report.exists():
        raise RuntimeError(f"ncu exited {rc}; report {'written' if report.exists() else 'missing'} (see {LOG_NAME})")


def _ncu_metrics(text: str) -> dict[str, str]:
    """A few headline lines of `ncu --page details` (name -> 'value unit'); the .ncu-rep has everything."""
    want = ("Duration", "Registers Per Thread", "Achieved Occupancy", "Compute (SM) Throughput", "Memory Throughput",
            "DRAM Throughput", "Dynamic Shared Memory Per Block", "Block Size", "Grid Size", "Local Memory Spilling")
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        for w in want:
            if line.strip().startswith(w) and w not in out:
                out[w] = " ".join(parts[len(w.split()):])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The plan and the driver
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int
    title: str
    body: Callable[[StageContext], None]
    estimate: str  # what the budget is made of
    after: Callable[[StageContext], None] | None = None  # run by the driver when the child ended, killed or not


STAGES: tuple[Stage, ...] = (
    # Estimates from compile counts (bare machine: cold Triton / Inductor caches, 16 cores); the seven sum to 535 s,
    # inside the 540 s cap.
    Stage("limits", 15, "device limits: 1 GiB copy GB/s, 8192^3 bf16 matmul TFLOP/s", stage_limits,
          "CUDA init + cuBLAS ~5 s, two do_bench ~1 s, child start-up ~3 s"),
    Stage("tests", 120, "pytest -m gpu, most informative first (xdist 8 workers; serially, what fits)", stage_tests,
          "~25 GPU tests; 70-90 cold Triton compiles (~1.5 s each: ~15-20 s over 8 workers, 110-140 s serially) + 2 "
          "Inductor compiles (~30 s each) + worker start ~10 s: ~70-90 s with xdist; serially the tail is skipped at "
          "the deadline and every finished test is in pytest_gpu.jsonl", after=after_tests),
    Stage("attention", 135, "attention vs SDPA cudnn/flash/efficient/math: d 72/64/128 x T 256/1024/4096 x batch 1/8,"
          " fwd then fwd+bwd; ours, cudnn and flash on the model's fused-qkv views too", stage_attention,
          "pre-warm, one process per head dim in parallel: 6-8 kept configs per head dim (fwd 2-3, fused bwd 2-3, "
          "delta 1) x 2 layouts ~20 compiles x ~1.5 s ~30 s; autotune timing 6 keys x 2 kernels x ~3 configs x ~0.15 s "
          "~5 s per head dim; 180 + 108 cases x ~0.2 s of do_bench ~60 s; start-up ~10 s"),
    Stage("adaln", 75, "adaLN + gated adaLN vs torch.compile(reference): 3 shapes x fwd/fwd+bwd", stage_adaln,
          "12 Inductor compiles (2 ops x 3 shapes x 2 modes) ~4 s each + Inductor start ~10 s; 8 Triton compiles "
          "(2 ops x 2 widths x fwd/bwd) ~12 s; 36 cases x do_bench ~7 s"),
    Stage("sampler", 85, "sampler dit-xl-2 256 px, 50 steps, batch 1 and 8: official eager, batched eager, "
          "FastSampler, torch.compile default (regional)", stage_sampler,
          "model build ~5 s; attention/adaLN compiles from the warm disk cache, autotune ~5 s; 6 eager/graph cases x "
          "(warm-up + 2 runs) ~30 s; 2 block compiles ~15-20 s each + runs"),
    Stage("ncu", 30, "ncu --clock-control none --set full on one attention forward launch", stage_ncu,
          "python + torch start ~5 s, autotune from the warm disk cache ~5 s, ~40 replay passes of a ~1 ms kernel; "
          "no counter permission: ends in ~1 s, said in the result"),
    Stage("diffusers", 75, "diffusers DiT-XL/2-256 (random weights) DiTPipeline, 50 steps, batch 1 and 8: unpatched vs "
          "patched (crossflow_kernels.integrations.diffusers), eager then compile per block", stage_diffusers,
          "import diffusers + build on the GPU ~10 s; 4 eager cases x (3-step warm-up + 2 runs of ~0.5 s) ~15 s with "
          "our kernels' autotune from the attention/adaln stages' disk cache; 2-4 cold block compiles ~15-20 s each, "
          "a compile skipped (said so) under 25 s left; skipped with a note where diffusers is not installed"),
)


def plan_text(stages=STAGES, total: int = TOTAL_BUDGET_S) -> str:
    lines = [f"GPU check plan: {len(stages)} stages in priority order, each killed at its budget "
             f"(the whole run is capped at {total} s)"]
    for i, s in enumerate(stages, 1):
        lines.append(f"  {i}. {s.name:<10} {s.budget_s:>4} s  {s.title}")
        lines.append(f"     {'':<10}         budget: {s.estimate}")
    used = sum(s.budget_s for s in stages)
    lines.append(f"  total      {used:>4} s  ({'<=' if used <= total else 'OVER the cap of'} {total} s)")
    return "\n".join(lines)


def _wait(pid: int, budget: float) -> tuple[str, int | None]:
    """Wait for the child; at the budget, SIGTERM its process group, then SIGKILL. -> ("exited", code) | ("timeout",
    None). The child is reaped only after its group was killed: an unreaped leader keeps the group id ours."""

    def exited(timeout: float) -> bool:
        end = time.monotonic() + timeout
        while True:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.1)

    how = "exited" if exited(budget) else "timeout"
    if how == "timeout":
        _killpg(pid, signal.SIGTERM)
        exited(KILL_GRACE_S)
    _killpg(pid, signal.SIGKILL)  # leftovers of the stage (e.g. compile workers) must not outlive it
    _, status = os.waitpid(pid, 0)
    return how, os.waitstatus_to_exitcode(status) if how == "exited" else None


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _run_child(stage: Stage, ctx: StageContext) -> None:
    """In the forked child: its own process group (so a kill reaches pytest workers and ncu), run, exit."""
    code = 0
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stage.body(ctx)
    except BaseException as e:  # noqa: BLE001 - recorded in the results, then the driver goes on
        code = 1
        tb = traceback.format_exc()
        error = f"{type(e).__name__}: {e}"[:2000]
        print(tb, file=sys.stderr, flush=True)
        try:
            ctx._update(lambda st: st.update(error=error, traceback=tb[-4000:]))
        except Exception:  # noqa: BLE001
            pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_stages(stages, out: Path, smoke: bool, total_s: float = TOTAL_BUDGET_S) -> dict:
    """Run each stage in a forked child under its budget (shrunk to what is left of `total_s`); returns the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_NAME
    start = time.monotonic()
    deadline = start + total_s
    write_results(path, {
        "schema": SCHEMA, "smoke": smoke, "started": _now(), "finished": None, "total_budget_s": total_s,
        "plan": [{"name": s.name, "budget_s": s.budget_s, "title": s.title} for s in stages], "env": {},
        "stages": {},
    })
    for stage in stages:
        left = deadline - time.monotonic()
        budget = min(stage.budget_s, left)
        data = read_results(path)
        if budget < min(MIN_STAGE_S, stage.budget_s):
            data["stages"][stage.name] = {"status": "skipped", "budget_s": stage.budget_s, "wall_s": 0.0,
                                          "note": f"only {max(left, 0):.0f} s of the {total_s:.0f} s total left"}
            write_results(path, data)
            _log(f"stage {stage.name}: skipped (no time left)")
            continue
        data["stages"][stage.name] = {"status": "running", "budget_s": round(budget, 1), "started": _now(),
                                      "cases": [], "results": {}}
        write_results(path, data)
        _log(f"stage {stage.name}: start, budget {budget:.0f} s")
        ctx = StageContext(stage.name, out, smoke, time.monotonic() + budget)
        sys.stdout.flush()
        sys.stderr.flush()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _run_child(stage, ctx)
        how, code = _wait(pid, budget)
        wall = time.monotonic() - t0
        if stage.after is not None:
            try:
                stage.after(ctx)
            except Exception as e:  # noqa: BLE001 - what the child recorded stands
                _log(f"stage {stage.name}: after-hook failed: {type(e).__name__}: {e}")
        data = read_results(path)
        st = data["stages"][stage.name]
        st["wall_s"] = round(wall, 1)
        if how == "timeout":
            st["status"] = "timeout"
            st["note"] = f"killed at its {budget:.0f} s budget; the cases listed finished before that"
        else:
            st["status"] = "ok" if code == 0 else "failed"
            if code != 0 and "error" not in st:
                st["error"] = f"child exited with status {code}"
        write_results(path, data)
        _log(f"stage {stage.name}: {st['status']} in {wall:.1f} s"
             + (f" ({len(st.get('cases', []))} cases)" if st.get("cases") else "")
             + (f" -- {st['error'].splitlines()[0][:200]}" if st.get("error") else ""))
    data = read_results(path)
    data["finished"] = _now()
    data["wall_s"] = round(time.monotonic() - start, 1)
    write_results(path, data)
    return data


def save_result(src: Path, results_dir: Path | None = None, routes_dir: Path | None = None) -> Path:
    """Copy a GPU-check JSON to results/<YYYY-MM-DD>_<device-name-slug>_gpu-check.json (the date it started), and,
    when it has attention cases, write `crossflow_kernels.attention`'s routing table from it to `routes_dir`, by
    default the package data (crossflow_kernels/routes/attention-routes_<device-name-slug>.json, replacing the
    device's previous one)."""
    from benchmarks import _common

    data = read_results(src)
    if data.get("smoke"):
        raise ValueError(f"{src} is a CPU smoke run: its numbers are not results")
    device, started = data.get("env", {}).get("device_name"), str(data.get("started") or "")
    if not device or len(started) < 10:
        raise ValueError(f"{src} names no device or start date (env.device_name, started)")
    dest = Path(results_dir or _common.RESULTS_DIR) / f"{started[:10]}_{_common.slug(device)}_gpu-check.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_results(dest, data)
    if data.get("stages", {}).get("attention", {}).get("cases"):
        _log(f"routing table: {write_routing_table(data, dest.name, routes_dir)}")
    return dest


def _tee_to(log: Path):
    """Send this process's (and every child's) stdout and stderr through `tee -a log`: the console and the file."""
    tee = subprocess.Popen(["tee", "-a", str(log)], stdin=subprocess.PIPE)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(tee.stdin.fileno(), 1)
    os.dup2(tee.stdin.fileno(), 2)
    return tee


def _preload(smoke: bool) -> None:
    """Import the heavy modules once in the driver, so forked children start warm. Imports only: nothing here makes a
    CUDA call (a driver that had initialised CUDA could not fork usable children)."""
    # the interpreter switch is read when each @triton.jit runs: set it before `crossflow_kernels` is imported
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the smoke is the CPU path, even on a GPU machine
    import torch
    import triton  # noqa: F401

    if smoke:  # on the GPU the children import our packages themselves: one CUDA call at import there would
        import benchmarks.bench_kernels  # noqa: F401  (imports kernels)  # ... make every forked child unusable
        import benchmarks.bench_sampler  # noqa: F401
        import crossflow  # noqa: F401
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in the GPU-check driver before forking its stages")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run_gpu.sh",
                                description="The GPU check (see benchmarks/gpu_session/gpu_check.py).")
    p.add_argument("--plan", action="store_true", help="print the stages and their budgets, then exit")
    p.add_argument("--smoke", action="store_true", help="every stage body on tiny shapes on the CPU (CI)")
    p.add_argument("--out", default=None, help="results directory (default: $OUT, else a new temp dir)")
    p.add_argument("--only", default=None, help="comma-separated stage names, run in plan order")
    p.add_argument("--total", type=float, default=TOTAL_BUDGET_S, help=f"cap on the whole run, s (default "
                   f"{TOTAL_BUDGET_S})")
    p.add_argument("--save", metavar="JSON", default=None, help="copy a finished GPU-check JSON (e.g. the one a "
                   "device run brought back) to benchmarks/results/<date>_<device>_gpu-check.json, then exit")
    p.add_argument("--ncu-workload", action="store_true", help=argparse.SUPPRESS)  # what ncu runs
    p.add_argument("--prewarm-attention", type=int, default=None, help=argparse.SUPPRESS)  # one head dim's compiles
    args = p.parse_args(argv)
    if args.ncu_workload:
        ncu_workload(smoke=False)
        return 0
    if args.prewarm_attention is not None:
        prewarm_attention(args.prewarm_attention)
        return 0
    if args.save:
        try:
            print(save_result(Path(args.save)))
        except (OSError, ValueError) as e:
            p.exit(1, f"run_gpu.sh: error: {e}\n")
        return 0
    stages = list(STAGES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {s.name for s in STAGES})
        if unknown:
            p.error(f"unknown stage(s) {unknown}; choose from {[s.name for s in STAGES]}")
        stages = [s for s in STAGES if s.name in names]
    if args.total <= 0:
        p.error("--total must be > 0 seconds")
    if args.plan:
        print(plan_text(stages, int(args.total)))
        return 0
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="crossflow-gpu-check."))
    out.mkdir(parents=True, exist_ok=True)
    tee = _tee_to(out / LOG_NAME)
    try:
        _log(f"{'SMOKE (CPU, tiny shapes; no number here is a GPU result)' if args.smoke else 'GPU check'}: "
             f"results -> {out / RESULTS_NAME}")
        _preload(args.smoke)
        data = run_stages(stages, out, args.smoke, args.total)
        try:  # the summary table in the log's tail too: a device run's output comes back even if its files do not
            from benchmarks.report import readme_table

            print("\n".join(readme_table(data, RESULTS_NAME)), flush=True)
        except Exception as e:  # noqa: BLE001 - the JSON is the result; the table is a convenience
            _log(f"summary table failed: {type(e).__name__}: {e}")
        files = sorted(f for f in out.iterdir() if f.is_file())
        _log("files: " + ", ".join(f"{f.name} ({f.stat().st_size / 2**20:.2f} MiB)" for f in files))
        if len(files) > MAX_FILES or any(f.stat().st_size > 16 * 2**20 for f in files):
            _log(f"warning: over {MAX_FILES} files or one over 16 MiB: not all of them come back from a device run")
        bad = {n: s["status"] for n, s in data["stages"].items() if s["status"] != "ok"}
        _log(f"done in {data['wall_s']} s; " + (f"not ok: {bad}" if bad else "every stage ok")
             + f"; results {out / RESULTS_NAME}")
        return 1 if bad else 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.close(1)
        os.close(2)
        tee.stdin.close()
        try:
            tee.wait(timeout=10)  # a straggler still holding the pipe must not hold the command open
        except subprocess.TimeoutExpired:
            tee.kill()


if __name__ == "__main__":
    sys.exit(main())
