"""Gated residual + adaLN modulation, the block-to-block fusion of a DiT:

    r   = x + gate * y
    out = norm(r) * (1 + scale) + shift

Shapes: x, y (B, T, C); gate, shift, scale (B, C) or (B, 1, C). Returns (r, out), both (B, T, C) in x.dtype. One pass
over memory: reads x and y once, writes r and out once. r is computed in fp32 and normalised before rounding.
Differentiable in every tensor input.
"""

from __future__ import annotations

import torch

from kernels._utils import check_kernel_dtype, widen
from kernels.adaln import check_modulation, launch_bwd, launch_fwd, normalize_ref


def gated_residual_adaln_ref(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    eps: float = 1e-6, norm: str = "layer", upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * y, norm(x + gate * y) * (1 + scale) + shift); fp32 math, results in x.dtype (fp32 if `upcast`)."""
    v = check_modulation("gated_residual_adaln", x, eps, norm, rows=dict(y=y), gate=gate, shift=shift, scale=scale)
    r = widen(x) + widen(v["gate"])[:, None] * widen(y)
    out = normalize_ref(r, eps, norm) * (1 + widen(v["scale"])[:, None]) + widen(v["shift"])[:, None]
    if upcast:
        return r, out
    return r.to(x.dtype), out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops over the shared kernels of `adaln.py` (RESIDUAL=True), and autograd
# ---------------------------------------------------------------------------------------------------------------------


@torch.library.triton_op("kernels::gated_residual_adaln_fwd", mutates_args=())
def gated_residual_adaln_fwd(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y (B, T, C) contiguous; gate/shift/scale (B, C) contiguous → (r, out, mean, rstd)."""
    r, out = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = launch_fwd(x, y, gate, shift, scale, r, out, eps, rms)
    return r, out, mean, rstd


@torch.library.triton_op("kernels::gated_residual_adaln_bwd", mutates_args=())
def gated_residual_adaln_bwd(
    dr: torch.Tensor, dout: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (dx, dy, dgate, dshift, dscale); the (B, C) grads in the vectors' dtype."""
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    sums = launch_bwd(x, y, gate, scale, mean, rstd, dout.contiguous(), dr.contiguous(), dx, dy, rms)
    dgate, dshift, dscale = (sums[i].to(gate.dtype, copy=True) for i in (2, 0, 1))
    return dx, dy, dgate, dshift, dscale


class GatedResidualAdaLNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps, norm):
        rms = norm == "rms"
        r, out, mean, rstd = gated_residual_adaln_fwd(x, y, gate, shift, scale, eps, rms)
        # r is not saved: the backward recomputes it in fp32 from x and y, which it must read anyway.
        ctx.save_for_backward(x, y, gate, scale, mean, rstd)
        ctx.rms = rms
        return r, out

    @staticmethod
    def backward(ctx, dr, dout):
        x, y, gate, scale, mean, rstd = ctx.saved_tensors
        dx, dy, dgate, dshift, dscale = gated_residual_adaln_bwd(dr, dout, x, y, gate, scale, mean, rstd, ctx.rms)
        return dx, dy, dgate, dshift, dscale, None, None


def gated_residual_adaln_triton(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    eps: float = 1e-6, norm: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, out) = (x + gate * y, norm(r) * (1 + scale) + shift) in one fused Triton pass. x, y (B, T, C)."""
    v = check_modulation("gated_residual_adaln", x, eps, norm, rows=dict(y=y), gate=gate, shift=shift, scale=scale)
    check_kernel_dtype("gated_residual_adaln", x)
    if x.numel() == 0:  # nothing to launch; the reference returns the right empty, differentiable results
        return gated_residual_adaln_ref(x, y, gate, shift, scale, eps, norm)
    vecs = [v[k].contiguous() for k in ("gate", "shift", "scale")]
    return GatedResidualAdaLNFunction.apply(x.contiguous(), y.contiguous(), *vecs, float(eps), norm)
