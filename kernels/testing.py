"""Tolerance policy shared by tests and benchmarks (DESIGN.md §6).

* fp32 (and fp64): `torch.testing.assert_close` with the per-dtype table `TOL`, optionally loosened per op for long
  reductions (pass `atol`/`rtol`).
* fp16/bf16: the kernel's error against an fp32 reference must be at most twice PyTorch's own error in the same dtype
  against that fp32 reference, plus a small floor: ``max|out - ref32| <= 2 * max|ref_lowp - ref32| + floor``.
"""

from __future__ import annotations

import torch

TOL = {
    torch.float64: dict(atol=1e-7, rtol=1e-7),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}
# Absolute floor added to the 2x rule: a few units in the last place of the low-precision dtype, so a reference that
# happens to be exact (error 0) does not demand exactness from a kernel that rounds once more.
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_rms_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """rms(out - ref) / rms(ref), in fp64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _describe(out: torch.Tensor, ref: torch.Tensor, name: str) -> str:
    diff = (out.double() - ref.double()).abs()
    if diff.numel() == 0:
        return f"{name}: empty"
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return (
        f"{name}: max |err| {diff.max().item():.3e} at {idx} (out {out[idx].item():.6g}, ref {ref[idx].item():.6g}); "
        f"rel-RMS err {rel_rms_err(out, ref):.3e}"
    )


def assert_close_to_ref(
    out: torch.Tensor,
    ref32: torch.Tensor,
    ref_lowp: torch.Tensor | None = None,
    *,
    name: str = "output",
    atol: float | None = None,
    rtol: float | None = None,
    floor: float | None = None,
) -> None:
    """Check `out` (any dtype) against `ref32` (an fp32/fp64 reference), following the module's policy.

    For fp16/bf16 `out`, `ref_lowp` is the reference run in that same dtype and is required.
    """
    if out.shape != ref32.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}")
    if not torch.isfinite(out).all() and not torch.equal(torch.isfinite(out), torch.isfinite(ref32)):
        raise AssertionError(f"{name}: non-finite values where the reference has none ({_describe(out, ref32, name)})")
    if out.dtype in (torch.float32, torch.float64):
        tol = dict(TOL[out.dtype])
        if atol is not None:
            tol["atol"] = atol
        if rtol is not None:
            tol["rtol"] = rtol
        torch.testing.assert_close(out, ref32.to(out.dtype), **tol, msg=lambda m: f"{_describe(out, ref32, name)}\n{m}")
        return
    if ref_lowp is None:
        raise ValueError(f"{name}: a same-dtype reference is required to judge {out.dtype} output")
    err = (out.double() - ref32.double()).abs().max().item() if out.numel() else 0.0
    base = (ref_lowp.double() - ref32.double()).abs().max().item() if out.numel() else 0.0
    limit = 2 * base + (FLOOR[out.dtype] if floor is None else floor)
    if not err <= limit:
        raise AssertionError(
            f"{name}: {out.dtype} error {err:.3e} exceeds 2 x PyTorch's same-dtype error {base:.3e} + floor "
            f"(limit {limit:.3e}); {_describe(out, ref32, name)}"
        )
