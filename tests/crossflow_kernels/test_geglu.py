"""geglu: forward and the gradient against the reference."""

import pytest
import torch

import crossflow_kernels
from crossflow_kernels.geglu import BLOCK_MAX, GEGLUFunction, geglu_ref, geglu_triton
from crossflow_kernels.testing import check_against_ref

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16]
# (..., 2F): odd F (7, 77, 300), F = 1152, F past one program's block (2 * BLOCK_MAX + 3: three column programs with
# a ragged last one), the DiMR-tiny widths (48, 32, 16) and 4-D ConvNeXt maps.
SHAPES = [(2, 5, 14), (3, 154), (1, 2, 600), (1, 2304), (1, 2 * (2 * BLOCK_MAX + 3)), (2, 3, 96), (2, 4, 4, 64),
          (1, 8, 8, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_geglu_fwd_bwd(shape, dtype):
    h = (torch.randn(shape, device=DEV) * 2).to(dtype)  # GELU's curved region and both tails
    check_against_ref(geglu_triton, geglu_ref, [h], names=["h"])


def test_geglu_noncontiguous():
    # rows strided (a slice of wider rows: reaches the kernel uncopied) and a transposed view (copied)
    def sliced(fn):
        return lambda h, **k: fn(h[..., 3:33], **k)

    check_against_ref(sliced(geglu_triton), sliced(geglu_ref), [torch.randn(4, 5, 40, device=DEV)], names=["h"])
    h = torch.randn(3, 10, 6, device=DEV).transpose(1, 2)
    assert not h.is_contiguous()
    check_against_ref(geglu_triton, geglu_ref, [h], names=["h"])


def test_geglu_strided_rows_are_not_copied(monkeypatch):
    seen = []
    real = GEGLUFunction.apply

    def spy(rows):
        seen.append(rows)
        return real(rows)

    monkeypatch.setattr(GEGLUFunction, "apply", spy)
    h = torch.randn(4, 40, device=DEV)
    geglu_triton(h[:, 4:36])
    assert seen[0].data_ptr() == h[:, 4:].data_ptr() and seen[0].stride() == (40, 1)


def test_geglu_matches_torch_gelu_times_gate():
    h = torch.randn(3, 7, 64, device=DEV) * 3
    a, b = h.chunk(2, dim=-1)
    torch.testing.assert_close(geglu_triton(h), torch.nn.functional.gelu(a) * b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 6), (3, 0)], ids=str)
def test_geglu_empty(shape):
    h = torch.randn(shape, device=DEV, requires_grad=True)
    out = geglu_triton(h)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    out.sum().backward()
    assert h.grad.shape == shape


def test_geglu_gradcheck():
    h = torch.randn(3, 10, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(GEGLUFunction.apply, [h], eps=1e-3, atol=2e-3, rtol=2e-3)


BAD = [
    (lambda: torch.randn(2, 7), r"`h` must be \(\.\.\., 2F\) with an even last dim"),
    (lambda: torch.tensor(1.0), r"`h` must be \(\.\.\., 2F\)"),
    (lambda: torch.ones(2, 8, dtype=torch.int64), "`h` must be a floating"),
    (lambda: [1.0, 2.0], "`h` must be a torch.Tensor|tensor argument"),  # the dispatcher finds none
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("make, match", BAD)
def test_geglu_bad_input(make, match, backend):
    with crossflow_kernels.use_backend(backend), pytest.raises(ValueError, match=match):
        crossflow_kernels.geglu(make())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(4, 257, 4096), (4, 32, 32, 2048), (4, 64, 64, 1024)], ids=str)
def test_geglu_gpu_dimr_shapes(shape, dtype):
    check_against_ref(geglu_triton, geglu_ref, [torch.randn(shape, device=DEV).to(dtype)], names=["h"])


@pytest.mark.gpu
def test_geglu_compile_triton_gpu():
    h = torch.randn(2, 77, 2048, device=DEV, dtype=torch.bfloat16)
    with crossflow_kernels.use_backend("triton"):
        torch.testing.assert_close(torch.compile(crossflow_kernels.geglu, fullgraph=True)(h), crossflow_kernels.geglu(h))
