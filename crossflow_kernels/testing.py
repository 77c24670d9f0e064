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

    For fp16/bf16 `out`, `ref_lowp` is the reference run in that same dtype and is required. For fp32 `out`, pass an
    fp64 `ref32` and the fp32 reference as `ref_lowp` to allow the 2x rule where the table is too tight.
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
        try:
            torch.testing.assert_close(out, ref32.to(out.dtype), **tol,
                                       msg=lambda m: f"{_describe(out, ref32, name)}\n{m}")
            return
        except AssertionError:
            # Ill-conditioned cases (a LayerNorm over 2 channels, say) can miss the table in fp32 without being
            # wrong: then, with an fp64 oracle, accept up to twice PyTorch's own fp32 error (the same 2x rule).
            if ref_lowp is None or ref32.dtype != torch.float64:
                raise
            floor = 1e-7 if floor is None else floor
    if ref_lowp is None:
        raise ValueError(f"{name}: a same-dtype reference is required to judge {out.dtype} output")
    err = (out.double() - ref32.double()).abs().max().item() if out.numel() else 0.0
    base = (ref_lowp.double() - ref32.double()).abs().max().item() if out.numel() else 0.0
    limit = 2 * base + (FLOOR.get(out.dtype, 0.0) if floor is None else floor)
    if not err <= limit:
        raise AssertionError(
            f"{name}: {out.dtype} error {err:.3e} exceeds 2 x PyTorch's same-dtype error {base:.3e} + floor "
            f"(limit {limit:.3e}); {_describe(out, ref32, name)}"
        )


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def grads_of(fn, inputs, grad_outs, **kwargs):
    """Run `fn(*inputs, **kwargs)` on fresh leaf copies; return (outputs, grads of every floating input)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = _as_tuple(fn(*leaves, **kwargs))
    diff = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(outs, diff, [g.to(o.dtype) for g, o in zip(grad_outs, outs)], allow_unused=False)
    return [o.detach() for o in outs], list(grads)


def check_against_ref(
    impl, ref, inputs, *, names, atol: float | None = None, rtol: float | None = None, **kwargs
) -> None:
    """Compare `impl` with `ref` (a `<op>_ref` that takes `upcast=`), forward and every input gradient.

    `inputs` are in the dtype under test. The oracle runs with upcast=True on fp32 copies (fp64 copies when testing
    fp32); the reference run in the dtype under test sets the error budget of the 2x rule. Random upstream gradients
    are drawn once and shared.
    """
    dtype = inputs[0].dtype
    hi = torch.float64 if dtype == torch.float32 else torch.float32  # the oracle's dtype
    # Draw the upstream gradients once, from the shapes of a reference forward.
    probe = _as_tuple(ref(*[t.detach().to(hi) for t in inputs], upcast=True, **kwargs))
    gouts = [torch.randn_like(p) for p in probe]
    outs_hi, grads_hi = grads_of(lambda *a, **k: ref(*a, upcast=True, **k), [t.to(hi) for t in inputs], gouts,
                                 **kwargs)
    outs, grads = grads_of(impl, inputs, gouts, **kwargs)
    outs_lp, grads_lp = grads_of(ref, inputs, gouts, **kwargs)  # PyTorch in the dtype under test
    grad_names = [n for n, t in zip(names, inputs) if t.is_floating_point()]
    for i, (o, r, rl) in enumerate(zip(outs, outs_hi, outs_lp)):
        assert_close_to_ref(o, r, rl, name=f"out[{i}]", atol=atol, rtol=rtol)
    for n, g, r, rl in zip(grad_names, grads, grads_hi, grads_lp):
        assert_close_to_ref(g, r, rl, name=f"d{n}", atol=atol, rtol=rtol)
