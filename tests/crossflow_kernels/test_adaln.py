"""adaln_modulate and gated_residual_adaln (they share kernels): forward and every gradient against the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossflow_kernels
from crossflow_kernels import adaln
from crossflow_kernels.adaln import (
    AdaLNModulateFunction, GatedResidualAdaLNFunction, adaln_modulate_ref, adaln_modulate_triton,
    gated_residual_adaln_ref, gated_residual_adaln_triton,
)
from crossflow_kernels.testing import check_against_ref

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
# Odd, non-power-of-two channel counts (7, 300, 1152 = DiT-XL, 1280 = CrossFlow DiT-H) and ragged token counts; the
# interpreter is slow, so the CPU list keeps B*T small for the wide rows.
SHAPES = [(2, 7, 7), (1, 77, 64), (2, 33, 300), (1, 5, 1152), (2, 3, 1280), (3, 1, 64), (1, 257, 16)]
SHAPES_GPU = [(8, 1024, 1152), (4, 1024, 1280), (3, 77, 1000)]
DTYPES = [torch.float32, torch.float16]
NORMS = ["layer", "rms"]


def _vec(B, C, dtype, bcast):
    v = torch.randn(B, 1, C, device=DEV, dtype=dtype) if bcast else torch.randn(B, C, device=DEV, dtype=dtype)
    return v * 0.5


def _adaln_inputs(shape, dtype, bcast=False):
    B, T, C = shape
    x = (torch.randn(B, T, C, device=DEV) * 2 + 0.5).to(dtype)  # non-zero mean exercises the centring
    return [x, _vec(B, C, dtype, bcast), _vec(B, C, dtype, bcast)]


def _gated_inputs(shape, dtype, bcast=False):
    B, T, C = shape
    x = (torch.randn(B, T, C, device=DEV) * 2 + 0.5).to(dtype)
    y = torch.randn(B, T, C, device=DEV, dtype=dtype)
    return [x, y, _vec(B, C, dtype, bcast), _vec(B, C, dtype, bcast), _vec(B, C, dtype, bcast)]


ADALN_NAMES = ["x", "shift", "scale"]
GATED_NAMES = ["x", "y", "gate", "shift", "scale"]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_adaln_modulate_fwd_bwd(shape, dtype, norm):
    check_against_ref(adaln_modulate_triton, adaln_modulate_ref, _adaln_inputs(shape, dtype, bcast=shape[0] == 2),
                      names=ADALN_NAMES, norm=norm)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual_adaln_fwd_bwd(shape, dtype, norm):
    check_against_ref(gated_residual_adaln_triton, gated_residual_adaln_ref,
                      _gated_inputs(shape, dtype, bcast=shape[0] == 2), names=GATED_NAMES, norm=norm)


def test_adaln_noncontiguous():
    # x as a transposed view; shift/scale as chunks of one (B, 6C) modulation tensor, as a DiT block produces them.
    B, T, C = 2, 9, 33
    x = torch.randn(B, C, T, device=DEV).transpose(1, 2)
    mod = torch.randn(B, 6 * C, device=DEV)
    shift, scale = mod.chunk(6, dim=1)[1:3]
    assert not x.is_contiguous() and not shift.is_contiguous()
    check_against_ref(adaln_modulate_triton, adaln_modulate_ref, [x, shift, scale], names=ADALN_NAMES)
    y = torch.randn(B, C, T, device=DEV).transpose(1, 2)
    gate = mod.chunk(6, dim=1)[0]
    check_against_ref(gated_residual_adaln_triton, gated_residual_adaln_ref, [x, y, gate, shift, scale],
                      names=GATED_NAMES, norm="rms")


# Modulation vectors as the views a DiT block really passes, built inside the op call from one contiguous tensor `mod`
# so that they reach the kernels strided (check_against_ref clones its inputs, which would make a view contiguous)
# and the gradients flow back through the views into `mod`.
MOD_VIEWS = {
    "chunk": (lambda B, C: (B, 6 * C), lambda m, C: m.chunk(6, dim=1)[:3]),  # strides (6C, 1)
    "chunk3d": (lambda B, C: (B, 1, 6 * C), lambda m, C: m.chunk(6, dim=2)[3:]),  # (B, 1, C), strides (6C, 6C, 1)
    "interleaved": (lambda B, C: (B, C, 3), lambda m, C: m.unbind(2)),  # strides (3C, 3)
    "batch-broadcast": (lambda B, C: (1, 3 * C), lambda m, C: tuple(t.expand(2, C) for t in m.chunk(3, dim=1))),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", sorted(MOD_VIEWS))
def test_adaln_strided_modulation_views(layout, dtype):
    B, T, C = 2, 5, 77
    mod_shape, views = MOD_VIEWS[layout]
    x = (torch.randn(B, T, C, device=DEV) * 2 + 0.5).to(dtype)
    y = torch.randn(B, T, C, device=DEV, dtype=dtype)
    mod = (torch.randn(mod_shape(B, C), device=DEV) * 0.5).to(dtype)
    assert not any(v.is_contiguous() for v in views(mod, C))

    def gated(fn):
        return lambda x, y, mod, **k: fn(x, y, *views(mod, C), **k)

    def plain(fn):
        return lambda x, mod, **k: fn(x, *views(mod, C)[1:], **k)

    for norm in NORMS:
        check_against_ref(gated(gated_residual_adaln_triton), gated(gated_residual_adaln_ref), [x, y, mod],
                          names=["x", "y", "mod"], norm=norm)
        check_against_ref(plain(adaln_modulate_triton), plain(adaln_modulate_ref), [x, mod], names=["x", "mod"],
                          norm=norm)


def test_adaln_modulation_views_reach_the_kernels_uncopied(monkeypatch):
    # The (B, 6C) chunks are passed by pointer and strides, not copied by `.contiguous()`.
    B, T, C = 2, 3, 16
    mod = torch.randn(B, 6 * C, device=DEV, requires_grad=True)
    gate, shift, scale = mod.chunk(6, dim=1)[:3]
    seen = []
    for name in ("_launch_adaln_fwd", "_launch_adaln_bwd"):
        real = getattr(adaln, name)

        def spy(*a, _real=real, **k):
            seen.extend((t.data_ptr(), t.stride()) for t in a[2:5] if isinstance(t, torch.Tensor) and t.dim() == 2)
            return _real(*a, **k)

        monkeypatch.setattr(adaln, name, spy)
    x, y = torch.randn(B, T, C, device=DEV), torch.randn(B, T, C, device=DEV)
    r, out = gated_residual_adaln_triton(x, y, gate, shift, scale)
    (r.sum() + out.sum()).backward()
    ptrs = {gate.data_ptr(), shift.data_ptr(), scale.data_ptr()}
    assert seen and all(p in ptrs and st == (6 * C, 1) for p, st in seen), seen


def test_adaln_identity_properties():
    # scale = shift = 0: plain LayerNorm / RMSNorm; gate = 0: r is x.
    x = torch.randn(2, 7, 300, device=DEV) * 3 + 1
    z = torch.zeros(2, 300, device=DEV)
    out = adaln_modulate_triton(x, z, z)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (300,), eps=1e-6), atol=1e-5, rtol=1e-5)
    r, out2 = gated_residual_adaln_triton(x, torch.randn_like(x), z, z, z, norm="rms")
    torch.testing.assert_close(r, x)
    torch.testing.assert_close(out2, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8)], ids=str)
def test_adaln_empty(shape):
    x, shift, scale = _adaln_inputs(shape, torch.float32)
    assert adaln_modulate_triton(x, shift, scale).shape == shape
    y, gate = torch.randn(shape, device=DEV), torch.randn(shape[0], shape[2], device=DEV)
    r, out = gated_residual_adaln_triton(x, y, gate, shift, scale)
    assert r.shape == out.shape == shape


@pytest.mark.parametrize("fast_mode", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["fast", "full"])
def test_adaln_gradcheck(fast_mode):
    # fast_mode compares one random projection v'Ju of the Jacobians (the quick loop); the element-wise check (slow in
    # the interpreter) also catches a gradient off by a few per cent, which a projection can miss.
    # fp64 leaves through the autograd Functions (the kernels compute in fp32, hence the loose tolerances).
    B, T, C = 2, 3, 5
    args = [torch.randn(B, T, C, dtype=torch.float64, device=DEV, requires_grad=True),
            torch.randn(B, C, dtype=torch.float64, device=DEV, requires_grad=True),
            torch.randn(B, C, dtype=torch.float64, device=DEV, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda *a: AdaLNModulateFunction.apply(*a, 1e-6, "layer"), args,
                                    eps=1e-3, atol=2e-3, rtol=2e-3, fast_mode=fast_mode)
    y = torch.randn(B, T, C, dtype=torch.float64, device=DEV, requires_grad=True)
    gate = torch.randn(B, C, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, g, sh, sc: GatedResidualAdaLNFunction.apply(x, y, g, sh, sc, 1e-6,
                                                                                              "rms"),
                                    [args[0], y, gate, args[1], args[2]], eps=1e-3, atol=2e-3, rtol=2e-3,
                                    fast_mode=fast_mode)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 19), C=st.integers(1, 160), norm=st.sampled_from(NORMS),
       gated=st.booleans())
def test_adaln_random_shapes(B, T, C, norm, gated):
    if gated:
        check_against_ref(gated_residual_adaln_triton, gated_residual_adaln_ref, _gated_inputs((B, T, C),
                          torch.float32), names=GATED_NAMES, norm=norm)
    else:
        check_against_ref(adaln_modulate_triton, adaln_modulate_ref, _adaln_inputs((B, T, C), torch.float32),
                          names=ADALN_NAMES, norm=norm)


BAD = [
    (lambda: (torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)), r"x must be \(B, T, C\)"),
    (lambda: (torch.randn(2, 3, 8), torch.randn(2, 7), torch.randn(2, 8)), r"`shift` must be \(B, C\)"),
    (lambda: (torch.randn(2, 3, 8), torch.randn(3, 8), torch.randn(3, 8)), r"`shift` must be \(B, C\)"),
    (lambda: (torch.randn(2, 3, 8), torch.randn(2, 2, 8), torch.randn(2, 8)), r"`shift` must be \(B, C\)"),
    (lambda: (torch.ones(2, 3, 8, dtype=torch.int32), torch.randn(2, 8), torch.randn(2, 8)), "floating"),
    (lambda: (torch.randn(2, 3, 8), torch.randn(2, 8, dtype=torch.float16), torch.randn(2, 8)), "dtype"),
    (lambda: (torch.randn(2, 3, 8), torch.randn(2, 8, device="meta"), torch.randn(2, 8)), "device"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("make, match", BAD)
def test_adaln_bad_input(make, match, backend):
    x, shift, scale = make()
    with crossflow_kernels.use_backend(backend), pytest.raises(ValueError, match=match):
        crossflow_kernels.adaln_modulate(x, shift, scale)
    y = torch.randn(x.shape) if x.dim() == 3 else x
    with crossflow_kernels.use_backend(backend), pytest.raises(ValueError, match=match.replace("shift", "gate")):
        crossflow_kernels.gated_residual_adaln(x, y, shift, shift, scale)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adaln_bad_options(backend):
    x, s = torch.randn(1, 2, 8), torch.randn(1, 8)
    with crossflow_kernels.use_backend(backend):
        with pytest.raises(ValueError, match="norm must be one of"):
            crossflow_kernels.adaln_modulate(x, s, s, norm="batch")
        with pytest.raises(ValueError, match="eps must be a positive"):
            crossflow_kernels.adaln_modulate(x, s, s, eps=0.0)
        with pytest.raises(ValueError, match="`y` must have x's shape"):
            crossflow_kernels.gated_residual_adaln(x, torch.randn(1, 3, 8), s, s, s)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("eps", [True, False, "1e-6", torch.tensor(1e-6), None, float("nan"), float("inf"), -1e-6],
                         ids=repr)
def test_adaln_eps_must_be_a_positive_float(eps, backend):
    # eps=True used to pass as 1.0; a bool is never an epsilon.
    x, s = torch.randn(1, 2, 8), torch.randn(1, 8)
    with crossflow_kernels.use_backend(backend):
        with pytest.raises(ValueError, match="eps must be a positive float"):
            crossflow_kernels.adaln_modulate(x, s, s, eps=eps)
        with pytest.raises(ValueError, match="eps must be a positive float"):
            crossflow_kernels.gated_residual_adaln(x, x, s, s, s, eps=eps)


def test_adaln_integer_eps_is_accepted():
    x, s = torch.randn(1, 2, 8), torch.randn(1, 8)
    torch.testing.assert_close(adaln_modulate_triton(x, s, s, eps=1), adaln_modulate_ref(x, s, s, eps=1.0))


# ---------------------------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES_GPU, ids=str)
def test_adaln_gpu_large(shape, dtype, norm):
    check_against_ref(adaln_modulate_triton, adaln_modulate_ref, _adaln_inputs(shape, dtype), names=ADALN_NAMES,
                      norm=norm, atol=1e-4, rtol=1e-4)
    check_against_ref(gated_residual_adaln_triton, gated_residual_adaln_ref, _gated_inputs(shape, dtype),
                      names=GATED_NAMES, norm=norm, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_adaln_compile_triton_gpu():
    x, shift, scale = _adaln_inputs((2, 77, 1152), torch.bfloat16)
    y, gate = torch.randn_like(x), torch.randn_like(shift)

    def block(x, y, gate, shift, scale):
        r, h = crossflow_kernels.gated_residual_adaln(x, y, gate, shift, scale)
        return crossflow_kernels.adaln_modulate(r + h, shift, scale)

    with crossflow_kernels.use_backend("triton"):
        eager = block(x, y, gate, shift, scale)
        compiled = torch.compile(block, fullgraph=True)(x, y, gate, shift, scale)
    torch.testing.assert_close(compiled, eager)
