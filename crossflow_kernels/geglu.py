"""GEGLU, the activation between the two Linears of the DiMR MLP (transformer and ConvNeXt blocks):

    geglu(h) = GELU(a) * b,   h = [a | b] on the last dim (..., 2F) -> (..., F),   exact (erf) GELU

The Linears stay with cuBLAS; this is the memory-bound step between them. Eager PyTorch makes two passes and an
intermediate (gelu(a), then the product: read 4F, write 2F per row, six launches with the backward's); fused it reads
2F and writes F forward, reads 3F and writes 2F backward. The input rows may be strided (a (..., 2F) view with unit
last stride); outputs are contiguous. Math in fp32, rounded once to h.dtype. Differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crossflow_kernels._triton import tl, triton
from crossflow_kernels._utils import (
    check_float, check_kernel_dtype, cuda_device_guard, deferred_triton_op, register_triton_ops, widen, wrap_triton,
)

BLOCK_MAX = 1024  # columns per program; F = 512 / 1024 / 2048 in DiMR -> 1 / 1 / 2 programs per row


def check_geglu(name: str, h: torch.Tensor) -> None:
    check_float(name, h=h)
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"{name}: `h` must be (..., 2F) with an even last dim ([a | b]), got shape {tuple(h.shape)}")


def geglu_ref(h: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """GELU(a) * b for h = [a | b], in fp32 (fp64 for fp64 input); result in h.dtype (fp32 if `upcast`)."""
    check_geglu("geglu", h)
    a, b = widen(h).chunk(2, dim=-1)
    out = F.gelu(a) * b
    return out if upcast else out.to(h.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels: h rows (R, 2F) with row stride `sh`, out / dout / dh rows contiguous; grid (R, cdiv(F, BLOCK)).
# ---------------------------------------------------------------------------------------------------------------------

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # globals a kernel reads must be constexpr
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _geglu_fwd_kernel(H, OUT, Fdim, sh, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < Fdim
    a = tl.load(H + row * sh + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(H + row * sh + Fdim + cols, mask=m, other=0.0).to(tl.float32)
    gelu = 0.5 * a * (1.0 + tl.math.erf(a * _SQRT1_2))
    tl.store(OUT + row * Fdim + cols, (gelu * b).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _geglu_bwd_kernel(H, DOUT, DH, Fdim, sh, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < Fdim
    a = tl.load(H + row * sh + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(H + row * sh + Fdim + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(DOUT + row * Fdim + cols, mask=m, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(a * _SQRT1_2))
    pdf = tl.exp(-0.5 * a * a) * _INV_SQRT_2PI
    tl.store(DH + row * 2 * Fdim + cols, (g * b * (cdf + a * pdf)).to(DH.dtype.element_ty), mask=m)
    tl.store(DH + row * 2 * Fdim + Fdim + cols, (g * a * cdf).to(DH.dtype.element_ty), mask=m)


def _grid_and_warps(R: int, Fdim: int) -> tuple[tuple[int, int], int, int]:
    block = min(BLOCK_MAX, max(16, triton.next_power_of_2(Fdim)))
    return (R, triton.cdiv(Fdim, block)), block, max(1, min(4, block // 256))


@deferred_triton_op("crossflow_kernels::geglu_fwd", mutates_args=())
def geglu_fwd(h: torch.Tensor) -> torch.Tensor:
    """h (R, 2F) with unit column stride, any row stride -> (R, F) contiguous."""
    R, F2 = h.shape
    out = torch.empty(R, F2 // 2, device=h.device, dtype=h.dtype)
    grid, block, warps = _grid_and_warps(R, F2 // 2)
    with cuda_device_guard(h):
        wrap_triton(_geglu_fwd_kernel)[grid](h, out, F2 // 2, h.stride(0), BLOCK=block,
                                                            num_warps=warps)
    return out


@deferred_triton_op("crossflow_kernels::geglu_bwd", mutates_args=())
def geglu_bwd(dout: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """-> dh (R, 2F) contiguous."""
    R, F2 = h.shape
    dout = dout.contiguous()
    dh = torch.empty(R, F2, device=h.device, dtype=h.dtype)
    grid, block, warps = _grid_and_warps(R, F2 // 2)
    with cuda_device_guard(h):
        wrap_triton(_geglu_bwd_kernel)[grid](h, dout, dh, F2 // 2, h.stride(0), BLOCK=block,
                                                            num_warps=warps)
    return dh


class GEGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return torch.ops.crossflow_kernels.geglu_fwd(h)

    @staticmethod
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        return torch.ops.crossflow_kernels.geglu_bwd(dout, h)


def geglu_triton(h: torch.Tensor) -> torch.Tensor:
    """GELU(a) * b for h = [a | b] (..., 2F) -> (..., F) with the fused Triton kernels."""
    check_geglu("geglu", h)
    check_kernel_dtype("geglu", h)
    if h.numel() == 0:  # nothing to launch; the reference returns the right empty, differentiable result
        return geglu_ref(h)
    register_triton_ops()
    lead, F2 = h.shape[:-1], h.shape[-1]
    if h.stride(-1) != 1:
        h = h.contiguous()
    rows = h.reshape(-1, F2)  # a view for the row-strided layouts (a Linear's output, a slice of one)
    return GEGLUFunction.apply(rows).view(*lead, F2 // 2)
