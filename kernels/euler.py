"""Fused Euler updates for flow-matching ODE sampling.

    euler_step(x, v, dt)                              = x + dt * v
    cfg_euler_step(x, v_cond, v_uncond, dt, s)        = x + dt * (v_uncond + s * (v_cond - v_uncond))

x and the velocities share one shape (any rank) and dtype. `dt` and the guidance scale `s` are Python floats or 0-d
tensors; a 0-d tensor on the same device is read by the kernel, so a captured CUDA graph picks up new values on
replay with no re-capture. One pass over memory: each element is read once per input and written once. Math in fp32,
output in x.dtype. `out=` may be any tensor of x's shape and dtype, including `x` itself (in place).

Autograd: gradients flow to x and the velocities (dx = g, dv = dt * g, dv_c = dt * s * g, dv_u = dt * (1 - s) * g);
`dt` and `s` are treated as constants. `out=` cannot be combined with autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import check_float, check_kernel_dtype, check_same, cuda_device_guard, widen

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
# Triton kernel: flat, one element per lane; the CFG combine is a compile-time branch
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


@torch.library.triton_op("kernels::euler_fwd", mutates_args={"out"})
def _euler_fwd_op(
    x: torch.Tensor, vc: torch.Tensor, vu: torch.Tensor | None, dt_t: torch.Tensor | None, dt_f: float,
    s_t: torch.Tensor | None, s_f: float, out: torch.Tensor,
) -> None:
    n = x.numel()
    if n == 0:
        return
    cfg = vu is not None
    with cuda_device_guard(x):
        torch.library.wrap_triton(_euler_fwd_kernel)[(triton.cdiv(n, _BLOCK),)](
            x, vc, vu if cfg else vc, out, dt_t if dt_t is not None else dt_f, s_t if s_t is not None else s_f, n,
            CFG=cfg, DT_PTR=dt_t is not None, S_PTR=s_t is not None, BLOCK=_BLOCK, num_warps=4,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------------


def _split_scalar(s: Scalar, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    # A device tensor is passed by pointer (graph-safe); a host 0-d tensor is read once here, no device sync needed.
    if isinstance(s, torch.Tensor):
        if s.device == x.device:
            return s, 0.0
        return None, float(s.item())
    return None, float(s)


def euler_fwd(
    x: torch.Tensor, vc: torch.Tensor, vu: torch.Tensor | None, dt: Scalar, s: Scalar, out: torch.Tensor | None,
) -> torch.Tensor:
    """Launch the fused update; writes into `out` (allocated when None) and returns it."""
    check_kernel_dtype("euler_step", x)
    dt_t, dt_f = _split_scalar(dt, x)
    s_t, s_f = _split_scalar(s, x)
    xc, vcc = x.contiguous(), vc.contiguous()
    vuc = vu.contiguous() if vu is not None else None
    dst = out if out is not None and out.is_contiguous() else torch.empty_like(xc)
    _euler_fwd_op(xc, vcc, vuc, dt_t, dt_f, s_t, s_f, dst)
    if out is not None and dst is not out:
        out.copy_(dst)
        return out
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# Autograd and the direct Triton entry points
# ---------------------------------------------------------------------------------------------------------------------


class EulerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, vc, vu, dt, s):
        ctx.dt, ctx.s, ctx.cfg = dt, s, vu is not None
        return euler_fwd(x, vc, vu, dt, s, None)

    @staticmethod
    def backward(ctx, g):
        gv = g * ctx.dt
        if ctx.cfg:
            return g, gv * ctx.s, gv * (1 - ctx.s), None, None
        return g, gv, None, None, None


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def euler_step_triton(x: torch.Tensor, v: torch.Tensor, dt: Scalar, out=None) -> torch.Tensor:
    """x + dt * v with the Triton kernel. x, v: same shape/dtype; dt: float or 0-d tensor; `out` may be x."""
    _check("euler_step", x, dict(v=v), dict(dt=dt), out)
    if _needs_grad(x, v):
        if out is not None:
            raise ValueError("euler_step: `out=` does not support autograd; call it under torch.no_grad()")
        return EulerFunction.apply(x, v, None, dt, 1.0)
    return euler_fwd(x, v, None, dt, 1.0, out)


def cfg_euler_step_triton(
    x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, dt: Scalar, guidance_scale: Scalar, out=None,
) -> torch.Tensor:
    """x + dt * (v_uncond + s * (v_cond - v_uncond)) with one Triton kernel; `out` may be x (in place)."""
    _check("cfg_euler_step", x, dict(v_cond=v_cond, v_uncond=v_uncond), dict(dt=dt, guidance_scale=guidance_scale), out)
    if _needs_grad(x, v_cond, v_uncond):
        if out is not None:
            raise ValueError("cfg_euler_step: `out=` does not support autograd; call it under torch.no_grad()")
        return EulerFunction.apply(x, v_cond, v_uncond, dt, guidance_scale)
    return euler_fwd(x, v_cond, v_uncond, dt, guidance_scale, out)
