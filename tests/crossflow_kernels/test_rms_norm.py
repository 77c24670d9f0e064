"""rms_norm: forward and every gradient against the reference, for each weight layout DiMR passes."""

import math

import pytest
import torch

import crossflow_kernels
from crossflow_kernels.rms_norm import MAX_D, RMSNormFunction, rms_norm_ref, rms_norm_triton
from crossflow_kernels.testing import check_against_ref

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16]
NAMES = ["x", "weight"]

# (x shape, weight shape): odd widths 7, 77, 300, 1152 and the DiMR layouts: a plain (D,) weight, a per-sample
# (TDRMSNorm / AdaRMSNorm on tokens) (B, 1, D), the AdaRMSNorm of a ConvNeXt map conditioned on its first row
# (B, 1, W, D), one scalar per head (H, 1), a weight over every lead dim (nothing broadcast), a (1,) scalar.
LAYOUTS = [
    ((2, 5, 7), (7,)),
    ((3, 4, 77), (3, 1, 77)),
    ((2, 3, 300), (2, 1, 300)),
    ((1, 3, 1152), (1152,)),
    ((2, 3, 5, 16), (2, 1, 5, 16)),
    ((2, 9, 3, 64), (3, 1)),
    ((2, 3, 33), (2, 3, 33)),
    ((4, 9), (1,)),
    ((7,), (7,)),
]


def _inputs(xs, ws, dtype):
    x = (torch.randn(xs, device=DEV) * 2 + 0.5).to(dtype)
    w = (torch.randn(ws, device=DEV) * 0.5 + 1).to(dtype)
    return [x, w]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("xs, ws", LAYOUTS, ids=str)
def test_rms_norm_fwd_bwd(xs, ws, dtype):
    check_against_ref(rms_norm_triton, rms_norm_ref, _inputs(xs, ws, dtype), names=NAMES, eps=1e-6)


def _qk(fn, H):
    """QKNorm as DiMR runs it: q and k of one fused (B, N, 3, H, Dh) projection in one call, a scalar per head."""
    return lambda qkv, s, eps, **k: fn(qkv[:, :, :2], s.view(1, H, 1).expand(2, H, 1), eps, **k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_fused_qk_view(dtype):
    B, N, H, Dh = 2, 7, 3, 64
    qkv = torch.randn(B, N, 3, H, Dh, device=DEV).to(dtype)
    s = (torch.rand(H, device=DEV) + 0.5).to(dtype)
    check_against_ref(_qk(rms_norm_triton, H), _qk(rms_norm_ref, H), [qkv, s], names=["qkv", "s"], eps=1e-6)


def test_rms_norm_views_reach_the_kernel_uncopied(monkeypatch):
    # The q/k slice of the fused projection and a (B, H, W, D) map with a (B, 1, W, D) weight are passed by pointer
    # and strides: the kernel's x is a view of the caller's storage.
    seen = []
    real = RMSNormFunction.apply

    def spy(x4, w3, eps):
        seen.append(x4)
        return real(x4, w3, eps)

    monkeypatch.setattr(RMSNormFunction, "apply", spy)
    qkv = torch.randn(2, 5, 3, 4, 16, device=DEV)
    out = rms_norm_triton(qkv[:, :, :2], torch.ones(2, 4, 1, device=DEV), 1e-6)
    assert seen[-1].data_ptr() == qkv.data_ptr() and seen[-1].shape == (2, 4, 10, 16)
    assert out.shape == (2, 5, 2, 4, 16)
    m = torch.randn(2, 6, 5, 8, device=DEV)
    out = rms_norm_triton(m, torch.ones(2, 1, 5, 8, device=DEV), 1e-6)
    assert seen[-1].data_ptr() == m.data_ptr() and seen[-1].shape == (2, 5, 6, 8)
    assert out.is_contiguous()  # written in the caller's layout, not the kernel's (G1, G2, N, D) order


def test_rms_norm_noncontiguous():
    # x as a transposed view (unit column stride lost: copied), weight as a strided slice.
    x = torch.randn(2, 33, 9, device=DEV).transpose(1, 2)
    w = torch.randn(2, 1, 66, device=DEV)[..., ::2]
    assert not x.is_contiguous() and not w.is_contiguous()
    check_against_ref(rms_norm_triton, rms_norm_ref, [x, w], names=NAMES, eps=1e-6)
    # rows strided (a slice of wider rows), column stride 1
    x = torch.randn(3, 5, 40, device=DEV)[..., 3:33]
    check_against_ref(rms_norm_triton, rms_norm_ref, [x, torch.randn(30, device=DEV)], names=NAMES, eps=1e-6)


def test_rms_norm_dimr_tdrms_eps():
    # The DiMR TDRMSNorm eps (1e-16 under the root, the square of the official 1e-8 on the rms) on fp32 rows.
    check_against_ref(rms_norm_triton, rms_norm_ref, _inputs((2, 5, 64), (2, 1, 64), torch.float32), names=NAMES,
                      eps=1e-16)


def test_rms_norm_identity():
    x = torch.randn(2, 7, 300, device=DEV) * 3 + 1
    out = rms_norm_triton(x, torch.ones(300, device=DEV), 1e-6)
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(x, (300,), eps=1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("xs, ws", [((0, 5, 8), (8,)), ((2, 0, 8), (2, 1, 8)), ((2, 3, 0), (0,))], ids=str)
def test_rms_norm_empty(xs, ws):
    x, w = torch.randn(xs, device=DEV, requires_grad=True), torch.randn(ws, device=DEV, requires_grad=True)
    out = rms_norm_triton(x, w, 1e-6)
    assert out.shape == xs
    out.sum().backward()
    assert x.grad.shape == xs and w.grad.shape == ws


@pytest.mark.parametrize("fast_mode", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["fast", "full"])
def test_rms_norm_gradcheck(fast_mode):
    # fast_mode compares one random projection v'Ju of the Jacobians (the quick loop); the element-wise check (slow in
    # the interpreter) also catches a gradient off by a few per cent, which a projection can miss.
    # fp64 leaves through the autograd Function on its (G1, G2, N, D) / (G1, G2, D) group layout (the kernels compute
    # in fp32, hence the loose tolerances); the weight's per-head column stride 0 included.
    x4 = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    w3 = torch.randn(2, 3, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), [x4, w3], eps=1e-3, atol=2e-3,
                                    rtol=2e-3, fast_mode=fast_mode)
    s = torch.randn(2, 3, 1, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b.expand(2, 3, 5), 1e-6), [x4, s],
                                    eps=1e-3, atol=2e-3, rtol=2e-3, fast_mode=fast_mode)


BAD = [
    (lambda: (torch.randn(2, 3, 8), torch.randn(7)), r"`weight` of shape \(7,\) does not broadcast"),
    (lambda: (torch.randn(2, 3, 8), torch.randn(3, 1, 8)), r"`weight` of shape \(3, 1, 8\) does not broadcast"),
    (lambda: (torch.randn(3, 8), torch.randn(2, 3, 8)), r"`weight` .* does not broadcast"),
    (lambda: (torch.ones(2, 8, dtype=torch.int32), torch.randn(8)), "`x` must be a floating"),
    (lambda: (torch.randn(2, 8), torch.randn(8, dtype=torch.float16)), "dtype"),
    (lambda: (torch.randn(2, 8), torch.randn(8, device="meta")), "device"),
    (lambda: (torch.tensor(1.0), torch.tensor(1.0)), "at least one dim"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("make, match", BAD)
def test_rms_norm_bad_input(make, match, backend):
    x, w = make()
    with crossflow_kernels.use_backend(backend), pytest.raises(ValueError, match=match):
        crossflow_kernels.rms_norm(x, w, 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("eps", [True, 0.0, -1e-6, float("nan"), "1e-6", None], ids=repr)
def test_rms_norm_bad_eps(eps, backend):
    with crossflow_kernels.use_backend(backend), pytest.raises(ValueError, match="eps must be a positive float"):
        crossflow_kernels.rms_norm(torch.randn(2, 8), torch.randn(8), eps)


def test_rms_norm_too_wide_rows_name_the_limit():
    x = torch.empty(1, MAX_D + 1)
    with pytest.raises(ValueError, match=f"at most {MAX_D}"):
        rms_norm_triton(x, torch.empty(MAX_D + 1), 1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("xs, ws", [((4, 257, 1024), (4, 1, 1024)), ((4, 32, 32, 512), (4, 1, 32, 512)),
                                    ((4, 64, 64, 256), (256,))], ids=str)
def test_rms_norm_gpu_dimr_shapes(xs, ws, dtype):
    check_against_ref(rms_norm_triton, rms_norm_ref, _inputs(xs, ws, dtype), names=NAMES, eps=1e-6,
                      atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_rms_norm_gpu_qk_and_compile():
    B, N, H, Dh = 4, 257, 16, 64
    qkv = torch.randn(B, N, 3, H, Dh, device=DEV, dtype=torch.bfloat16)
    s = torch.rand(H, device=DEV, dtype=torch.bfloat16) + 0.5
    check_against_ref(_qk(rms_norm_triton, H), _qk(rms_norm_ref, H), [qkv, s], names=["qkv", "s"], eps=1e-6)
    f = _qk(crossflow_kernels.rms_norm, H)
    with crossflow_kernels.use_backend("triton"):
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(qkv, s, 1e-6), f(qkv, s, 1e-6))
    assert math.isfinite(f(qkv, s, 1e-6).float().sum().item())
