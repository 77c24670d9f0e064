"""RMSNorm with a broadcast weight, the norms of DiMR (TDRMSNorm, AdaRMSNorm, QKNorm) in one op:

    rms_norm(x, weight, eps) = x * rsqrt(mean(x², last dim) + eps) * weight

x (..., D); weight any shape that broadcasts to x: (D,) a plain RMSNorm, (B, 1, D) a per-sample (time-dependent or
adaptive) scale of (B, N, D) tokens, (B, 1, W, D) the AdaRMSNorm of a (B, H, W, D) map conditioned on its first row,
(2, H, 1) one scalar per head for q and k of a fused (B, N, 3, H, Dh) projection sliced [:, :, :2] (both normalised
in one launch). Statistics and the product in fp32, rounded once to x.dtype. Differentiable in x and weight.

The kernels see x as (G1, G2, N, D): the lead dims where the weight varies are the groups (at most two kept apart,
more merged), the lead dims it is broadcast over are the N rows of a group; every one of them is addressed through
x's strides, so the views above reach the kernels uncopied. The weight is read once per row tile; its gradient is
summed per group over the rows (fp32 partials per chunk of rows, summed on the host: deterministic), and autograd
sums it further over the broadcast (expand) views that built the group layout.
"""

from __future__ import annotations

import math

import torch

from crossflow_kernels._triton import tl, triton
from crossflow_kernels._utils import (
    check_eps, check_float, check_kernel_dtype, check_same, cuda_device_guard, deferred_triton_op, register_triton_ops,
    row_block, widen, wrap_triton,
)

MAX_D = 16384  # a row is one tile of one program: wider rows would spill (the skip concat of DiMR stays in torch)
TILE_FWD = 4096  # elements per forward program (rows x padded D)
TILE_BWD = 1024  # the backward keeps more fp32 vectors live per element (2048 spilled at C = 512 fp32 on sm_90)


# ---------------------------------------------------------------------------------------------------------------------
# Checks and the torch reference (also the torch backend)
# ---------------------------------------------------------------------------------------------------------------------


def check_rms_norm(name: str, x: torch.Tensor, weight: torch.Tensor, eps) -> None:
    check_float(name, x=x, weight=weight)
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least one dim (..., D), got a 0-d tensor")
    try:
        ok = weight.dim() <= x.dim() and torch.broadcast_shapes(weight.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: `weight` of shape {tuple(weight.shape)} does not broadcast to x's shape "
                         f"{tuple(x.shape)}")
    check_same(name, "device", x=x, weight=weight)
    check_same(name, "dtype", x=x, weight=weight)
    check_eps(name, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, upcast: bool = False) -> torch.Tensor:
    """x * rsqrt(mean(x²) + eps) * weight in fp32 (fp64 for fp64 input); result in x.dtype (fp32 if `upcast`)."""
    check_rms_norm("rms_norm", x, weight, eps)
    xf = widen(x)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * widen(weight)
    return out if upcast else out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels. x, out, dout, dx are (G1, G2, N, D) with any lead strides and unit column stride; the weight (G1,
# G2, D) through its strides (its column stride is 0 for a per-head scalar). A program owns one group's tile of rows.
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["eps"])
def _rms_norm_fwd_kernel(
    X, W, OUT,
    RSTD,  # (G1 * G2 * N,) fp32 1/rms per row, saved for the backward
    G2, N, D, eps,
    sx0, sx1, sx2, sw0, sw1, swd, so0, so1, so2,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    g1, g2 = g // G2, g % G2
    rows = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask, cmask = rows < N, cols < D
    m = rmask[:, None] & cmask[None, :]
    x = tl.load(X + g1 * sx0 + g2 * sx1 + rows[:, None] * sx2 + cols[None, :], mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # padded lanes are 0: they add nothing to the sum
    w = tl.load(W + g1 * sw0 + g2 * sw1 + cols * swd, mask=cmask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(OUT + g1 * so0 + g2 * so1 + rows[:, None] * so2 + cols[None, :], y.to(OUT.dtype.element_ty), mask=m)
    tl.store(RSTD + g * N + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd_kernel(
    X, W, DOUT, DX,
    RSTD,  # (G1 * G2 * N,) fp32
    PART,  # (G1 * G2, N_CHUNKS, D) fp32 partial sums of dout * xhat over this program's rows
    G2, N, D, N_CHUNKS,
    sx0, sx1, sx2, sw0, sw1, swd, sd0, sd1, sd2, sdx0, sdx1, sdx2,
    ITERS: tl.constexpr,  # row tiles per program
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    g1, g2 = g // G2, g % G2
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + g1 * sw0 + g2 * sw1 + cols * swd, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ITERS):
        rows = (chunk * ITERS + i) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < N
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(X + g1 * sx0 + g2 * sx1 + rows[:, None] * sx2 + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DOUT + g1 * sd0 + g2 * sd1 + rows[:, None] * sd2 + cols[None, :], mask=m,
                     other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + g * N + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        acc += tl.sum(dy * xhat, axis=0)
        dxhat = dy * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / D
        dx = rstd[:, None] * (dxhat - xhat * c1[:, None])
        tl.store(DX + g1 * sdx0 + g2 * sdx1 + rows[:, None] * sdx2 + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=m)
    tl.store(PART + (g * N_CHUNKS + chunk) * D + cols, acc, mask=cmask)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops on first use (torch.compile traces through them; see `deferred_triton_op`)
# ---------------------------------------------------------------------------------------------------------------------


def _tiles(N: int, D: int, tile: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): rows of one group per program so that short rows (head dim 64) still give a
    program ~`tile` elements; `per_thread` elements per thread (8 = 16-byte loads of 16-bit data)."""
    block_d = row_block(D)
    block_r = max(1, min(triton.next_power_of_2(max(N, 1)), tile // block_d))
    warps = min(max(block_r * block_d // (32 * per_thread), 1), 16)
    return block_r, block_d, warps


@deferred_triton_op("crossflow_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (G1, G2, N, D) with unit column stride, weight (G1, G2, D) of any strides -> (out like x, rstd (G1*G2*N,))."""
    G1, G2, N, D = x.shape
    out = torch.empty_like(x)  # x's dense layout if it has one (a permuted view stays the caller's layout)
    rstd = torch.empty(G1 * G2 * N, device=x.device, dtype=torch.float32)
    block_r, block_d, warps = _tiles(N, D, TILE_FWD, 16)
    with cuda_device_guard(x):
        wrap_triton(_rms_norm_fwd_kernel)[(G1 * G2, triton.cdiv(N, block_r))](
            x, weight, out, rstd, G2, N, D, eps, *x.stride()[:3], *weight.stride(), *out.stride()[:3],
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return out, rstd


@deferred_triton_op("crossflow_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx like x, dweight (G1, G2, D) contiguous in weight's dtype)."""
    G1, G2, N, D = x.shape
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dx = torch.empty_like(x)
    block_r, block_d, warps = _tiles(N, D, TILE_BWD, 16 // x.element_size())  # one 16-byte vector per thread and row
    # ~16 rows per program at least (a tile of short rows already has more), as the adaLN backward
    iters = max(1, min(16, triton.next_power_of_2(max(N, 1))) // block_r)
    n_chunks = triton.cdiv(N, block_r * iters)
    part = torch.empty(G1 * G2, n_chunks, D, device=x.device, dtype=torch.float32)
    with cuda_device_guard(x):
        wrap_triton(_rms_norm_bwd_kernel)[(G1 * G2, n_chunks)](
            x, weight, dout, dx, rstd, part, G2, N, D, n_chunks, *x.stride()[:3], *weight.stride(),
            *dout.stride()[:3], *dx.stride()[:3], ITERS=iters, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return dx, part.sum(1).view(G1, G2, D).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd and the public Triton entry point
# ---------------------------------------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    """On the (G1, G2, N, D) / (G1, G2, D) group layout (`_group_layout`)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = torch.ops.crossflow_kernels.rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.crossflow_kernels.rms_norm_bwd(dout, x, weight, rstd)
        return dx, dw, None


def _group_layout(x: torch.Tensor, weight: torch.Tensor):
    """Views x (..., D) as (G1, G2, N, D) and weight as (G1, G2, D), autograd-tracked; returns them with the function
    that maps a (G1, G2, N, D) result back to x's shape. Merging dims is a view wherever the strides allow it (every
    layout DiMR passes), else a copy."""
    nd, D = x.dim(), x.shape[-1]
    wshape = (1,) * (nd - weight.dim()) + tuple(weight.shape)
    group = [i for i in range(nd - 1) if wshape[i] != 1 and x.shape[i] != 1]
    rows = [i for i in range(nd - 1) if i not in group]
    perm = group + rows + [nd - 1]
    gsizes = [x.shape[i] for i in group]
    G = [1, 1] + gsizes if len(gsizes) < 2 else gsizes
    G1, G2 = math.prod(G[:-1]), G[-1]
    N = math.prod([x.shape[i] for i in rows])  # a list: torch.compile cannot trace a generator here
    xp = x.permute(perm)
    x4 = xp.reshape(G1, G2, N, D)
    w = weight.reshape(wshape).permute(perm)  # (groups..., 1 per row dim, D or 1)
    w3 = w.reshape(G1, G2, w.shape[-1]).expand(G1, G2, D)
    inv = [perm.index(i) for i in range(nd)]

    def back(out4: torch.Tensor) -> torch.Tensor:
        return out4.reshape(xp.shape).permute(inv)

    return x4, w3, back


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x²) + eps) * weight with the fused Triton kernels; weight broadcasts to x (..., D)."""
    check_rms_norm("rms_norm", x, weight, eps)
    check_kernel_dtype("rms_norm", x)
    if x.shape[-1] > MAX_D:
        raise ValueError(f"rms_norm: the Triton kernels take rows of at most {MAX_D} elements, x has "
                         f"{x.shape[-1]}; use the torch backend for wider rows")
    if x.numel() == 0:  # nothing to launch; the reference returns the right empty, differentiable result
        return rms_norm_ref(x, weight, eps)
    register_triton_ops()
    if x.stride(-1) != 1:
        x = x.contiguous()
    x4, w3, back = _group_layout(x, weight)
    return back(RMSNormFunction.apply(x4, w3, float(eps)))
