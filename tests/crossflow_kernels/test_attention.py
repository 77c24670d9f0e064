"""Attention: Triton forward and backward against the torch reference (crossflow_kernels/attention.py).

On CPU the kernels run in the Triton interpreter (tests/conftest.py), so the shape set is a covering set, not a cross
product: every Tq and Tk in {1, 7, 77, 257} (Tq != Tk included), every head dim the models use (one part: 1/16/24/
32/64/128/256; two parts: 40, 48, 72, 80, 96), both dtypes, masks, the model's strided layouts.
"""

import math
import sys

import pytest
import torch
import triton

import crossflow_kernels
from crossflow_kernels.attention import (
    _attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel, _attention_fwd_kernel, _prepare, _stride_unit, attention_ref,
    attention_triton, lengths_mask,
)
from crossflow_kernels import attention_tuning as tuning
from crossflow_kernels.attention_tuning import _split_head_dim
from crossflow_kernels.testing import assert_close_to_ref

attn_mod = sys.modules["crossflow_kernels.attention"]  # `crossflow_kernels.attention` itself is the op, not this module

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# fp32: the kernel and the reference round differently (blocked online softmax vs one softmax, fp32 dots summed in
# another order) over Tk <= 257 keys and D <= 256 lanes. The measured worst is ~1e-5 absolute (dv summing 77 rows),
# under 10% of this budget, while any real bug (a wrong mask, scale or padded lane) is O(1e-1).
TOL32 = dict(atol=5e-5, rtol=5e-5)

# (B, H, Tq, Tk, D, dtype, masked). Masked cases with B > 1 also fully mask the last batch row.
CASES = [
    (2, 2, 7, 7, 16, F32, False),
    (2, 2, 77, 77, 24, F16, True),
    (2, 1, 1, 7, 32, F32, True),
    (1, 2, 7, 77, 48, F16, False),
    (2, 2, 77, 1, 64, F32, False),
    (2, 2, 257, 77, 72, F32, True),
    (1, 2, 77, 257, 72, F16, True),
    (1, 1, 7, 257, 80, F32, True),
    (2, 1, 1, 77, 96, F16, False),
    (1, 1, 257, 257, 128, F32, False),
    (1, 1, 257, 7, 128, F16, True),
    (2, 2, 257, 257, 64, F16, True),
    (1, 2, 1, 257, 16, F16, True),
    (2, 1, 257, 7, 96, F32, True),
    (1, 1, 1, 1, 48, F32, False),
    (2, 2, 77, 7, 40, F16, True),  # 32 + 16 lanes
    (2, 1, 7, 77, 40, F32, True),
    (2, 1, 7, 77, 1, F32, True),  # smallest head dim (padded to 16 lanes)
    (1, 1, 7, 77, 256, F32, False),  # largest head dim
]
GPU_CASES = [
    (2, 4, 257, 77, 72, BF16, True),
    (2, 4, 77, 77, 48, BF16, True),
    (1, 2, 1000, 1000, 72, F16, True),
    (1, 2, 1000, 1000, 72, BF16, False),
    (2, 2, 1000, 257, 72, F32, True),
    (1, 2, 300, 300, 256, BF16, True),
    (1, 2, 300, 300, 256, F32, False),
]


def _case_id(c):
    b, h, tq, tk, d, dtype, masked = c
    return f"{b}x{h}-q{tq}-k{tk}-d{d}-{str(dtype)[6:]}" + ("-mask" if masked else "")


def _mask(b, tk, device):
    mask = torch.rand(b, tk, device=device) > 0.3
    if b > 1:
        mask[-1] = False  # one batch row with no key at all
    return mask


def _grads(fn, tensors, dtype, do, scale, mask, lengths=None):
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    extra = {} if lengths is None else dict(key_lengths=lengths)
    out = fn(*leaves, scale=scale, key_padding_mask=mask, **extra)
    return (out, *torch.autograd.grad(out, leaves, do.to(dtype)))


def _check_against_ref(q, k, v, do, scale=None, mask=None, lengths=None):
    """Forward and dq, dk, dv of the Triton op vs the fp32 reference (and the same-dtype reference for fp16/bf16)."""
    dtype = q.dtype
    got = _grads(attention_triton, (q, k, v), dtype, do, scale, mask, lengths)
    ref32 = _grads(lambda *a, **kw: attention_ref(*a, **kw, upcast=True), (q, k, v), F32, do, scale, mask, lengths)
    lowp = _grads(attention_ref, (q, k, v), dtype, do, scale, mask, lengths) if dtype != F32 else (None,) * 4
    tol = TOL32 if dtype == F32 else {}
    for name, g, r, rl in zip(("out", "dq", "dk", "dv"), got, ref32, lowp):
        assert g.dtype == dtype and g.shape == r.shape
        assert_close_to_ref(g, r, rl, name=name, **tol)
    return got


def _run_case(case, device):
    b, h, tq, tk, d, dtype, masked = case
    q = torch.randn(b, h, tq, d, device=device, dtype=dtype)
    k = torch.randn(b, h, tk, d, device=device, dtype=dtype)
    v = torch.randn(b, h, tk, d, device=device, dtype=dtype)
    do = torch.randn(b, h, tq, d, device=device, dtype=dtype)
    mask = _mask(b, tk, device) if masked else None
    out, dq, dk, dv = _check_against_ref(q, k, v, do, mask=mask)
    if masked and b > 1:  # the fully masked batch row: exact zeros, no NaN, no gradient
        for t in (out[-1], dq[-1], dk[-1], dv[-1]):
            assert torch.equal(t, torch.zeros_like(t))


@pytest.fixture(params=["portable", "sm90"])
def fwd_kernel(request, monkeypatch):
    """Run the test with each forward kernel forced (`CROSSFLOW_KERNELS_ATTENTION_FWD`): the interpreter runs the sm_90
    one's tensor descriptors and warp-specialized loop too. On a GPU the sm_90 kernel needs capability 9.x or 10.x."""
    return _force_fwd(request.param, monkeypatch)


def _force_fwd(which, monkeypatch):
    if which == "sm90" and torch.cuda.is_available() and not tuning._sm90_kernel_arch(
            torch.cuda.get_device_capability()):
        pytest.skip("the sm_90 forward runs on GPUs of capability 9.x and 10.x")
    monkeypatch.setenv(attn_mod.FWD_KERNEL_ENV, which)
    return which


# (forward, backward) kernels forced: each backward path after the portable forward (fp32 and fp16 cases alike), and
# the sm_90 forward (16-bit only) with the default, fused backward: three runs of a table where four would repeat one.
KERNEL_PATHS = [("portable", "fused"), ("portable", "split"), ("sm90", "fused")]


@pytest.fixture(params=KERNEL_PATHS, ids=["-".join(p) for p in KERNEL_PATHS])
def kernel_paths(request, monkeypatch):
    """(forward, backward) kernels forced through `CROSSFLOW_KERNELS_ATTENTION_FWD` / `CROSSFLOW_KERNELS_ATTENTION_BWD`."""
    fwd, bwd = request.param
    _force_fwd(fwd, monkeypatch)
    monkeypatch.setenv(attn_mod.BWD_KERNEL_ENV, bwd)
    return fwd, bwd


def _expect_kernel(fwd_kernel, dtype, d):
    # The sm_90 kernel takes 16-bit inputs whose rows start on 16-byte boundaries, head dims up to 128; others run the
    # portable kernel.
    sm90 = fwd_kernel == "sm90" and dtype in (F16, BF16) and d * 2 % 16 == 0 and d <= 128
    return "sm90" if sm90 else "portable"


def _launch_counts():
    return dict(attn_mod.fwd_kernel_launches), dict(attn_mod.bwd_kernel_launches)


def _assert_ran(before, fwd, bwd):
    """The forced forward kernel and backward path ran since `before` (`_launch_counts()`), the other path did not."""
    fwd_n, bwd_n = _launch_counts()
    assert fwd_n.get(fwd, 0) > before[0].get(fwd, 0), f"the {fwd} forward did not run"
    assert bwd_n.get(bwd, 0) > before[1].get(bwd, 0), f"the {bwd} backward did not run"
    other = {"fused": "split", "split": "fused"}[bwd]
    assert bwd_n.get(other, 0) == before[1].get(other, 0), f"the {other} backward ran"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_attention_fwd_bwd(case, device, kernel_paths):
    fwd_kernel, bwd_kernel = kernel_paths
    if fwd_kernel == "sm90" and case[5] == F32:  # the sm_90 kernel is for 16-bit inputs: run fp32 shapes in fp16
        case = (*case[:5], F16, case[6])
    before = _launch_counts()
    _run_case(case, device)
    _assert_ran(before, _expect_kernel(fwd_kernel, case[5], case[4]), bwd_kernel)


def test_attention_bwd_kernel_choice(monkeypatch):
    pick = attn_mod._bwd_kernel_for
    q = torch.empty(1, 1, 1, 72)
    monkeypatch.delenv(attn_mod.BWD_KERNEL_ENV, raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert pick(q) == "fused"  # the default
        for want in ("fused", "split"):
            monkeypatch.setenv(attn_mod.BWD_KERNEL_ENV, want)
            assert pick(q) == want
        torch.use_deterministic_algorithms(True)
        for want in ("auto", "fused", "split"):  # reproducible gradients were asked for: the split pair, always
            monkeypatch.setenv(attn_mod.BWD_KERNEL_ENV, want)
            assert pick(q) == "split"
    finally:
        torch.use_deterministic_algorithms(deterministic)
    monkeypatch.setenv(attn_mod.BWD_KERNEL_ENV, "atomic")
    q = torch.randn(1, 1, 3, 16, requires_grad=True)
    with pytest.raises(ValueError, match="CROSSFLOW_KERNELS_ATTENTION_BWD"):
        attention_triton(q, q, q).sum().backward()


def test_attention_fused_starved_corner():
    # auto keeps the split pair on pre-sm_90 GPUs at 64+16 / 64+32 lanes, where the fused kernel's prune leaves only
    # 16-query tiles; everywhere else (and on sm_90 always) the fused kernel runs.
    starved = tuning._fused_starved
    assert starved(72, 80) and starved(80, 86) and starved(96, 80)
    assert not any(starved(d, 90) for d in (24, 48, 64, 72, 80, 96, 128))
    assert not any(starved(d, 80) for d in (24, 48, 64, 128))
    for d in (72, 96):  # the measured prune agrees: sm_80 keeps only 16-query tiles there, sm_90 64x64 ones
        d0, d1 = _split_head_dim(d)
        args = dict(D0=d0, D1=d1, HAS_MASK=True, DOT_PRECISION="tf32")
        configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                   for bm, bn, w, s in tuning._FUSED_TILES]
        assert {c.kwargs["BLOCK_M"] for c in tuning._prune_for("fused", configs, args, 80)} == {16}
        assert {c.kwargs["BLOCK_M"] for c in tuning._prune_for("fused", configs, args, 90)} == {64}


def test_attention_deterministic_selects_split(device, monkeypatch):
    # torch.use_deterministic_algorithms(True) takes the split pair (no atomics: every gradient written by one
    # program), even with the fused path asked for, and two backward passes agree bit for bit.
    monkeypatch.setenv(attn_mod.BWD_KERNEL_ENV, "fused")
    monkeypatch.setenv(attn_mod.FWD_KERNEL_ENV, "portable")  # any forward; this one runs everywhere
    q, k, v, do = (torch.randn(2, 2, n, 72, device=device, dtype=F16) for n in (77, 33, 33, 77))
    mask = _mask(2, 33, device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    before = _launch_counts()
    try:
        torch.use_deterministic_algorithms(True)
        first = _grads(attention_triton, (q, k, v), F16, do, None, mask)
        second = _grads(attention_triton, (q, k, v), F16, do, None, mask)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    _assert_ran(before, "portable", "split")
    assert attn_mod.bwd_kernel_launches["split"] - before[1].get("split", 0) == 2
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), name
    # ...and they are the split path's gradients, which agree with the fused path's within fp16 rounding.
    before = _launch_counts()
    fused = _grads(attention_triton, (q, k, v), F16, do, None, mask)
    _assert_ran(before, "portable", "fused")
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, fused):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=name)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_sm90_prune(masked):
    # Tiles that fit sm_90's shared memory at every head dim the sm_90 forward takes; with a mask none with 128 keys
    # (Triton's warp specialization fails to compile it). Compiled spill-free: the compile report's check.
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
               for bm, bn, w, s in tuning._FWD_SM90_TILES]
    for d in (24, 48, 64, 72, 80, 96, 128):
        d0, d1 = _split_head_dim(d)
        kept = tuning._prune_sm90_for(configs, dict(D0=d0, D1=d1, HAS_MASK=masked), 90)
        assert kept and all(c.kwargs["BLOCK_M"] >= 64 for c in kept)
        assert any(c.kwargs["BLOCK_N"] == 128 for c in kept) != masked


def test_attention_fwd_kernel_choice(monkeypatch):
    q = torch.randn(2, 3, 7, 72, dtype=F16)
    o = torch.empty(2, 7, 3, 72, dtype=F16).transpose(1, 2)
    pick = attn_mod._fwd_kernel_for
    monkeypatch.delenv(attn_mod.FWD_KERNEL_ENV, raising=False)
    assert pick(q, q, q, o) == "portable"  # auto: no CUDA device of capability 9.x / 10.x here
    monkeypatch.setenv(attn_mod.FWD_KERNEL_ENV, "sm90")
    assert pick(q, q, q, o) == "sm90"
    assert pick(q.float(), q.float(), q.float(), o.float()) == "portable"  # fp32: FMA dots, no sm_90 kernel
    odd = torch.randn(2, 3, 7, 20, dtype=F16)  # 40-byte rows: no descriptor can read them
    assert pick(odd, odd, odd, odd) == "portable"
    shifted = torch.randn(2 * 3 * 7 * 72 + 1, dtype=F16)[1:].view(2, 3, 7, 72)  # base off the 16-byte grid
    assert pick(shifted, q, q, o) == "portable"
    wide = torch.randn(2, 3, 7, 256, dtype=F16)  # past the head dims the compile report checks for this kernel
    assert pick(wide, wide, wide, wide) == "portable"
    monkeypatch.setenv(attn_mod.FWD_KERNEL_ENV, "portable")
    assert pick(q, q, q, o) == "portable"
    monkeypatch.setenv(attn_mod.FWD_KERNEL_ENV, "tma")
    with pytest.raises(ValueError, match="CROSSFLOW_KERNELS_ATTENTION_FWD"):
        attention_triton(q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_attention_fwd_bwd_gpu(case, device):
    _run_case(case, device)


def test_attention_scale_and_layout(device):
    q, k, v, do = (torch.randn(2, 3, n, 24, device=device) for n in (7, 77, 77, 7))
    out = _check_against_ref(q, k, v, do, scale=0.3)[0]
    # The output is (B, Tq, H, D) memory, so merging heads into (B, Tq, H*D) is a free view.
    assert out.transpose(1, 2).is_contiguous()
    # out.sum().backward() hands the backward an expanded dO (all strides 0).
    _check_against_ref(q, k, v, torch.ones(1, device=device).expand_as(do))


@pytest.mark.parametrize("dtype", [F32, F16])
def test_attention_noncontiguous(dtype, device):
    # q, k, v as the model makes them: permuted views of one fused (B, T, 3, H, D) projection; dO strided too.
    b, t, h, d = 2, 77, 2, 48
    qkv = torch.randn(b, t, 3, h, d, device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous() and q.stride(-1) == 1
    do = torch.randn(b, h, t, 2 * d, device=device, dtype=dtype)[..., ::2]  # last-dim stride 2: copied, still right
    mask = _mask(b, 2 * t, device)[:, ::2]  # a strided mask is read through its strides too
    _check_against_ref(q, k, v, do, mask=mask)
    do = torch.randn(b, t, h, d, device=device, dtype=dtype).transpose(1, 2)  # permuted dO: read through strides
    _check_against_ref(q, k, v, do)
    leaf = qkv.clone().requires_grad_()
    out = attention_triton(*leaf.permute(2, 0, 3, 1, 4).unbind(0))
    out.backward(do)
    assert leaf.grad.shape == qkv.shape and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize(
    "b, h, tq, tk", [(0, 2, 7, 7), (2, 0, 7, 7), (2, 2, 0, 7), (2, 2, 7, 0), (2, 2, 0, 0)], ids=str
)
def test_attention_empty(b, h, tq, tk, device):
    q = torch.randn(b, h, tq, 32, device=device, requires_grad=True)
    k = torch.randn(b, h, tk, 32, device=device, requires_grad=True)
    v = torch.randn(b, h, tk, 32, device=device, requires_grad=True)
    mask = torch.ones(b, tk, dtype=torch.bool, device=device)
    out = attention_triton(q, k, v, key_padding_mask=mask)
    assert out.shape == (b, h, tq, 32)
    assert torch.equal(out, torch.zeros_like(out))  # no keys -> zeros (and trivially so when empty)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("fast_mode", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["fast", "full"])
def test_attention_gradcheck(device, fast_mode):
    # fast_mode compares one random projection v'Ju of the Jacobians (the quick loop); the element-wise check (slow in
    # the interpreter) also catches a gradient off by a few per cent, which a projection can miss.
    # fp64 is not a kernel dtype, so gradcheck sees fp64 leaves that are cast to fp32 around the kernel. Finite
    # differences of an fp32 function resolve only ~1e-7 / eps, hence eps=1e-3 with atol=1e-3, rtol=1e-2.
    q = torch.randn(2, 1, 3, 5, device=device, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]], device=device)

    def fn(q, k, v):
        return attention_triton(q.float(), k.float(), v.float(), key_padding_mask=mask).double()

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-3, atol=1e-3, rtol=1e-2, fast_mode=fast_mode)


@pytest.mark.parametrize("layout", ["bthd", "qkv"])
@pytest.mark.parametrize("d, dtype", [(72, F16), (40, F32), (20, F16)], ids=["d72-f16", "d40-f32", "d20-f16"])
def test_attention_strided_layouts(layout, d, dtype, device, kernel_paths):
    # The layouts the model passes, read in place: (B, T, H, D) transposed (Text VE) and the fused (B, T, 3, H, D) qkv
    # projection unbound (DiT). D = 20 in fp16 (40-byte rows) cannot be 16-byte aligned: the unaligned path.
    b, t, h = 2, 77, 3
    if layout == "bthd":
        q, k, v = (torch.randn(b, t, h, d, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = torch.randn(b, t, 3, h, d, device=device, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    for x in (q, k, v):
        assert _prepare(x) is x  # no copy
    do = torch.randn(b, t, h, d, device=device, dtype=dtype).transpose(1, 2)
    before = _launch_counts()
    _check_against_ref(q, k, v, do, mask=_mask(b, t, device))
    _assert_ran(before, _expect_kernel(kernel_paths[0], dtype, d), kernel_paths[1])


def test_attention_stride_unit():
    # Row/head strides reach the kernels in 16-byte units whenever every stride allows it: that is what lets Triton
    # prove row alignment (16-byte loads, cp.async) at D = 24 and 72, whose rows are not 16 elements apart.
    for d, dtype in ((72, F16), (24, BF16), (72, F32), (64, F16)):
        qkv = torch.empty(2, 5, 3, 4, d, dtype=dtype)
        q = qkv.permute(2, 0, 3, 1, 4)[0]
        bthd = torch.empty(2, 5, 4, d, dtype=dtype).transpose(1, 2)
        assert _stride_unit(q, bthd) == 16 // q.element_size()
    assert _stride_unit(torch.empty(2, 4, 5, 20, dtype=F16)) == 1  # 40-byte rows
    # A size-1 dim's stride is never used, so it does not spoil alignment.
    assert _stride_unit(torch.empty(1, 4, 5, 72, dtype=F16).as_strided((1, 4, 5, 72), (3, 360, 72, 1))) == 8
    # A truly unaligned view (rows 16 bytes apart, but starting 2 bytes in) is copied to fresh aligned storage.
    base = torch.randn(2 * 3 * 5 * 72 + 1, dtype=F16)
    off = base[1:].view(2, 3, 5, 72)
    fixed = _prepare(off)
    assert fixed.data_ptr() != off.data_ptr() and fixed.storage_offset() == 0 and torch.equal(fixed, off)


def test_attention_head_dim_split():
    # Non-power-of-two head dims run as two power-of-two parts: at most 1/8 padding for the DiT head dims.
    assert _split_head_dim(72) == (64, 16)
    assert _split_head_dim(96) == (64, 32)
    assert _split_head_dim(64) == (64, 0)
    for d in (72, 80, 96, 48):
        assert sum(_split_head_dim(d)) <= d * 9 / 8
    for d in range(1, 257):
        d0, d1 = _split_head_dim(d)
        assert d0 + d1 >= d and d0 + d1 <= max(16, triton.next_power_of_2(d))


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq", "fused"])
def test_attention_prune(kind, monkeypatch):
    # 16-bit on sm_90: only tiles whose dots can be wgmma (M side >= 64) at the DiT head dims; fp32 (any target):
    # only its own small FMA tiles. (That the kept tiles compile spill-free is the compile report's check.)
    for d in (24, 48, 64, 72, 80, 96, 128):
        d0, d1 = _split_head_dim(d)
        args = dict(D0=d0, D1=d1)
        kept = _kept_tiles(kind, dict(args, DOT_PRECISION="tf32"), 90, monkeypatch)
        assert kept and all(_mma_m(kind, bm, bn) >= 64 for bm, bn, _, _ in kept)
        assert not kept & set(tuning._FP32_TILES[kind])
        for arch in (90, 80, None):
            kept32 = _kept_tiles(kind, dict(args, DOT_PRECISION="ieee"), arch, monkeypatch)
            assert kept32 and kept32 <= set(tuning._FP32_TILES[kind])


def _mma_m(kind, bm, bn):
    # The M side of a kernel's dots (wgmma needs 64): keys for dK/dV, queries for the forward and dQ, both for fused.
    return {"dkdv": bn, "fused": min(bm, bn)}.get(kind, bm)


class _FakeTarget:
    """Stands in for Triton's active driver: reports a CUDA target arch (the prune reads nothing else)."""

    def __init__(self, arch):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)


def _kept_tiles(kind, args, arch, monkeypatch):
    """Tiles the autotune prune keeps with `arch` as Triton's active target (None: no driver, as in the interpreter)."""
    tiles = {"fwd": tuning._FWD_TILES, "dkdv": tuning._DKDV_TILES, "dq": tuning._DQ_TILES,
             "fused": tuning._FUSED_TILES}[kind]
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
               for bm, bn, w, s in [*tiles, *tuning._FP32_TILES[kind]]]
    with monkeypatch.context() as mp:
        mp.setattr(triton.runtime.driver, "_active", _FakeTarget(arch) if arch else None)
        if arch is None:  # the interpreter's state: no active driver at all
            mp.setattr(type(triton.runtime.driver), "default", property(lambda self: (_ for _ in ()).throw(
                RuntimeError("0 active drivers"))))
        kept = tuning._prune(kind)(configs, args)
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}


_KERNEL_KIND = {"_attention_fwd_kernel": "fwd", "_attention_bwd_dkdv_kernel": "dkdv", "_attention_bwd_dq_kernel": "dq",
                "_attention_bwd_fused_kernel": "fused"}


# Committed compile reports that measured spills: triton 3.9's full matrix before the prune was arch-aware, triton
# 3.6's masked attention subset (its ptxas 12.8 spills a few configs 3.9's does not), and every candidate tile of the
# fused backward compiled unpruned (both versions).
_SPILL_REPORTS = ("2026-12-01_compile-report_triton-3.9.0.json",
                  "2026-12-02_compile-report_triton-3.6.0_attention-masked-subset.json",
                  "2026-12-02_compile-report_triton-3.6.0_pre-fix.json",
                  "2026-12-02_compile-report_fused-bwd-tiles_triton-3.9.0+3.6.0.json",
                  # sm_100 / sm_120 and T = 257 (d72 / d128, 16-bit, masked fused qkv), before their exclusions:
                  "2026-12-06_compile-report_triton-3.9.0_attention-sm100-sm120-t257_pre-fix.json",
                  "2026-12-06_compile-report_triton-3.6.0_attention-sm100-sm120-t257_pre-fix.json",
                  # the Text VE's attention at T = 77 (masked (B, T, H, D) views, 16-bit), before its exclusions:
                  "2026-12-06_compile-report_triton-3.9.0_attention-t77_pre-fix.json",
                  "2026-12-06_compile-report_triton-3.6.0_attention-t77_pre-fix.json",
                  # key lengths (the KEY_LENS kernels), T = 77 and 257, before their exclusions:
                  "2026-12-06_compile-report_triton-3.9.0_attention-lens_pre-fix.json",
                  "2026-12-06_compile-report_triton-3.6.0_attention-lens_pre-fix.json",
                  "2026-12-06_compile-report_triton-3.6.0_attention-lens_pre-fix-2.json")


def _spill_rows():
    import json
    from pathlib import Path
    results = Path(__file__).resolve().parents[2] / "benchmarks/results"
    return [r for name in _SPILL_REPORTS for r in json.loads((results / name).read_text())["rows"]
            if not r.get("error") and r.get("spill_store_bytes")]


def test_attention_delta_rows_avoid_measured_spills():
    # The delta kernel is not autotuned: the launcher's rows per program (`_delta_block_m`) at each padded head dim
    # must differ from every row count that spilled in a committed report (64 rows x 64 lanes on sm_100, T = 77).
    spilled = {(r["constexprs"]["D0"] + r["constexprs"]["D1"], r["constexprs"]["BLOCK_M"]) for r in _spill_rows()
               if r["kernel"].startswith("_attention_bwd_delta_kernel")}
    assert (64, 64) in spilled
    for lanes, block_m in spilled:
        assert tuning._delta_block_m(lanes) != block_m, (lanes, block_m)


def _measured_spills():
    """(arch, kind, prune args, tile) of every attention config that spilled in a committed report (_SPILL_REPORTS)."""
    import json
    from pathlib import Path
    results = Path(__file__).resolve().parents[2] / "benchmarks/results"
    rows = [r for name in _SPILL_REPORTS for r in json.loads((results / name).read_text())["rows"]]
    out = []
    for r in rows:
        if r.get("error") or not r.get("spill_store_bytes") or r["kernel"] not in _KERNEL_KIND:
            continue
        ce, c = r["constexprs"], r["config"]
        args = {k: ce[k] for k in ("D0", "D1", "HAS_MASK", "DOT_PRECISION")}
        args["KEY_LENS"] = ce.get("KEY_LENS", False)
        out.append((r["arch"], _KERNEL_KIND[r["kernel"]], args, (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"],
                                                                   c["num_stages"])))
    return out


def test_attention_prune_drops_measured_spillers_per_arch(monkeypatch):
    # Every config that spilled for an arch is gone from that arch's prune and from the unknown-target (strictest)
    # prune; the measured list is not empty (34 + 4 + 7 sm_80 configs and one sm_90 fp32 one; 243 fused rows).
    spills = _measured_spills()
    assert {a for a, *_ in spills} == {80, 90, 100, 120} and len(spills) >= 45 + 240 + 30
    for arch, kind, args, tile in spills:
        for target in (arch, None):
            assert tile not in _kept_tiles(kind, args, target, monkeypatch), (target, kind, args, tile)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("d", [48, 64, 72, 96, 128])
def test_attention_prune_keeps_wgmma_tiles_on_sm90(d, masked, monkeypatch):
    # sm_80's exclusions must not cost sm_90 its wgmma tiles (an M side of >= 64 rows: BLOCK_N for dK/dV, BLOCK_M
    # else): masked d64 dK/dV once lost them all when the sm_80 spillers were dropped for both archs.
    d0, d1 = _split_head_dim(d)
    args = dict(D0=d0, D1=d1, HAS_MASK=masked, DOT_PRECISION="tf32")
    for kind in ("fwd", "dkdv", "dq", "fused"):
        kept90 = _kept_tiles(kind, args, 90, monkeypatch)
        assert kept90 and all(_mma_m(kind, bm, bn) >= 64 for bm, bn, _, _ in kept90), (kind, kept90)
        if kind == "dkdv" and d == 64 and masked:
            assert not kept90 <= _kept_tiles(kind, args, 80, monkeypatch)  # sm_90 keeps tiles sm_80 drops


def test_attention_autotune_key_has_grid_bucket():
    # A batch-16 launch must not reuse the tiles tuned for batch 1: B*H is part of every tuning key.
    for kern in (_attention_fwd_kernel, attn_mod._attention_fwd_sm90_kernel, _attention_bwd_dkdv_kernel,
                 _attention_bwd_dq_kernel, attn_mod._attention_bwd_fused_kernel):
        assert "BH_BUCKET" in kern.keys


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_attention_masked_keys_hold_nan_inf(bad, dtype, device, kernel_paths):
    # Fuzz find: a NaN/Inf in a key or value that the padding mask excludes used to turn the whole batch row to NaN.
    # Masked keys must not contribute, whatever they hold: both backends give the result of zeros in those slots.
    b, h, tq, tk, d = 2, 2, 7, 77, 72
    q, k, v, do = (torch.randn(b, h, n, d, device=device, dtype=dtype) for n in (tq, tk, tk, tq))
    mask = _mask(b, tk, device)
    mask[0, 5] = False  # always at least one masked key in the live batch row
    drop = ~mask[:, None, :, None]
    dirty_k, dirty_v = k.masked_fill(drop, bad), v.masked_fill(drop, -bad)
    clean_k, clean_v = k.masked_fill(drop, 0), v.masked_fill(drop, 0)
    for fn in (attention_triton, attention_ref):
        got = _grads(fn, (q, dirty_k, dirty_v), dtype, do, None, mask)
        want = _grads(fn, (q, clean_k, clean_v), dtype, do, None, mask)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            assert torch.isfinite(g).all(), f"{fn.__name__}: {name} is not finite"
            torch.testing.assert_close(g, w, atol=0, rtol=0, msg=f"{fn.__name__}: {name}")
    _check_against_ref(q, dirty_k, dirty_v, do, mask=mask)


def test_attention_ref_fp16_scores_do_not_overflow(device):
    # Fuzz find: the torch backend computed q·kᵀ in fp16, so scores past 65504 became Inf and the softmax NaN, though
    # the scores are documented as fp32.
    q = torch.full((1, 1, 3, 128), 16.0, device=device, dtype=F16)
    k = torch.randn(1, 1, 9, 128, device=device, dtype=F16)
    k[..., 4, :] = 48.0  # q·k = 16 * 48 * 128 = 98304 > 65504 for this key
    v = torch.randn(1, 1, 9, 128, device=device, dtype=F16)
    want = attention_ref(q.float(), k.float(), v.float(), scale=1.0)
    for fn in (attention_ref, attention_triton):
        out = fn(q, k, v, scale=1.0)
        assert torch.isfinite(out).all(), fn.__name__
        torch.testing.assert_close(out.float(), want, atol=1e-3, rtol=1e-3)


def _bad(**over):
    x = dict(q=torch.randn(2, 2, 7, 16), k=torch.randn(2, 2, 9, 16), v=torch.randn(2, 2, 9, 16))
    x.update(over)
    return x


@pytest.mark.parametrize(
    "args, match",
    [
        (_bad(q=torch.randn(2, 7, 16)), r"`q` must be \(B, H, T, D\)"),
        (_bad(k=torch.randn(3, 2, 9, 16), v=torch.randn(3, 2, 9, 16)), "must agree on B, H and D"),
        (_bad(k=torch.randn(2, 3, 9, 16), v=torch.randn(2, 3, 9, 16)), "must agree on B, H and D"),
        (_bad(k=torch.randn(2, 2, 9, 32), v=torch.randn(2, 2, 9, 32)), "must agree on B, H and D"),
        (_bad(v=torch.randn(2, 2, 8, 16)), "must have the same shape"),
        (_bad(q=torch.ones(2, 2, 7, 16, dtype=torch.int32)), "must be a floating tensor"),
        (_bad(q=torch.randn(2, 2, 7, 16, dtype=F16)), "share one dtype"),
        (_bad(k=torch.randn(2, 2, 9, 16, device="meta")), "share one device"),
        (_bad(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), r"key_padding_mask must be \(B, Tk\)"),
        (_bad(key_padding_mask=torch.ones(2, 9)), "key_padding_mask must be a bool tensor"),
        (_bad(scale=torch.tensor(0.5)), "`scale` must be a Python float"),
        (_bad(q=torch.randn(2, 2, 7, 0), k=torch.randn(2, 2, 9, 0), v=torch.randn(2, 2, 9, 0)), "head dim D=0"),
        (_bad(q=torch.randn(2, 2, 7, 300), k=torch.randn(2, 2, 9, 300), v=torch.randn(2, 2, 9, 300)), "head dim D=300"),
    ],
    ids=["rank", "batch", "heads", "head-dim", "kv-shape", "int", "dtype", "device", "mask-shape", "mask-dtype",
         "scale", "d0", "d300"],
)
def test_attention_bad_inputs(args, match):
    for fn in (attention_triton, attention_ref):
        with pytest.raises(ValueError, match=match):
            fn(**args)


def test_attention_fp64_is_reference_only():
    q = torch.randn(1, 1, 3, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="supports float16, bfloat16 and float32"):
        attention_triton(q, q, q)


def test_attention_dispatch_runs_triton(monkeypatch, device):
    q, k, v = (torch.randn(2, 2, n, 72, device=device) for n in (7, 33, 33))
    mask = _mask(2, 33, device)
    expect = attention_triton(q, k, v, key_padding_mask=mask)

    def boom(*args, **kwargs):
        raise AssertionError("the torch reference path ran")

    # The reference needs torch.matmul and torch.softmax; the Triton path uses neither.
    monkeypatch.setattr(torch, "matmul", boom)
    monkeypatch.setattr(torch, "softmax", boom)
    with pytest.raises(AssertionError, match="reference path ran"):
        crossflow_kernels.attention.ref(q, k, v, key_padding_mask=mask)
    with crossflow_kernels.use_backend("triton"):
        out = crossflow_kernels.attention(q, k, v, key_padding_mask=mask)
    assert torch.equal(out, expect)


def test_attention_compile_torch_backend_fullgraph():
    # The torch backend must trace without a graph break (fullgraph=True raises on one). Under the CPU interpreter a
    # compiled triton_op cannot run (FakeTensor has no data pointer), so the Triton path is compiled only on a GPU.
    q, k, v = (torch.randn(2, 2, n, 24) for n in (7, 9, 9))
    mask = _mask(2, 9, "cpu")

    def fn(q, k, v, mask):
        return crossflow_kernels.attention(q, k, v, key_padding_mask=mask).transpose(1, 2).reshape(2, 7, 48)

    with crossflow_kernels.use_backend("torch"):
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    torch.testing.assert_close(out, fn(q, k, v, mask))


@pytest.mark.gpu
@pytest.mark.parametrize("keys", ["mask", "lengths"])
def test_attention_compile_triton_fullgraph(device, fwd_kernel, keys):
    torch._dynamo.reset()
    if keys == "mask":
        q, k, v = (torch.randn(2, 4, n, 72, device=device, dtype=F16, requires_grad=True) for n in (257, 77, 77))
        kw = dict(key_padding_mask=_mask(2, 77, device))
    else:
        q, k, v = (torch.randn(2, 4, 77, 24, device=device, dtype=F16, requires_grad=True) for _ in range(3))
        kw = dict(key_lengths=torch.tensor([77, 12], device=device))

    def fn(q, k, v):
        return crossflow_kernels.attention(q, k, v, **kw).float().square().sum()

    with crossflow_kernels.use_backend("triton"):
        eager = fn(q, k, v)
        g_eager = torch.autograd.grad(eager, (q, k, v))
        compiled = torch.compile(fn, fullgraph=True)(q, k, v)
        g_compiled = torch.autograd.grad(compiled, (q, k, v))
    # Same kernels, but Inductor may autotune to another tile shape (another fp16 rounding order): compare loosely.
    torch.testing.assert_close(compiled, eager, atol=1e-2, rtol=1e-2)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_attention_large_gpu(dtype, device):
    b, h, t, d = 4, 16, 4096, 64
    q, k, v, do = (torch.randn(b, h, t, d, device=device, dtype=dtype) for _ in range(4))
    got = _grads(attention_triton, (q, k, v), dtype, do, None, None)
    # fp32 reference via SDPA's math path would need ~4 GB per score matrix; chunk the heads to keep memory bounded.
    for i in range(0, h, 4):
        sl = (slice(None), slice(i, i + 4))
        ref32 = _grads(lambda *a, **kw: attention_ref(*a, **kw, upcast=True), (q[sl], k[sl], v[sl]), F32, do[sl],
                       None, None)
        lowp = _grads(attention_ref, (q[sl], k[sl], v[sl]), dtype, do[sl], None, None)
        for name, g, r, rl in zip(("out", "dq", "dk", "dv"), got, ref32, lowp):
            assert_close_to_ref(g[sl], r, rl, name=name)
    assert math.isfinite(got[0].float().abs().max().item())


def _force_autotuning(kernel, tiles, monkeypatch, runs=3):
    """What the interpreter hides: `kernel` tunes over several configs (all kept), each benchmarked by `runs` real
    launches, on an empty tuning cache."""
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s) for bm, bn, w, s in tiles]
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "early_config_prune", None)
    monkeypatch.setattr(kernel, "cache", {})
    timings = iter(range(1, 1000))

    def do_bench(kernel_call, quantiles):
        for _ in range(runs):
            kernel_call()
        t = float(next(timings))
        return [t, t, t]

    monkeypatch.setattr(kernel, "_do_bench", do_bench)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_fused_bwd_first_call_after_autotuning(masked, device, monkeypatch):
    # Regression: the fused backward adds dQ into an fp32 accumulator that was zeroed once, before the autotuner ran
    # every config several times; the first call of a new tuning key returned dQ times the number of launches (7x
    # here: 2 configs x 3 runs + the winner) while dK, dV (stores) were right. `reset_to_zero=["DQ_ACC"]` fixes it.
    monkeypatch.setenv(attn_mod.BWD_KERNEL_ENV, "fused")
    monkeypatch.setenv(attn_mod.FWD_KERNEL_ENV, "portable")
    _force_autotuning(attn_mod._attention_bwd_fused_kernel, [(16, 16, 4, 1), (32, 16, 4, 1)], monkeypatch)
    q, k, v, do = (torch.randn(2, 2, n, 24, device=device) for n in (33, 7, 7, 33))
    mask = _mask(2, 7, device) if masked else None
    for call in ("tuned", "cached"):
        _check_against_ref(q, k, v, do, mask=mask)
    assert len(attn_mod._attention_bwd_fused_kernel.cache) == 1  # it did tune (once), then reused the winner


@pytest.mark.gpu
def test_attention_fused_bwd_fresh_key_gpu(device, monkeypatch):
    # On a GPU the autotuner runs every kept config (2-3 at d48/d64 on sm_90, 16-bit): the first backward of a fresh
    # tuning key (a B*H bucket no other test uses) must give the same dQ as the second, and the reference's.
    monkeypatch.setenv(attn_mod.BWD_KERNEL_ENV, "fused")
    for d in (48, 64):
        q, k, v, do = (torch.randn(3, 41, n, d, device=device, dtype=F16) for n in (301, 301, 301, 301))
        first = _check_against_ref(q, k, v, do)
        second = _grads(attention_triton, (q, k, v), F16, do, None, None)
        torch.testing.assert_close(first[1], second[1], atol=2e-3, rtol=2e-3)


def test_autotuned_kernels_declare_what_they_accumulate():
    # The reset audit: every autotuned kernel of the package, with the arguments a launch accumulates into (zeroed
    # before each benchmarked launch) or reads and writes (restored). A new autotuned kernel fails here until audited.
    import importlib
    import pkgutil
    expected = {"_attention_bwd_fused_kernel": (["DQ_ACC"], [])}
    for name in ("_attention_fwd_kernel", "_attention_fwd_sm90_kernel", "_attention_bwd_dkdv_kernel",
                 "_attention_bwd_dq_kernel"):
        expected[name] = ([], [])  # stores only
    found = {}
    for info in pkgutil.iter_modules(crossflow_kernels.__path__):
        mod = importlib.import_module(f"crossflow_kernels.{info.name}")
        for attr, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.Autotuner):
                found[attr] = (obj.reset_to_zero, obj.restore_value)
    assert found == expected


def test_attention_grid_is_1d_past_65535_heads(monkeypatch):
    # CUDA caps a grid's y (and z) at 65,535: the B*H heads are folded into x with the blocks (`_block_and_head`).
    # Every launch of the forward and of both backward paths is recorded, not run (the interpreter would take minutes
    # over 70,000 heads).
    from triton.runtime.interpreter import InterpretedFunction
    grids = []

    def record(self, *args, grid, warmup, **kwargs):
        grids.append((self.fn.__name__, tuple(grid(kwargs) if callable(grid) else grid)))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    q = torch.randn(2, 35_000, 33, 16, requires_grad=True)
    for bwd in ("fused", "split"):
        monkeypatch.setenv(attn_mod.BWD_KERNEL_ENV, bwd)
        attention_triton(q, q, q).sum().backward()
    names = {n for n, _ in grids}
    assert {"_attention_fwd_kernel", "_attention_bwd_delta_kernel", "_attention_bwd_fused_kernel",
            "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"} <= names
    for name, grid in grids:
        assert len(grid) == 1 and 70_000 <= grid[0] < 2**31, (name, grid)


@pytest.mark.parametrize("bwd", ["fused", "split"])
def test_attention_block_and_head_fold(bwd, device, monkeypatch):
    # The folded (1-D) grid addresses every (block, head) once: with the fold forced at a small B*H, ragged T with
    # several blocks per head, checked against the reference through the forward and both backward paths.
    monkeypatch.setattr(attn_mod, "MAX_GRID_Y", 4)
    monkeypatch.setenv(attn_mod.BWD_KERNEL_ENV, bwd)
    q, k, v, do = (torch.randn(3, 5, n, 16, device=device) for n in (77, 40, 40, 77))
    _check_against_ref(q, k, v, do)
    assert attn_mod._grid(77, 16, 15) == (75,) and attn_mod._grid(77, 16, 4) == (5, 4)


@pytest.mark.gpu
def test_attention_many_heads_gpu(device):
    # B*H = 70,000 > 65,535 (CUDA's grid y limit) through the real launches.
    q, k, v, do = (torch.randn(2, 35_000, 17, 32, device=device, dtype=F16) for _ in range(4))
    _check_against_ref(q, k, v, do)


def test_attention_sm90_kernel_only_on_sm90_and_sm100():
    # auto takes the TMA / warp-specialized forward on Hopper and Blackwell datacenter parts only: compiled for sm_120
    # (RTX 50xx) it is an mma.sync kernel that spills and whose 128-row tiles need more than its 99 KB per block.
    takes = tuning._sm90_kernel_arch
    assert takes((9, 0)) and takes((10, 0)) and takes((10, 3))
    assert not any(takes(c) for c in ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1), (11, 0)))


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq", "fused"])
def test_attention_prune_fits_each_archs_shared_memory(kind):
    # Each arch gets its own shared-memory budget: the 99 KB parts (sm_86, sm_89, sm_120) keep only tiles whose
    # estimate fits under 96 KB, sm_80/90/100 under 160 KB; an unknown arch the smallest.
    assert tuning._smem_budget(120) == tuning._smem_budget(86) == tuning._smem_budget(None) == 96 * 1024
    assert tuning._smem_budget(80) == tuning._smem_budget(90) == tuning._smem_budget(100) == 160 * 1024
    tiles = {"fwd": tuning._FWD_TILES, "dkdv": tuning._DKDV_TILES, "dq": tuning._DQ_TILES,
             "fused": tuning._FUSED_TILES}[kind]
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s) for bm, bn, w, s in tiles]
    d0, d1 = _split_head_dim(128)
    args = dict(D0=d0, D1=d1, HAS_MASK=False, DOT_PRECISION="tf32")
    kept120 = tuning._prune_for(kind, configs, args, 120)
    kept90 = tuning._prune_for(kind, configs, args, 90)
    assert kept120 and kept90
    big = [c for c in kept90 if c not in kept120]
    if kind == "fwd":  # (128 + 3 * 2 * 128) * 128 * 2 B = 224 KB > 160 KB; (128 + 3 * 2 * 64) * 256 = 128 KB
        assert any(c.kwargs["BLOCK_M"] == 128 for c in big)


def test_attention_sm90_prune_per_arch():
    # The sm_90 forward's prune knows each arch it runs on; its spill table is applied per arch (sm_100 at d128).
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
               for bm, bn, w, s in tuning._FWD_SM90_TILES]
    assert all(c.kwargs["BLOCK_M"] >= 128 for c in configs)  # no 64-row tile: its two consumer groups did it twice
    for arch in (90, 100, None):
        for d in (24, 64, 72, 128):
            d0, d1 = _split_head_dim(d)
            kept = tuning._prune_sm90_for(configs, dict(D0=d0, D1=d1, HAS_MASK=False), arch)
            dp = d0 + d1
            spills = {(dp_, t) for a in ((arch,) if arch else (90, 100)) for dp_, m, t in tuning._SM90_SPILLS[a]
                      if m is not True}
            tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
            assert not any((dp, t) in spills for t in tiles) or len(kept) == 1  # (1: the never-empty fallback)


def test_attention_sm90_kernel_lanes_per_arch():
    # sm_100 spills in every sm_90-kernel tile at 128 lanes (compile report): auto keeps the portable kernel there,
    # and the prune drops the measured spillers at 80/96 lanes.
    assert tuning._SM90_MAX_LANES == {9: (128, 128), 10: (96, 32)}
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
               for bm, bn, w, s in tuning._FWD_SM90_TILES]
    for d in (72, 80, 96):
        d0, d1 = _split_head_dim(d)
        kept = tuning._prune_sm90_for(configs, dict(D0=d0, D1=d1, HAS_MASK=False), 100)
        assert (128, 64, 4, 3) not in [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                                       for c in kept]
        assert len(tuning._prune_sm90_for(configs, dict(D0=d0, D1=d1, HAS_MASK=False), 90)) == 3


# ---------------------------------------------------------------------------------------------------------------------
# key_lengths: a per-batch key prefix, the Text VE's padding, with no byte mask in the kernels
# ---------------------------------------------------------------------------------------------------------------------

# (B, H, Tq, Tk, D, dtype): lengths 0, 1, Tk and one in between, one per batch row (B = 4); fp32 runs fp16 on sm90.
LENGTH_CASES = [
    (4, 2, 13, 77, 24, F32),
    (4, 2, 77, 13, 48, F16),  # 32 + 16 lanes
    (4, 1, 13, 77, 72, F16),  # 64 + 16 lanes
    (4, 1, 7, 257, 16, F16),  # several key blocks past the length
]


def _lengths(b, tk, device):
    return torch.tensor([0, 1, tk, tk // 2 + 1][:b], device=device)


def _poison_past(k, v, lengths):
    """k, v with NaN in every key past its batch row's length: such keys must take no part."""
    drop = ~lengths_mask(lengths, k.shape[2])[:, None, :, None]
    return k.masked_fill(drop, float("nan")), v.masked_fill(drop, float("nan"))


@pytest.mark.parametrize("case", LENGTH_CASES, ids=lambda c: f"{c[0]}x{c[1]}-q{c[2]}-k{c[3]}-d{c[4]}-{str(c[5])[6:]}")
def test_attention_key_lengths(case, device, kernel_paths):
    b, h, tq, tk, d, dtype = case
    if kernel_paths[0] == "sm90":
        dtype = F16
    q, k, v, do = (torch.randn(b, h, n, d, device=device, dtype=dtype) for n in (tq, tk, tk, tq))
    lengths = _lengths(b, tk, device)
    k, v = _poison_past(k, v, lengths)
    before = _launch_counts()
    out, dq, dk, dv = _check_against_ref(q, k, v, do, lengths=lengths)
    _assert_ran(before, _expect_kernel(kernel_paths[0], dtype, d), kernel_paths[1])
    for t in (out[0], dq[0], dk[0], dv[0]):  # length 0: zeros, no NaN, no gradient
        assert torch.equal(t, torch.zeros_like(t))
    keep = lengths_mask(lengths, tk)[:, None, :, None]
    for t in (dk, dv):  # no gradient past the length
        assert torch.equal(t.masked_fill(keep, 0), torch.zeros_like(t))
    # The same numbers as the equivalent prefix mask (a NaN-free copy: the byte-mask kernels read the keys it drops).
    clean_k, clean_v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    masked = _grads(attention_triton, (q, clean_k, clean_v), dtype, do, None, lengths_mask(lengths, tk))
    for name, g, m in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), masked):
        torch.testing.assert_close(g, m, atol=1e-6 if dtype == F32 else 2e-3, rtol=1e-5 if dtype == F32 else 2e-3,
                                   msg=name)


@pytest.mark.parametrize("layout", ["bthd", "qkv"])
def test_attention_key_lengths_strided_layouts(layout, device, kernel_paths):
    # The model's views (the Text VE's (B, T, H, D), DiT's fused qkv), read in place, int32 lengths.
    b, t, h, d, dtype = 3, 77, 2, 24, F16
    if layout == "bthd":
        q, k, v = (torch.randn(b, t, h, d, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = torch.randn(b, t, 3, h, d, device=device, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous() and all(_prepare(x) is x for x in (q, k, v))
    lengths = torch.tensor([77, 5, 40], device=device, dtype=torch.int32)
    do = torch.randn(b, t, h, d, device=device, dtype=dtype).transpose(1, 2)
    before = _launch_counts()
    _check_against_ref(q, k, v, do, lengths=lengths)
    _assert_ran(before, _expect_kernel(kernel_paths[0], dtype, d), kernel_paths[1])


def test_attention_key_lengths_are_clamped(device):
    # Documented: a length below 0 acts as 0, one above Tk as Tk (checking would cost a device sync per call).
    q, k, v = (torch.randn(3, 2, n, 16, device=device) for n in (5, 9, 9))
    for dtype in (torch.int64, torch.int32):
        wild, tame = (torch.tensor(x, device=device, dtype=dtype) for x in ([-3, 100, 2**31 - 1], [0, 9, 9]))
        for fn in (attention_triton, attention_ref):
            torch.testing.assert_close(fn(q, k, v, key_lengths=wild), fn(q, k, v, key_lengths=tame), atol=0, rtol=0)


@pytest.mark.parametrize("over, match", [
    (dict(key_padding_mask=torch.ones(2, 9, dtype=torch.bool)), "key_padding_mask or key_lengths, not both"),
    (dict(key_lengths=torch.tensor([1.0, 2.0])), "key_lengths must be an int32 or int64 tensor"),
    (dict(key_lengths=[3, 4]), "key_lengths must be an int32 or int64 tensor"),
    (dict(key_lengths=torch.tensor([1, 2, 3])), r"key_lengths must be \(B,\) = \(2,\)"),
    (dict(key_lengths=torch.tensor([[1], [2]])), r"key_lengths must be \(B,\)"),
    (dict(key_lengths=torch.tensor([1, 2], device="meta")), "key_lengths is on meta"),
], ids=["with-mask", "float", "list", "length", "rank", "device"])
def test_attention_key_lengths_bad_inputs(over, match):
    args = _bad(**over)
    if "key_padding_mask" in over:
        args["key_lengths"] = torch.tensor([3, 4])
    for fn in (attention_triton, attention_ref, crossflow_kernels.attention):
        with pytest.raises(ValueError, match=match):
            fn(**args)


def test_attention_key_lengths_compile_torch_backend_fullgraph():
    q, k, v = (torch.randn(2, 2, n, 24) for n in (7, 9, 9))
    lengths = torch.tensor([9, 3])

    def fn(q, k, v, lengths):
        return crossflow_kernels.attention(q, k, v, key_lengths=lengths)

    with crossflow_kernels.use_backend("torch"):
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, lengths)
    torch.testing.assert_close(out, attention_ref(q, k, v, key_lengths=lengths))


def test_attention_key_lengths_dispatch_counts(device):
    q, k, v = (torch.randn(2, 2, n, 16, device=device) for n in (5, 9, 9))
    lengths = torch.tensor([9, 2], device=device)
    crossflow_kernels.reset_dispatch_counts()
    with crossflow_kernels.use_routing(False):
        crossflow_kernels.attention(q, k, v, key_lengths=lengths)
    with crossflow_kernels.use_backend("torch"):
        crossflow_kernels.attention(q, k, v, key_lengths=lengths)
    assert crossflow_kernels.dispatch_counts() == {("attention", "triton"): 1, ("attention", "torch"): 1}


_LENS_REPORTS = ("2026-12-06_compile-report_triton-3.9.0_attention-lens.json",
                 "2026-12-06_compile-report_triton-3.6.0_attention-lens.json")


@pytest.mark.parametrize("name", _LENS_REPORTS)
def test_attention_key_lengths_compiled_kernels_read_no_byte_mask(name):
    # The committed compile reports of the `-lens` cases (the KEY_LENS kernels, every kept config, sm_80/90/100/120):
    # MASK (the int32 lengths) is read with 4-byte loads only, never a byte, and no kept config spills; the sm_90
    # forward is compiled warp-specialized with TMA on sm_90 and sm_100, its 128-key tile included (the byte mask
    # closed it). The masked cases of the same day do read the mask byte by byte.
    import json
    from pathlib import Path
    results = Path(__file__).resolve().parents[2] / "benchmarks/results"
    rows = [r for r in json.loads((results / name).read_text())["rows"] if "-lens" in r["case"]]
    assert rows and not any(r.get("error") for r in rows)
    for r in rows:
        reads = [a for a in r["accesses"] if "MASK" in a["args"]]
        if r["kernel"].startswith("_attention_bwd_delta_kernel"):
            assert not reads
            continue
        assert r["constexprs"]["KEY_LENS"] and not r["constexprs"]["HAS_MASK"], r["case"]
        assert all(a["bytes"] == 4 and a["kind"] == "ld" for a in reads), (r["case"], r["kernel"], reads)
        assert reads or r["kernel"] == "_attention_fwd_sm90_kernel"  # (3.6: its partitions' loads go unattributed)
        assert not r["ptx"]["ld_global"].get("1"), (r["case"], r["kernel"], r["ptx"])  # no byte load at all
        assert r["spill_store_bytes"] == 0 or r["arch"] == 120, (r["case"], r["kernel"], r["arch"], r["config"])
    sm90 = [r for r in rows if r["kernel"] == "_attention_fwd_sm90_kernel"]
    assert {r["arch"] for r in sm90} == {90, 100}
    assert all(r["warp_specialized"] and r["ptx"]["tma_load"] for r in sm90)
    assert any(r["config"]["BLOCK_N"] == 128 for r in sm90 if r["arch"] == 90)
    masked = json.loads((results / "2026-12-06_compile-report_triton-3.9.0_attention-t77.json").read_text())["rows"]
    assert any(a["bytes"] == 1 for r in masked if r["kernel"] == "_attention_fwd_sm90_kernel"
               for a in r["accesses"] if "MASK" in a["args"])
