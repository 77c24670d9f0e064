"""Fused Euler updates for flow-matching ODE sampling.

    euler_step(x, v, dt)                              = x + dt * v
    cfg_euler_step(x, v_cond, v_uncond, dt, s)        = x + dt * (v_uncond + s * (v_cond - v_uncond))

x and the velocities share one shape (any rank) and dtype. `dt` and the guidance scale `s` are Python floats or 0-d
tensors; a 0-d tensor on the same device is read by the kernel, so a captured CUDA graph picks up new values on
replay with no re-capture. One pass over memory: each element is read once per input and written once. Math in fp32,
output in x.dtype. `out=` may be any tensor of x's shape and dtype, including `x` itself (in place); an `out` that
partly overlaps an input (a shifted view of the same buffer) gets the reference's result, through a scratch buffer.

Autograd: gradients flow to x and the velocities (dx = g, dv = dt * g, dv_c = dt * s * g, dv_u = dt * (1 - s) * g);
`dt` and `s` are treated as constants. `out=` cannot be combined with autograd.
"""

from __future__ import annotations

import torch

from crossflow_kernels._triton import tl, triton
from crossflow_kernels._utils import (
    check_float, check_kernel_dtype, check_same, cuda_device_guard, deferred_triton_op, register_triton_ops, widen, wrap_triton,
)

Scalar = float | torch.Tensor

# ---------------------------------------------------------------------------------------------------------------------
# Checks shared by the reference and the launchers
# ---------------------------------------------------------------------------------------------------------------------


def _check_scalar(name: str, arg: str, val, device: torch.device) -> None:
    if isinstance(val, torch.Tensor):
        if val.dim() != 0:
            raise ValueError(f"{name}: `{arg}` must be a Python float or a 0-d tensor, got shape {tuple(val.shape)}")
        if not val.dtype.is_floating_point:
            raise ValueError(f"{name}: `{arg}` must be a floating tensor, got dtype {val.dtype}")
        if val.device != device and val.device.type != "cpu":
            raise ValueError(f"{name}: `{arg}` is on {val.device} but x is on {device}")
    elif not isinstance(val, (int, float)) or isinstance(val, bool):
        raise ValueError(f"{name}: `{arg}` must be a Python float or a 0-d tensor, got {type(val).__name__}")


def _check(name: str, x, vels: dict, scalars: dict, out) -> None:
    check_float(name, x=x, **vels)
    for arg, v in vels.items():
        if v.shape != x.shape:
            raise ValueError(f"{name}: `{arg}` has shape {tuple(v.shape)} but x has shape {tuple(x.shape)}")
    check_same(name, "device", x=x, **vels)
    check_same(name, "dtype", x=x, **vels)
    for arg, s in scalars.items():
        _check_scalar(name, arg, s, x.device)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            got = f"{tuple(out.shape)} {out.dtype} {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{name}: `out` must match x ({tuple(x.shape)} {x.dtype} {x.device}), got {got}")


# ---------------------------------------------------------------------------------------------------------------------
# Torch reference (also the torch backend)
# ---------------------------------------------------------------------------------------------------------------------


def _f32(s: Scalar, x: torch.Tensor) -> Scalar:
    return s.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32)) if isinstance(s, torch.Tensor) \
        else float(s)


def _finish(y: torch.Tensor, x: torch.Tensor, out, upcast: bool) -> torch.Tensor:
    if upcast:
        return y
    if out is not None:
        return out.copy_(y)
    return y.to(x.dtype)


def euler_step_ref(x: torch.Tensor, v: torch.Tensor, dt: Scalar, out=None, upcast: bool = False) -> torch.Tensor:
    """x + dt * v in fp32, returned in x.dtype (fp32 when `upcast`)."""
    _check("euler_step", x, dict(v=v), dict(dt=dt), out)
    y = widen(x) + _f32(dt, x) * widen(v)
    return _finish(y, x, out, upcast)


def cfg_euler_step_ref(
    x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, dt: Scalar, guidance_scale: Scalar, out=None,
    upcast: bool = False,
) -> torch.Tensor:
    """x + dt * (v_uncond + s * (v_cond - v_uncond)) in fp32, returned in x.dtype (fp32 when `upcast`)."""
    _check("cfg_euler_step", x, dict(v_cond=v_cond, v_uncond=v_uncond), dict(dt=dt, guidance_scale=guidance_scale), out)
    vu = widen(v_uncond)
    s = _f32(guidance_scale, x)
    y = widen(x) + _f32(dt, x) * (vu + s * (widen(v_cond) - vu))
    return _finish(y, x, out, upcast)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernel shared by both ops: flat, one element per lane; the CFG combine is a compile-time branch
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _euler_fwd_kernel(
    X,  # pointer to x, N contiguous elements
    VC,  # pointer to v (plain Euler) or v_cond (CFG)
    VU,  # pointer to v_uncond (read only when CFG)
    OUT,  # pointer to the output, may alias X
    DT,  # step size: a pointer to a 0-d tensor when DT_PTR, else a float
    S,  # guidance scale: likewise with S_PTR (unused without CFG)
    N,  # number of elements
    CFG: tl.constexpr,
    DT_PTR: tl.constexpr,
    S_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    # Compile-time branches: only the taken one is compiled, so DT / S may be a float or a pointer.
    if DT_PTR:
        dt = tl.load(DT).to(tl.float32)
    else:
        dt = DT
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(VC + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        if S_PTR:
            s = tl.load(S).to(tl.float32)
        else:
            s = S
        vu = tl.load(VU + offs, mask=mask, other=0.0).to(tl.float32)
        v = vu + s * (v - vu)
    tl.store(OUT + offs, (x + dt * v).to(OUT.dtype.element_ty), mask=mask)


_BLOCK = 1024


def _launch_euler_fwd(x, vc, vu, dt_t, dt_f, s_t, s_f, out) -> None:
    n = x.numel()
    if n == 0:
        return
    cfg = vu is not None
    with cuda_device_guard(x):
        wrap_triton(_euler_fwd_kernel)[(triton.cdiv(n, _BLOCK),)](
            x, vc, vu if cfg else vc, out, dt_t if dt_t is not None else dt_f, s_t if s_t is not None else s_f, n,
            CFG=cfg, DT_PTR=dt_t is not None, S_PTR=s_t is not None, BLOCK=_BLOCK, num_warps=4,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops on first use (`deferred_triton_op`): contiguous inputs, `out` contiguous and
# either disjoint from every input or the very same view as one of them (one lane reads element i and writes element i,
# so exact aliasing is safe; a shifted overlap is not: a program would read what another already wrote).
# `_euler_update` guarantees both.
# ---------------------------------------------------------------------------------------------------------------------


@deferred_triton_op("crossflow_kernels::euler_step_fwd", mutates_args={"out"})
def euler_step_fwd(x: torch.Tensor, v: torch.Tensor, dt_t: torch.Tensor | None, dt_f: float, out: torch.Tensor) -> None:
    """out = x + dt * v; dt is `dt_t` (a 0-d tensor on x's device, read by the kernel) when given, else `dt_f`."""
    _launch_euler_fwd(x, v, None, dt_t, dt_f, None, 0.0, out)


@deferred_triton_op("crossflow_kernels::cfg_euler_step_fwd", mutates_args={"out"})
def cfg_euler_step_fwd(
    x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, dt_t: torch.Tensor | None, dt_f: float,
    s_t: torch.Tensor | None, s_f: float, out: torch.Tensor,
) -> None:
    """out = x + dt * (v_uncond + s * (v_cond - v_uncond)); dt and s as in `euler_step_fwd`."""
    _launch_euler_fwd(x, v_cond, v_uncond, dt_t, dt_f, s_t, s_f, out)


def _split_scalar(s: Scalar, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    # A device tensor is passed by pointer (graph-safe); a host 0-d tensor is read once here, no device sync needed.
    if isinstance(s, torch.Tensor):
        if s.device == x.device:
            return s, 0.0
        return None, float(s.item())
    return None, float(s)


def _extent(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()


def _overlaps_partly(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do `a` and `b` share memory without being the same view? (Conservative: byte ranges that intersect count.)"""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape and a.dtype == b.dtype:
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1


def _euler_update(x, vc, vu, dt: Scalar, s: Scalar, out: torch.Tensor | None) -> torch.Tensor:
    """Run the fused update; writes into `out` (allocated when None) and returns it. A non-contiguous `out`, or one
    that partly overlaps an input (e.g. shifted by some elements), is computed into a scratch buffer then copied:
    the result is always the reference's (compute everything, then write)."""
    check_kernel_dtype("cfg_euler_step" if vu is not None else "euler_step", x)
    dt_t, dt_f = _split_scalar(dt, x)
    s_t, s_f = _split_scalar(s, x)
    ins = [t.contiguous() for t in (x, vc, vu) if t is not None]
    dst = out
    if out is not None and out.is_contiguous():
        # Under torch.compile the tensors are fake (no addresses): only `out is x`, the in-place update, is known safe.
        unsafe = (out is not x) if torch.compiler.is_compiling() else any(_overlaps_partly(out, t) for t in ins)
        if unsafe:
            dst = None
    elif out is not None:
        dst = None
    if dst is None:
        dst = torch.empty_like(ins[0])
    if vu is None:
        torch.ops.crossflow_kernels.euler_step_fwd(ins[0], ins[1], dt_t, dt_f, dst)
    else:
        torch.ops.crossflow_kernels.cfg_euler_step_fwd(ins[0], ins[1], ins[2], dt_t, dt_f, s_t, s_f, dst)
    if out is not None and dst is not out:
        return out.copy_(dst)
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# Autograd and the public Triton entry points
# ---------------------------------------------------------------------------------------------------------------------


class EulerStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v, dt):
        ctx.dt = dt
        return _euler_update(x, v, None, dt, 1.0, None)

    @staticmethod
    def backward(ctx, g):
        return g, g * ctx.dt, None


class CfgEulerStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v_cond, v_uncond, dt, s):
        ctx.dt, ctx.s = dt, s
        return _euler_update(x, v_cond, v_uncond, dt, s, None)

    @staticmethod
    def backward(ctx, g):
        gv = g * ctx.dt
        return g, gv * ctx.s, gv * (1 - ctx.s), None, None


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def euler_step_triton(x: torch.Tensor, v: torch.Tensor, dt: Scalar, out=None) -> torch.Tensor:
    """x + dt * v with the Triton kernel. x, v: same shape/dtype; dt: float or 0-d tensor; `out` may be x."""
    _check("euler_step", x, dict(v=v), dict(dt=dt), out)
    register_triton_ops()
    if _needs_grad(x, v):
        if out is not None:
            raise ValueError("euler_step: `out=` does not support autograd; call it under torch.no_grad()")
        return EulerStepFunction.apply(x, v, dt)
    return _euler_update(x, v, None, dt, 1.0, out)


def cfg_euler_step_triton(
    x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, dt: Scalar, guidance_scale: Scalar, out=None,
) -> torch.Tensor:
    """x + dt * (v_uncond + s * (v_cond - v_uncond)) with one Triton kernel; `out` may be x (in place)."""
    _check("cfg_euler_step", x, dict(v_cond=v_cond, v_uncond=v_uncond), dict(dt=dt, guidance_scale=guidance_scale), out)
    register_triton_ops()
    if _needs_grad(x, v_cond, v_uncond):
        if out is not None:
            raise ValueError("cfg_euler_step: `out=` does not support autograd; call it under torch.no_grad()")
        return CfgEulerStepFunction.apply(x, v_cond, v_uncond, dt, guidance_scale)
    return _euler_update(x, v_cond, v_uncond, dt, guidance_scale, out)
