"""Gated residual + adaLN modulation, the block-to-block fusion of a DiT:

    r   = x + gate * y
    out = norm(r) * (1 + scale) + shift

Shapes: x, y (B, T, C); gate, shift, scale (B, C) or (B, 1, C). Returns (r, out), both (B, T, C) in x.dtype. One pass
over memory: reads x and y once, writes r and out once. r is computed in fp32 and normalised before rounding.
Differentiable in every tensor input.
"""

from __future__ import annotations

import torch

from kernels.adaln import check_modulation, normalize_ref


def gated_residual_adaln_ref(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    eps: float = 1e-6, norm: str = "layer", upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * y, norm(x + gate * y) * (1 + scale) + shift); fp32 math, results in x.dtype (fp32 if `upcast`)."""
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        raise ValueError(f"gated_residual_adaln: y must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    v = check_modulation("gated_residual_adaln", x, eps, norm, gate=gate, shift=shift, scale=scale)
    r = x.float() + v["gate"].float()[:, None] * y.float()
    out = normalize_ref(r, eps, norm) * (1 + v["scale"].float()[:, None]) + v["shift"].float()[:, None]
    if upcast:
        return r, out
    return r.to(x.dtype), out.to(x.dtype)


def gated_residual_adaln_triton(x, y, gate, shift, scale, eps=1e-6, norm="layer"):
    raise NotImplementedError("gated_residual_adaln Triton kernels: work in progress")
