"""adaLN modulation (DiT), two ops over one pair of kernels:

    adaln_modulate(x, shift, scale)                 = norm(x) * (1 + scale) + shift
    gated_residual_adaln(x, y, gate, shift, scale)  = (r, norm(r) * (1 + scale) + shift)  with  r = x + gate * y

Shapes: x, y (B, T, C); gate, shift, scale (B, C) or (B, 1, C), broadcast over T, and taken with their strides (a DiT
block chunks one (B, 6C) modulation output into six strided views; no copies are made). `norm` is "layer"
(LayerNorm without affine, as in DiT) or "rms" (RMSNorm without weight). Statistics in fp32 (two-pass mean/variance,
never E[x²] − μ²); r is computed in fp32 and normalised before rounding; outputs in x.dtype. The gated op is the
block-to-block fusion of a DiT: one pass over memory, reading x and y once and writing r and out once.
Differentiable in every tensor input.
"""

from __future__ import annotations

import torch

from crossflow_kernels._triton import tl, triton
from crossflow_kernels._utils import (
    check_eps, check_float, check_kernel_dtype, check_same, cuda_device_guard, deferred_triton_op, register_triton_ops,
    row_block, widen, wrap_triton,
)

NORMS = ("layer", "rms")

# ---------------------------------------------------------------------------------------------------------------------
# Checks shared by the references and the launchers
# ---------------------------------------------------------------------------------------------------------------------


def check_modulation(
    name: str, x: torch.Tensor, eps, norm: str, rows: dict[str, torch.Tensor] | None = None, **vecs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Validate x (B, T, C), same-shaped `rows` tensors and per-sample vectors (B, C) | (B, 1, C); return the
    vectors as (B, C) views (never copies)."""
    rows = rows or {}
    check_float(name, x=x, **rows, **vecs)
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be (B, T, C), got shape {tuple(x.shape)}")
    for arg, t in rows.items():
        if t.shape != x.shape:
            raise ValueError(f"{name}: `{arg}` must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    B, _, C = x.shape
    out = {}
    for arg, t in vecs.items():
        if t.dim() == 3 and t.shape[1] == 1:
            t = t[:, 0]
        if t.shape != (B, C):
            raise ValueError(f"{name}: `{arg}` must be (B, C) or (B, 1, C) = {(B, C)} for x {tuple(x.shape)}, "
                             f"got {tuple(vecs[arg].shape)}")
        out[arg] = t
    check_same(name, "device", x=x, **rows, **vecs)
    check_same(name, "dtype", x=x, **rows, **vecs)
    if norm not in NORMS:
        raise ValueError(f"{name}: norm must be one of {NORMS}, got {norm!r}")
    check_eps(name, eps)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Torch references (also the torch backend)
# ---------------------------------------------------------------------------------------------------------------------


def normalize_ref(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """LayerNorm (no affine) or RMSNorm (no weight) over the last dim, in fp32 (fp64 for fp64 input)."""
    xf = widen(x)
    if norm == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def adaln_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, norm: str = "layer",
    upcast: bool = False,
) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift, math in fp32, returned in x.dtype (fp32 when `upcast`)."""
    v = check_modulation("adaln_modulate", x, eps, norm, shift=shift, scale=scale)
    y = normalize_ref(x, eps, norm) * (1 + widen(v["scale"])[:, None]) + widen(v["shift"])[:, None]
    return y if upcast else y.to(x.dtype)


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
# Triton kernels, shared by both ops (RESIDUAL=True adds r = x + gate * y in front of the norm). Rows of x, y, r, out
# and their grads are contiguous (B*T, C); the (B, C) vectors are addressed through their strides (sb, sc).
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["eps"])
def _adaln_fwd_kernel(
    X,  # (B*T, C) input rows
    Y,  # (B*T, C) residual branch (read when RESIDUAL)
    GATE,  # (B, C) gate (read when RESIDUAL)
    SHIFT,  # (B, C)
    SCALE,  # (B, C)
    R,  # (B*T, C) output r = x + gate * y (written when RESIDUAL)
    OUT,  # (B*T, C) output norm(r) * (1 + scale) + shift
    MEAN,  # (B*T,) fp32 row means, saved for the backward (LayerNorm only)
    RSTD,  # (B*T,) fp32 row 1/std, saved for the backward
    T,  # tokens per sample: row // T is the sample whose modulation applies
    C,  # channels
    eps,
    gate_sb, gate_sc, shift_sb, shift_sc, scale_sb, scale_sc,  # strides of the (B, C) vectors
    RESIDUAL: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = tl.load(Y + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GATE + b * gate_sb + cols * gate_sc, mask=mask, other=0.0).to(tl.float32)
        x = x + g * y
        tl.store(R + row * C + cols, x.to(R.dtype.element_ty), mask=mask)
    # Two-pass statistics in fp32. Padded lanes must be zero *after* centring, or each one adds mean² to the variance
    # (C = 1152 leaves 896 of them in a 2048-wide block).
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(MEAN + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
    tl.store(RSTD + row, rstd)
    sc = tl.load(SCALE + b * scale_sb + cols * scale_sc, mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(SHIFT + b * shift_sb + cols * shift_sc, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * C + cols, (xc * rstd * (1.0 + sc) + sh).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(
    X,  # (B*T, C) forward input x
    Y,  # (B*T, C) forward residual branch y (RESIDUAL)
    GATE,  # (B, C) (RESIDUAL)
    SCALE,  # (B, C)
    MEAN,  # (B*T,) fp32 (LayerNorm only)
    RSTD,  # (B*T,) fp32
    DOUT,  # (B*T, C) grad of out
    DR,  # (B*T, C) grad of r (RESIDUAL)
    DX,  # (B*T, C) grad of x (for RESIDUAL this is the total grad of r)
    DY,  # (B*T, C) grad of y (RESIDUAL)
    PART,  # (3, B, N_CHUNKS, C) fp32 partial sums over this program's rows: dshift, dscale, dgate
    T,
    C,
    N_CHUNKS,
    gate_sb, gate_sc, scale_sb, scale_sc,  # strides of the (B, C) vectors
    ROWS: tl.constexpr,  # rows per program; partials are summed over chunks on the host (deterministic)
    RESIDUAL: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    B = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    sc1 = 1.0 + tl.load(SCALE + b * scale_sb + cols * scale_sc, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        g = tl.load(GATE + b * gate_sb + cols * gate_sc, mask=mask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ROWS):
        t = chunk * ROWS + i
        m = cols < tl.where(t < T, C, 0)  # a dead tail row masks every lane
        row = b * T + tl.minimum(t, T - 1)  # keeps the scalar loads below in bounds
        # Recompute r in fp32 from x and y (as the forward did) rather than reading back the rounded r.
        r = tl.load(X + row * C + cols, mask=m, other=0.0).to(tl.float32)
        if RESIDUAL:
            y = tl.load(Y + row * C + cols, mask=m, other=0.0).to(tl.float32)
            r = r + g * y
        rstd = tl.load(RSTD + row)
        if RMS:
            xhat = r * rstd
        else:
            mean = tl.load(MEAN + row)
            xhat = tl.where(m, (r - mean) * rstd, 0.0)
        dout = tl.load(DOUT + row * C + cols, mask=m, other=0.0).to(tl.float32)
        acc_shift += dout
        acc_scale += dout * xhat
        dxhat = dout * sc1
        c1 = tl.sum(dxhat * xhat, axis=0) / C
        if RMS:
            dr = rstd * (dxhat - xhat * c1)
        else:
            dr = rstd * (dxhat - tl.sum(dxhat, axis=0) / C - xhat * c1)
        if RESIDUAL:
            dr += tl.load(DR + row * C + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DY + row * C + cols, (dr * g).to(DY.dtype.element_ty), mask=m)
            acc_gate += dr * y
        tl.store(DX + row * C + cols, dr.to(DX.dtype.element_ty), mask=m)
    part = (b * N_CHUNKS + chunk) * C + cols
    plane = B * N_CHUNKS * C
    tl.store(PART + part, acc_shift, mask=mask)
    tl.store(PART + plane + part, acc_scale, mask=mask)
    if RESIDUAL:
        tl.store(PART + 2 * plane + part, acc_gate, mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# Launch helpers shared by both ops' launchers
# ---------------------------------------------------------------------------------------------------------------------


def fwd_warps(block: int) -> int:
    """Forward: one row per program, ~16 row elements per thread."""
    return min(max(block // 512, 1), 16)


def bwd_warps(block: int) -> int:
    """Backward: ~8 row elements per thread. It keeps five fp32 row-vectors live across its row loop (1 + scale,
    gate and the three partial sums) next to four or five per row; at 16 elements a thread that is 165-197
    registers (sm_90), at 8 it fits in 128 with no spills (the compile report checks it)."""
    return min(max(block // 256, 1), 16)


def bwd_rows_per_program(T: int) -> int:
    # Enough programs to fill a GPU even at B = 1 (T = 256 → 16 chunks of 16 rows), few enough that the fp32 partials
    # stay small; a power of two so that few distinct kernels get compiled.
    return min(16, triton.next_power_of_2(max(T, 1)))


def _strides(v: torch.Tensor | None, like: torch.Tensor) -> tuple[int, int]:
    return tuple((v if v is not None else like).stride())


def _launch_adaln_fwd(x, y, gate, shift, scale, r, out, eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel over x (B, T, C) contiguous; returns the saved (mean, rstd)."""
    B, T, C = x.shape
    mean = torch.empty(B * T, device=x.device, dtype=torch.float32)
    rstd = torch.empty(B * T, device=x.device, dtype=torch.float32)
    block = row_block(C)
    residual = y is not None
    with cuda_device_guard(x):
        wrap_triton(_adaln_fwd_kernel)[(B * T,)](
            x, y if residual else x, gate if residual else shift, shift, scale, r if residual else out, out,
            mean, rstd, T, C, eps, *_strides(gate, shift), *shift.stride(), *scale.stride(),
            RESIDUAL=residual, RMS=rms, BLOCK_C=block, num_warps=fwd_warps(block),
        )
    return mean, rstd


def _launch_adaln_bwd(x, y, gate, scale, mean, rstd, dout, dr, dx, dy, rms: bool) -> torch.Tensor:
    """Run the backward kernel; returns the (3, B, C) fp32 sums (dshift, dscale, dgate)."""
    B, T, C = x.shape
    rows = bwd_rows_per_program(T)
    n_chunks = triton.cdiv(T, rows)
    part = torch.empty(3, B, n_chunks, C, device=x.device, dtype=torch.float32)
    block = row_block(C)
    residual = y is not None
    with cuda_device_guard(x):
        wrap_triton(_adaln_bwd_kernel)[(B, n_chunks)](
            x, y if residual else x, gate if residual else scale, scale, mean, rstd, dout, dr if residual else dout,
            dx, dy if residual else dx, part, T, C, n_chunks, *_strides(gate, scale), *scale.stride(),
            ROWS=rows, RESIDUAL=residual, RMS=rms, BLOCK_C=block, num_warps=bwd_warps(block),
        )
    if not residual:
        part[2].zero_()
    return part.sum(dim=2)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops on first use (torch.compile traces through them; see `deferred_triton_op`)
# ---------------------------------------------------------------------------------------------------------------------


@deferred_triton_op("crossflow_kernels::adaln_modulate_fwd", mutates_args=())
def adaln_modulate_fwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, rms: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T, C) contiguous, shift/scale (B, C) of any strides → (out, mean, rstd)."""
    out = torch.empty_like(x)
    mean, rstd = _launch_adaln_fwd(x, None, None, shift, scale, None, out, eps, rms)
    return out, mean, rstd


@deferred_triton_op("crossflow_kernels::adaln_modulate_bwd", mutates_args=())
def adaln_modulate_bwd(
    dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, rms: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (dx, dshift, dscale); the (B, C) grads contiguous, in scale's dtype."""
    dx = torch.empty_like(x)
    sums = _launch_adaln_bwd(x, None, None, scale, mean, rstd, dout.contiguous(), None, dx, None, rms)
    return dx, sums[0].to(scale.dtype, copy=True), sums[1].to(scale.dtype, copy=True)


@deferred_triton_op("crossflow_kernels::gated_residual_adaln_fwd", mutates_args=())
def gated_residual_adaln_fwd(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y (B, T, C) contiguous; gate/shift/scale (B, C) of any strides → (r, out, mean, rstd)."""
    r, out = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = _launch_adaln_fwd(x, y, gate, shift, scale, r, out, eps, rms)
    return r, out, mean, rstd


@deferred_triton_op("crossflow_kernels::gated_residual_adaln_bwd", mutates_args=())
def gated_residual_adaln_bwd(
    dr: torch.Tensor, dout: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (dx, dy, dgate, dshift, dscale); the (B, C) grads contiguous, in the vectors' dtype."""
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    sums = _launch_adaln_bwd(x, y, gate, scale, mean, rstd, dout.contiguous(), dr.contiguous(), dx, dy, rms)
    dgate, dshift, dscale = (sums[i].to(gate.dtype, copy=True) for i in (2, 0, 1))
    return dx, dy, dgate, dshift, dscale


# ---------------------------------------------------------------------------------------------------------------------
# Autograd and the public Triton entry points
# ---------------------------------------------------------------------------------------------------------------------


class AdaLNModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps, norm):
        rms = norm == "rms"
        out, mean, rstd = torch.ops.crossflow_kernels.adaln_modulate_fwd(x, shift, scale, eps, rms)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.rms = rms
        return out

    @staticmethod
    def backward(ctx, dout):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.crossflow_kernels.adaln_modulate_bwd(dout, x, scale, mean, rstd, ctx.rms)
        return dx, dshift, dscale, None, None


class GatedResidualAdaLNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps, norm):
        rms = norm == "rms"
        r, out, mean, rstd = torch.ops.crossflow_kernels.gated_residual_adaln_fwd(x, y, gate, shift, scale, eps, rms)
        # r is not saved: the backward recomputes it in fp32 from x and y, which it must read anyway.
        ctx.save_for_backward(x, y, gate, scale, mean, rstd)
        ctx.rms = rms
        return r, out

    @staticmethod
    def backward(ctx, dr, dout):
        x, y, gate, scale, mean, rstd = ctx.saved_tensors
        dx, dy, dgate, dshift, dscale = torch.ops.crossflow_kernels.gated_residual_adaln_bwd(
            dr, dout, x, y, gate, scale, mean, rstd, ctx.rms)
        return dx, dy, dgate, dshift, dscale, None, None


def adaln_modulate_triton(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, norm: str = "layer"
) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift with the fused Triton kernels. x (B, T, C); shift, scale (B, C) or (B, 1, C)."""
    v = check_modulation("adaln_modulate", x, eps, norm, shift=shift, scale=scale)
    check_kernel_dtype("adaln_modulate", x)
    if x.numel() == 0:  # nothing to launch; the reference returns the right empty, differentiable result
        return adaln_modulate_ref(x, shift, scale, eps, norm)
    register_triton_ops()
    return AdaLNModulateFunction.apply(x.contiguous(), v["shift"], v["scale"], float(eps), norm)


def gated_residual_adaln_triton(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    eps: float = 1e-6, norm: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, out) = (x + gate * y, norm(r) * (1 + scale) + shift) in one fused Triton pass. x, y (B, T, C)."""
    v = check_modulation("gated_residual_adaln", x, eps, norm, rows=dict(y=y), gate=gate, shift=shift, scale=scale)
    check_kernel_dtype("gated_residual_adaln", x)
    if x.numel() == 0:  # nothing to launch; the reference returns the right empty, differentiable results
        return gated_residual_adaln_ref(x, y, gate, shift, scale, eps, norm)
    register_triton_ops()
    return GatedResidualAdaLNFunction.apply(x.contiguous(), y.contiguous(), v["gate"], v["shift"], v["scale"],
                                            float(eps), norm)
