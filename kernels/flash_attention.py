"""Non-causal scaled dot-product attention: out = softmax(q kᵀ · scale) v.

Shapes: q (B, H, Tq, D), k and v (B, H, Tk, D); Tq may differ from Tk; any T (ragged lengths are the norm: 77 text
tokens, 257 image+indicator tokens). key_padding_mask: optional bool (B, Tk), True = attend. A query row whose keys are
all masked returns zeros (not NaN) and passes no gradient. Softmax statistics in fp32.
"""

from __future__ import annotations

import math

import torch

from kernels._utils import check_float, check_same

SUPPORTED_HEAD_DIMS = (16, 32, 64, 72, 80, 96, 128)


def _check(q, k, v, scale, key_padding_mask) -> None:
    name = "attention"
    check_float(name, q=q, k=k, v=v)
    for arg, t in dict(q=q, k=k, v=v).items():
        if t.dim() != 4:
            raise ValueError(f"{name}: `{arg}` must be (B, H, T, D), got shape {tuple(t.shape)}")
    check_same(name, "device", q=q, k=k, v=v)
    check_same(name, "dtype", q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and D")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: head dim {q.shape[3]} is not supported; choose one of {SUPPORTED_HEAD_DIMS}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"{name}: `scale` must be a Python float or None, got {type(scale).__name__}")
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ValueError(f"{name}: key_padding_mask must be a bool tensor, got {getattr(m, 'dtype', type(m))}")
        if m.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"{name}: key_padding_mask must be (B, Tk) = {(k.shape[0], k.shape[2])}, got {tuple(m.shape)}"
            )
        if m.device != q.device:
            raise ValueError(f"{name}: key_padding_mask is on {m.device} but q is on {q.device}")


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, upcast: bool = False,
) -> torch.Tensor:
    """Explicit-math reference. Scores and softmax in fp32; P·V in the input dtype (fp32 when `upcast`)."""
    _check(q, k, v, scale, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dtype = torch.float32 if upcast else q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, H, Tq, Tk)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]
        s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.where(keep.any(-1, keepdim=True), p, torch.zeros_like(p))  # all-masked rows: zeros, not NaN
    else:
        p = torch.softmax(s, dim=-1)
    return torch.matmul(p.to(v.dtype), v).to(dtype)


def attention_triton(q, k, v, scale=None, key_padding_mask=None):
    raise NotImplementedError("attention Triton kernels: work in progress")
