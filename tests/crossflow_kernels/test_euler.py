"""euler_step / cfg_euler_step: forward, gradients, in-place `out=`, device-tensor scalars, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossflow_kernels
from crossflow_kernels.euler import cfg_euler_step_ref, cfg_euler_step_triton, euler_step_ref, euler_step_triton
from crossflow_kernels.testing import check_against_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(7,), (2, 4, 9, 9), (3, 77, 300), (1, 1152)]
DTYPES = [torch.float32, torch.float16]


def _scalar(val, as_tensor):
    return torch.tensor(val, device=DEV) if as_tensor else val


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_euler_step_fwd_bwd(shape, dtype, as_tensor):
    x, v = (torch.randn(shape, device=DEV, dtype=dtype) for _ in range(2))
    check_against_ref(euler_step_triton, euler_step_ref, [x, v], names=["x", "v"], dt=_scalar(0.02, as_tensor))


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cfg_euler_step_fwd_bwd(shape, dtype, as_tensor):
    x, vc, vu = (torch.randn(shape, device=DEV, dtype=dtype) for _ in range(3))
    check_against_ref(cfg_euler_step_triton, cfg_euler_step_ref, [x, vc, vu], names=["x", "v_cond", "v_uncond"],
                      dt=_scalar(0.02, as_tensor), guidance_scale=_scalar(7.0, as_tensor))


def test_cfg_euler_step_in_place_and_out():
    x, vc, vu = (torch.randn(3, 77, 33, device=DEV) for _ in range(3))
    expect = cfg_euler_step_ref(x, vc, vu, 0.1, 4.0)
    buf = torch.empty_like(x)
    assert cfg_euler_step_triton(x, vc, vu, 0.1, 4.0, out=buf) is buf
    torch.testing.assert_close(buf, expect)
    x_ptr = x.data_ptr()
    res = cfg_euler_step_triton(x, vc, vu, 0.1, 4.0, out=x)
    assert res is x and x.data_ptr() == x_ptr
    torch.testing.assert_close(x, expect)


def test_euler_noncontiguous_and_out_noncontiguous():
    x = torch.randn(33, 9, device=DEV).t()
    v = torch.randn(33, 9, device=DEV).t()
    torch.testing.assert_close(euler_step_triton(x, v, 0.5), x + 0.5 * v)
    expect = x + 0.5 * v
    euler_step_triton(x, v, 0.5, out=x)  # in place into a non-contiguous tensor
    torch.testing.assert_close(x, expect)


# `out` a shifted view of the buffer that holds x or a velocity: N spans several 1024-element programs, so a kernel
# that wrote in place would read values another program had already overwritten.
# (A negative shift happens to come out right under the sequential interpreter, not on a GPU.)
OVERLAPS = [(w, s, cfg) for w, s in [("x", 1), ("x", -1), ("x", 1029), ("v", 3), ("v", -2)] for cfg in (False, True)]
OVERLAPS += [("vu", 5, True)]


@pytest.mark.parametrize("which, shift, cfg", OVERLAPS, ids=str)
def test_euler_out_partly_overlapping_an_input(which, shift, cfg):
    n = 3001
    buf = torch.randn(n + abs(shift), device=DEV)
    lo, hi = (0, shift) if shift > 0 else (-shift, 0)
    shared, out = buf[lo:lo + n], buf[hi:hi + n]  # out starts `shift` elements after the shared input
    x, v, vu = (shared if which == name else torch.randn(n, device=DEV) for name in ("x", "v", "vu"))
    args = (x, v, vu, 0.25, 3.0) if cfg else (x, v, 0.25)
    ref_fn, fn = (cfg_euler_step_ref, cfg_euler_step_triton) if cfg else (euler_step_ref, euler_step_triton)
    expect_buf = buf.clone()
    expect = ref_fn(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    expect_buf[hi:hi + n] = expect
    assert fn(*args, out=out) is out
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(buf, expect_buf)  # nothing outside `out` was touched


def test_euler_out_exactly_aliasing_a_velocity():
    # The same view as v (not a shifted one) is safe to write in place, and must still be right.
    x, v = torch.randn(2, 1500, device=DEV), torch.randn(2, 1500, device=DEV)
    expect = x + 0.5 * v
    alias = v.view(2, 1500)
    assert euler_step_triton(x, v, 0.5, out=alias) is alias
    torch.testing.assert_close(v, expect)


def test_euler_device_scalars_are_read_at_run_time():
    # A captured graph keeps the same tensor; changing its value must change the result with no re-launch setup.
    x, v = torch.randn(5, 7, device=DEV), torch.randn(5, 7, device=DEV)
    dt = torch.tensor(0.1, device=DEV)
    a = euler_step_triton(x, v, dt)
    dt.fill_(0.3)
    b = euler_step_triton(x, v, dt)
    torch.testing.assert_close(a, x + 0.1 * v)
    torch.testing.assert_close(b, x + 0.3 * v)


def test_euler_empty():
    x = torch.empty(0, 4, device=DEV)
    assert euler_step_triton(x, x, 0.1).shape == (0, 4)
    assert cfg_euler_step_triton(x, x, x, 0.1, 2.0, out=x) is x


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=4), dt=st.floats(-1, 1), s=st.floats(0, 10))
def test_cfg_euler_random_shapes(shape, dt, s):
    x, vc, vu = (torch.randn(shape, device=DEV) for _ in range(3))
    torch.testing.assert_close(cfg_euler_step_triton(x, vc, vu, dt, s), cfg_euler_step_ref(x, vc, vu, dt, s))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_euler_bad_input(backend):
    x = torch.randn(2, 3)
    with crossflow_kernels.use_backend(backend):
        with pytest.raises(ValueError, match="`v` has shape"):
            crossflow_kernels.euler_step(x, torch.randn(3, 2), 0.1)
        with pytest.raises(ValueError, match="floating"):
            crossflow_kernels.euler_step(x, torch.ones(2, 3, dtype=torch.int64), 0.1)
        with pytest.raises(ValueError, match="dtype"):
            crossflow_kernels.euler_step(x, x.half(), 0.1)
        with pytest.raises(ValueError, match="0-d tensor"):
            crossflow_kernels.euler_step(x, x, torch.ones(2))
        with pytest.raises(ValueError, match="`guidance_scale` must be a Python float"):
            crossflow_kernels.cfg_euler_step(x, x, x, 0.1, "7")
        with pytest.raises(ValueError, match="`out` must match x"):
            crossflow_kernels.cfg_euler_step(x, x, x, 0.1, 7.0, out=torch.empty(3, 2))
        with pytest.raises(ValueError, match="device"):
            crossflow_kernels.cfg_euler_step(x, x, torch.randn(2, 3, device="meta"), 0.1, 7.0)


def test_euler_out_with_autograd_raises():
    x = torch.randn(2, 3, requires_grad=True)
    with crossflow_kernels.use_backend("triton"), pytest.raises(ValueError, match="out=.*autograd"):
        crossflow_kernels.euler_step(x, x.detach(), 0.1, out=torch.empty(2, 3))


@pytest.mark.gpu
def test_cfg_euler_bf16_large_gpu():
    x, vc, vu = (torch.randn(64, 4, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    check_against_ref(cfg_euler_step_triton, cfg_euler_step_ref, [x, vc, vu], names=["x", "v_cond", "v_uncond"],
                      dt=torch.tensor(0.02, device="cuda"), guidance_scale=7.0)
