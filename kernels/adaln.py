"""adaLN modulation (DiT): y = norm(x) * (1 + scale) + shift.

Shapes: x (B, T, C); shift and scale (B, C) or (B, 1, C), broadcast over T. `norm` is "layer" (LayerNorm without
affine, as in DiT) or "rms" (RMSNorm without weight). Statistics in fp32 (two-pass mean/variance, never E[x²] − μ²),
output in x.dtype. Differentiable in x, shift and scale.
"""

from __future__ import annotations

import torch

from kernels._utils import check_float, check_same

NORMS = ("layer", "rms")


def check_modulation(name: str, x: torch.Tensor, eps, norm: str, **vecs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Validate x (B, T, C) and per-sample vectors (B, C) | (B, 1, C); return the vectors as (B, C) views."""
    check_float(name, x=x, **vecs)
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be (B, T, C), got shape {tuple(x.shape)}")
    B, _, C = x.shape
    out = {}
    for arg, t in vecs.items():
        if t.dim() == 3 and t.shape[1] == 1:
            t = t[:, 0]
        if t.shape != (B, C):
            raise ValueError(f"{name}: `{arg}` must be (B, C) or (B, 1, C) = {(B, C)} for x {tuple(x.shape)}, "
                             f"got {tuple(vecs[arg].shape)}")
        out[arg] = t
    check_same(name, "device", x=x, **vecs)
    check_same(name, "dtype", x=x, **vecs)
    if norm not in NORMS:
        raise ValueError(f"{name}: norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{name}: eps must be a positive float, got {eps!r}")
    return out


def normalize_ref(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """fp32 LayerNorm (no affine) or RMSNorm (no weight) over the last dim."""
    xf = x.float()
    if norm == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def adaln_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, norm: str = "layer",
    upcast: bool = False,
) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift, math in fp32, returned in x.dtype (fp32 when `upcast`)."""
    v = check_modulation("adaln_modulate", x, eps, norm, shift=shift, scale=scale)
    y = normalize_ref(x, eps, norm) * (1 + v["scale"].float()[:, None]) + v["shift"].float()[:, None]
    return y if upcast else y.to(x.dtype)


def adaln_modulate_triton(x, shift, scale, eps=1e-6, norm="layer"):
    raise NotImplementedError("adaln_modulate Triton kernels: work in progress")
