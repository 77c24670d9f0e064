"""Kernel benchmarks: every op of `crossflow_kernels.OPS` × DiT shapes × dtype × provider × mode.

Providers (looked up in `PROVIDERS`, attention adds `ATTN_PROVIDERS`):
  torch          the eager torch reference (`op.ref`)
  torch_compile  `torch.compile(op.ref, dynamic=False)`, the honest baseline (tiny CPU smoke: backend="eager")
  triton         ours (`op.triton`, no dispatch)
  sdpa_<b>       F.scaled_dot_product_attention forced to one backend (flash, efficient, cudnn, math); a backend that
                 rejects the shape is skipped with its reason
  flash_attn     flash_attn.flash_attn_func (FA2) when importable
Modes: fwd (no autograd), fwd_bwd (forward + torch.autograd.grad of every input), bwd (grad on a retained graph).

Metrics (`extra_info`): memory-bound ops report GB/s from the bytes a fused kernel must move (N = elements of one
activation tensor, V = elements of one (B, C) modulation vector, all × itemsize):
  adaln_modulate        fwd: read x, shift, scale; write y         = 2N + 2V      bwd: read x, dy; write dx, dshift,
                        dscale; read scale                         = 3N + 3V
  gated_residual_adaln  fwd: read x, y, gate, shift, scale; write r, out = 4N + 3V   bwd: read x, y, dr, dout; write
                        dx, dy, dgate, dshift, dscale; read gate, scale = 6N + 5V
  euler_step            fwd: read x, v; write out = 3N             bwd: read g; write dx, dv = 3N
  cfg_euler_step        fwd: read x, v_c, v_u; write out = 4N      bwd: read g; write dx, dv_c, dv_u = 4N
  rms_norm              (DiMR TDRMSNorm: a per-sample (B, 1, C) weight) fwd: read x, w; write out = 2N + V
                        bwd: read x, dout, w; write dx, dw = 3N + 2V
  geglu                 (N = elements of h (..., 2F)) fwd: read h; write out = 1.5N   bwd: read h, dout; write dh = 2.5N
  fwd_bwd = fwd + bwd bytes.
Attention reports TFLOP/s: fwd 4·B·H·Tq·Tk·D, bwd 2.5× that, fwd_bwd 3.5×. `frac_of_limit` divides by the copy
GB/s or the bf16 matmul TFLOP/s measured in the same run (`device_limits`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import crossflow_kernels
from benchmarks._common import BenchShape, env_info, measure, sync, synced

# ---------------------------------------------------------------------------------------------------------------------
# Ops: inputs and cost model
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    shape: Callable[[BenchShape], tuple[int, ...]]
    inputs: Callable[[tuple[int, ...], dict], tuple[list[torch.Tensor], dict[str, Any]]]  # tensors, kwargs
    cost: Callable[[tuple[int, ...], str, int], tuple[str, float]]  # (shape, mode, itemsize) -> ("bytes"|"flops", n)


def _randn(shape, kw, scale=1.0):
    return torch.randn(shape, **kw) * scale


def _vec(shape):  # one (B, C) modulation vector of a (B, T, C) activation
    return shape[0] * shape[2]


def _norm_cost(fwd: tuple[int, int], bwd: tuple[int, int]):
    def cost(shape, mode, itemsize):
        n, v = math.prod(shape), _vec(shape)
        per = {"fwd": fwd, "bwd": bwd, "fwd_bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1])}[mode]
        return "bytes", (per[0] * n + per[1] * v) * itemsize

    return cost


def _elementwise_cost(fwd: int, bwd: int):
    return lambda shape, mode, itemsize: (
        "bytes", {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode] * math.prod(shape) * itemsize
    )


def _attn_cost(shape, mode, itemsize):
    b, h, t, d = shape
    return "flops", 4 * b * h * t * t * d * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


SPECS: dict[str, OpSpec] = {
    "adaln_modulate": OpSpec(
        lambda s: s.rows,
        lambda sh, kw: ([_randn(sh, kw), _randn((sh[0], sh[2]), kw, 0.1), _randn((sh[0], sh[2]), kw, 0.1)],
                        dict(eps=1e-6, norm="layer")),
        _norm_cost(fwd=(2, 2), bwd=(3, 3)),
    ),
    "gated_residual_adaln": OpSpec(
        lambda s: s.rows,
        lambda sh, kw: ([_randn(sh, kw), _randn(sh, kw)] + [_randn((sh[0], sh[2]), kw, 0.1) for _ in range(3)],
                        dict(eps=1e-6, norm="layer")),
        _norm_cost(fwd=(4, 3), bwd=(6, 5)),
    ),
    "rms_norm": OpSpec(
        lambda s: s.rows,
        lambda sh, kw: ([_randn(sh, kw), 1 + _randn((sh[0], 1, sh[2]), kw, 0.1)], dict(eps=1e-6)),
        _norm_cost(fwd=(2, 1), bwd=(3, 2)),
    ),
    "geglu": OpSpec(
        lambda s: (*s.rows[:2], 2 * s.rows[2]),  # fc_in's output: hidden F = the model width
        lambda sh, kw: ([_randn(sh, kw)], {}),
        lambda shape, mode, itemsize: (
            "bytes", {"fwd": 1.5, "bwd": 2.5, "fwd_bwd": 4.0}[mode] * math.prod(shape) * itemsize),
    ),
    "attention": OpSpec(lambda s: s.attn, lambda sh, kw: ([_randn(sh, kw) for _ in range(3)], {}), _attn_cost),
    "euler_step": OpSpec(
        lambda s: s.image, lambda sh, kw: ([_randn(sh, kw), _randn(sh, kw)], dict(dt=0.02)), _elementwise_cost(3, 3)
    ),
    "cfg_euler_step": OpSpec(
        lambda s: s.image,
        lambda sh, kw: ([_randn(sh, kw) for _ in range(3)], dict(dt=0.02, guidance_scale=7.0)),
        _elementwise_cost(4, 4),
    ),
}

# ---------------------------------------------------------------------------------------------------------------------
# Providers: name -> factory(op name, tiny) -> (callable, backend description[, context held while timing])
# ---------------------------------------------------------------------------------------------------------------------


def _compiled(op: str, tiny: bool):
    torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale guards across shapes
    if tiny:  # inductor's C++ build is minutes on a small CPU; the smoke only checks the body runs
        return torch.compile(crossflow_kernels.OPS[op].ref, backend="eager"), "torch.compile(backend=eager) [tiny smoke]"
    return torch.compile(crossflow_kernels.OPS[op].ref, dynamic=False), "torch.compile(inductor, dynamic=False)"


def _triton(op: str, tiny: bool):
    return crossflow_kernels.OPS[op].triton, "triton" + (" (interpreter)" if crossflow_kernels.interpreting() else "")


def _sdpa(name: str):
    def factory(op: str, tiny: bool):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The backend is forced for the whole case, not per call: entering sdpa_kernel costs host time that would
        # land in the timings of the small (launch-bound) shapes.
        return torch.nn.functional.scaled_dot_product_attention, f"sdpa:{name}", sdpa_kernel(getattr(SDPBackend, name))

    return factory


def _flash_attn(op: str, tiny: bool):
    try:
        from flash_attn import __version__, flash_attn_func
    except ImportError as e:
        pytest.skip(f"flash_attn not importable ({e})")
    # FA2 takes (B, T, H, D); the transposed views of our (B, H, T, D) inputs keep the last dim contiguous.
    return (lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
            f"flash_attn {__version__}")


PROVIDERS = {"torch": lambda op, tiny: (crossflow_kernels.OPS[op].ref, "torch"), "torch_compile": _compiled, "triton": _triton}
ATTN_PROVIDERS = {
    "sdpa_flash": _sdpa("FLASH_ATTENTION"), "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"), "sdpa_math": _sdpa("MATH"), "flash_attn": _flash_attn,
}


def providers_for(op: str) -> dict[str, Callable]:
    return {**PROVIDERS, **ATTN_PROVIDERS} if op == "attention" else PROVIDERS


# ---------------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------------


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    from benchmarks.conftest import bench_options

    o = bench_options(metafunc.config)
    ops = [op for op in SPECS if op in crossflow_kernels.OPS]
    cases = [(op, s, d, p, m) for op in ops for s in o.shapes for d in o.dtypes for p in providers_for(op)
             for m in o.modes]
    metafunc.parametrize("case", cases, ids=[f"{op}-{s.id}-{d[0]}-{p}-{m}" for op, s, d, p, m in cases])


def _timed_fn(f: Callable, args: list[torch.Tensor], kw: dict, mode: str) -> Callable[[], Any]:
    """The callable to time. Grad modes use torch.autograd.grad (nothing accumulates into .grad between reps)."""
    if mode == "fwd":
        return lambda: f(*args, **kw)
    out = f(*args, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    douts = [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, args, douts, retain_graph=True)
    return lambda: torch.autograd.grad(f(*args, **kw), args, douts)


def _guarded(thunk: Callable[[], Any], provider: str) -> Any:
    """Run a warm-up step (build the graph, compile, autotune). A baseline that rejects the shape is skipped with the
    library's own reason (and its warnings, where SDPA explains why a backend was not eligible)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = thunk()
            sync()
            return out
        except (RuntimeError, ValueError, NotImplementedError) as e:
            if provider in ("triton", "torch"):
                raise  # ours and the reference must run: a failure is a bug, not a skip
            why = " | ".join(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
            pytest.skip(f"{provider} rejects this case: {type(e).__name__}: {str(e).splitlines()[0]}"
                        + (f" [{why}]" if why else ""))


def test_every_op_has_a_spec():
    missing = sorted(set(crossflow_kernels.OPS) - set(SPECS))
    assert not missing, f"crossflow_kernels.OPS {missing} have no benchmark: add an OpSpec to bench_kernels.SPECS"


def test_kernel(benchmark, bench, device_limits, case):
    op, shape, (dtype_id, dtype), provider, mode = case
    if provider == "triton" and crossflow_kernels.interpreting() and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic (CPU smoke)")
    spec = SPECS[op]
    f, backend, *ctx = providers_for(op)[provider](op, bench.tiny)
    dims = spec.shape(shape)
    args, kw = spec.inputs(dims, dict(device=bench.device, dtype=dtype))
    if mode != "fwd":
        args = [a.requires_grad_() for a in args]
    benchmark.group = f"{op}/{mode}/{shape.id}/{dtype_id}"
    with ctx[0] if ctx else contextlib.nullcontext():  # e.g. the forced SDPA backend, for warm-up and every timing
        fn = _guarded(lambda: _timed_fn(f, args, kw, mode), provider)  # grad modes run a forward here
        _guarded(fn, provider)
        timing = measure(fn)
        rounds = bench.rounds or (1 if bench.tiny else 5)  # host-timer rounds; do_bench's numbers are the primary ones
        benchmark.pedantic(synced(fn), rounds=rounds, warmup_rounds=0 if bench.tiny else 1, iterations=1)
    metric, amount = spec.cost(dims, mode, args[0].element_size())
    rate = amount / (timing["ms_p50"] * 1e-3) / (1e9 if metric == "bytes" else 1e12)
    limit = device_limits["copy_gbps"] if metric == "bytes" else device_limits["matmul_tflops"]
    benchmark.extra_info.update(
        kind="kernel", op=op, shape=list(dims), shape_id=shape.id, dtype=str(dtype).replace("torch.", ""),
        provider=provider, mode=mode, backend=backend, tiny=bench.tiny, **timing, **env_info(),
        **({"bytes": amount, "gbps": rate} if metric == "bytes" else {"flops": amount, "tflops": rate}),
        limit=limit, limit_kind="copy_gbps" if metric == "bytes" else "matmul_tflops", frac_of_limit=rate / limit,
    )
