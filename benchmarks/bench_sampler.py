"""Sampler throughput: images/s, latency and MFU of a full CFG sampling run (random weights; bf16 on a GPU).

Providers (`SAMPLERS`):
  official_eager        the official loop: per step a cond pass then an uncond pass (B each), torch reference ops
                        (`crossflow_kernels.use_backend("torch")`), x = x + dt·(v_u + s·(v_c − v_u)) in plain torch
  batched_eager         `EulerSampler` (one 2B forward per step) on the torch backend
  compile_max_autotune  `torch.compile(model, mode="max-autotune", dynamic=False)` of the torch-backend model, driven
                        by `EulerSampler` (tiny CPU smoke: backend="eager", recorded in `backend`)
  fast                  `FastSampler` with the default backend (Triton; CUDA-graph replay on CUDA)

Each case: one warm-up run (compile, autotune, graph capture: 3 steps, or the full count for `fast`, whose graph is
keyed by it; wall time `warmup_s`), then `rounds` timed runs (default 1) with a CUDA sync. latency_s = wall time of
one run producing B images; images_per_s = B / latency_s.
FLOPs per run = steps · flow_flops_per_forward(cfg, 2B) (the official loop does the same work as two passes of B);
mfu = FLOPs / latency_s / the bf16 matmul TFLOP/s measured in this run (`device_limits`).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import pytest
import torch

import crossflow_kernels
from benchmarks._common import build_flow, crossflow_api, env_info, flow_flops_per_forward, sync

GUIDANCE = 7.0


def _official(model: Callable, scale: float) -> Callable[[torch.Tensor, int], torch.Tensor]:
    @torch.no_grad()
    def run(z0: torch.Tensor, steps: int) -> torch.Tensor:
        b, x = z0.shape[0], z0.clone()
        cond = torch.zeros(b, dtype=torch.long, device=z0.device)
        uncond = torch.ones_like(cond)
        with crossflow_kernels.use_backend("torch"):
            for i in range(steps):  # the default grid of EulerSampler: t_i = i / N, dt = 1 / N
                t = torch.full((b,), i / steps, device=z0.device)
                v_c, v_u = model(x, t, cond), model(x, t, uncond)
                x = x + (1.0 / steps) * (v_u + scale * (v_c - v_u))
        return x

    return run


def _on_torch(sampler: Callable, model: Callable) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def run(z0: torch.Tensor, steps: int) -> torch.Tensor:
        with crossflow_kernels.use_backend("torch"):  # held while tracing too: the backend is chosen at trace time
            return sampler(model, z0, steps=steps)

    return run


# Providers: name -> factory(crossflow api, model, tiny) -> (run(z0, steps) -> z1, backend description)


def _batched_eager(api, model: torch.nn.Module, tiny: bool):
    return _on_torch(api.EulerSampler(guidance_scale=GUIDANCE), model), "torch"


def _compile_max_autotune(api, model: torch.nn.Module, tiny: bool):
    torch._dynamo.reset()  # one fresh compile per case (static shapes; no recompile limit across batches)
    euler = api.EulerSampler(guidance_scale=GUIDANCE)
    if tiny:  # inductor's C++ build and autotuning take minutes on a small CPU; the smoke only runs the body
        return _on_torch(euler, torch.compile(model, backend="eager")), "torch, compile(backend=eager) [tiny smoke]"
    return _on_torch(euler, torch.compile(model, mode="max-autotune", dynamic=False)), "torch, compile max-autotune"


def _fast(api, model: torch.nn.Module, tiny: bool):
    if api.FastSampler is None:
        pytest.skip("FastSampler not available")
    fast = api.FastSampler(guidance_scale=GUIDANCE)
    backend = crossflow_kernels.get_backend()
    if backend == "auto":  # what `auto` resolves to for these tensors
        backend = "auto=triton" if torch.cuda.is_available() or crossflow_kernels.interpreting() else "auto=torch"
    backend += " (interpreter)" if crossflow_kernels.interpreting() else ""
    graph = ", CUDA graph" if getattr(fast, "use_cuda_graph", False) and torch.cuda.is_available() else ", eager"
    return (lambda z0, steps: fast(model, z0, steps=steps)), backend + graph


SAMPLERS: dict[str, Callable] = {
    "official_eager": lambda api, model, tiny: (_official(model, GUIDANCE), "torch"),
    "batched_eager": _batched_eager,
    "compile_max_autotune": _compile_max_autotune,
    "fast": _fast,
}


@functools.lru_cache(maxsize=1)  # cases run preset-major: one model alive at a time
def _model(preset: str, dtype: torch.dtype):
    return build_flow(preset, dtype)


def pytest_generate_tests(metafunc):
    if "sampler_case" not in metafunc.fixturenames:
        return
    from benchmarks.conftest import bench_options

    o = bench_options(metafunc.config)
    cases = [(p, b, s) for p in o.presets for b in o.batches for s in SAMPLERS]
    metafunc.parametrize("sampler_case", cases, ids=[f"{p}-b{b}-{s}" for p, b, s in cases])


def _time(benchmark, run: Callable, z0: torch.Tensor, steps: int, rounds: int) -> list[float]:
    """Wall seconds of each timed run (CUDA-synchronised), collected while pytest-benchmark times the same calls."""
    times: list[float] = []

    def timed() -> Any:
        t = time.perf_counter()
        out = run(z0, steps)
        sync()
        times.append(time.perf_counter() - t)
        return out

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=1)
    return times


def test_sampler(benchmark, bench, device_limits, sampler_case):
    preset, batch, provider = sampler_case
    try:
        api = crossflow_api()
    except ImportError as e:
        pytest.skip(str(e))
    # The Triton interpreter has no bf16, and CPU bf16 matmuls are slow: the CPU smoke runs fp32.
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    cfg, model = _model(preset, dtype)
    run, backend = SAMPLERS[provider](api, model, bench.tiny)
    z0 = torch.randn(batch, *cfg.latent_shape, device=bench.device, dtype=dtype)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"sampler/{preset}/b{batch}"
    try:
        # Warm-up: compile, autotune and cudagraph-tree recording need a few forwards; FastSampler captures one graph
        # per step count, so it warms up with the timed step count.
        t0 = time.perf_counter()
        run(z0, bench.steps if provider == "fast" else min(3, bench.steps))
        sync()
        warmup_s = time.perf_counter() - t0
        times = _time(benchmark, run, z0, bench.steps, bench.rounds or 1)
    finally:
        if provider == "compile_max_autotune":
            torch._dynamo.reset()  # free the compiled graphs and their CUDA-graph pools before the next case
    latency = statistics.median(times)
    flops = bench.steps * flow_flops_per_forward(cfg, 2 * batch)
    achieved, limit = flops / latency / 1e12, device_limits["matmul_tflops"]
    benchmark.extra_info.update(
        kind="sampler", op="sampler", preset=preset, batch=batch, steps=bench.steps, guidance_scale=GUIDANCE,
        provider=provider, mode="sample", backend=backend, dtype=str(dtype).replace("torch.", ""),
        shape=[batch, *cfg.latent_shape], tiny=bench.tiny, timer="perf_counter+sync", latency_s=latency,
        latency_all_s=times, s_per_image=latency / batch, images_per_s=batch / latency, warmup_s=warmup_s,
        flops=flops, tflops=achieved, limit=limit, limit_kind="matmul_tflops", mfu=achieved / limit,
        frac_of_limit=achieved / limit,
        peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None, **env_info(),
    )
