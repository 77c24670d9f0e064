"""Non-causal scaled dot-product attention: out = softmax(q kᵀ · scale) v.

Shapes: q (B, H, Tq, D), k and v (B, H, Tk, D); Tq may differ from Tk; any T (ragged lengths are the norm: 77 text
tokens, 257 image+indicator tokens); any head dim 1 <= D <= 256 (24/48 in the Text VE, 72 in DiT-XL).
key_padding_mask: optional bool (B, Tk), True = attend; a masked key takes no part whatever it holds (NaN, Inf). A
query row whose keys are all masked returns zeros (not NaN) and passes no gradient. scale defaults to 1/sqrt(D).
key_lengths: optional int32/int64 (B,) instead of a mask (not both): key j of batch b attends iff j < key_lengths[b]
(clamped to [0, Tk]). The kernels' KEY_LENS variant reads no byte mask: loops end at the length, tiles compare
indices, and the sm_90 forward's K/V descriptors end there (TMA zero-fills what lies past it).

Kernels (FlashAttention-2 style): the forward streams key blocks through an online softmax in base 2 (scale·log2(e)
folded into one multiply), fp32 statistics and accumulators, and stores the per-row log-sum-exp for the backward. The
backward recomputes P and dS from it (one shared helper) after a preprocess launch that computes delta = rowsum(dO∘O),
in one of two ways (`CROSSFLOW_KERNELS_ATTENTION_BWD` = auto | fused | split, read at each launch; `bwd_kernel_launches` counts
which ran):
- fused (the default; on a pre-sm_90 GPU at head dims split 64+16 / 64+32, where only 16-query tiles of it compile
  spill-free, `auto` keeps the split pair): one kernel per key block sweeps every query block and computes S, dP,
  dV += Pᵀ dO, dK += dSᵀ Q and dQ's share dS K, added into an fp32 dQ buffer with atomics (which the preprocess
  zeroes, and the autotuner before each launch it benchmarks): 5 matmuls per (query, key) tile. The fp32 sums land
  in scheduling order, so dQ's last bits may differ from run to run.
- split: one kernel per key block for dK/dV (S, dP, dV, dK) and one per query block for dQ (S, dP, dQ), 7 matmuls per
  tile (P and dP recomputed twice), every gradient written by exactly one program: bitwise reproducible. It runs
  whenever `torch.are_deterministic_algorithms_enabled()`, whatever the variable says.

On sm_90 and sm_100 (CUDA capability 9.x and 10.x) the forward is a second kernel with the same arithmetic: Q/K/V/O
tiles move by TMA through tensor descriptors made in the kernel, and the key loop is warp-specialized (a producer warp
group loads, consumer warp groups run wgmma and the softmax), for 16-bit inputs whose base and row strides are 16-byte
aligned, at head dims up to 128 (sm_100: 96, 32 with a mask); the portable kernel serves sm_80, sm_120, fp32,
unaligned views and the interpreter.
`CROSSFLOW_KERNELS_ATTENTION_FWD` = auto | sm90 | portable (read at each launch) forces one, so the interpreter tests run both;
`fwd_kernel_launches` counts which ran. The backward is shared.

Head dims that are not a power of two are split into two power-of-two parts (72 = 64+16, 96 = 64+32; every dot is two
dots), not padded to the next power of two: at D = 72 the tensor cores do 80/72 of the useful work instead of 128/72.
q/k/v/dO are read through their strides (the (B, T, H, D) and fused (B, T, 3, H, D) qkv views are not copied); the
launchers pass row/head strides in units of 16 bytes when they allow it, so the compiler can prove row alignment and
emit 16-byte loads and cp.async at every head dim that is a multiple of 16 bytes (24 and 72 included). The output is
(B, Tq, H, D) memory returned as a (B, H, Tq, D) view, so `out.transpose(1, 2).reshape(B, Tq, H * D)` is free.
fp16/bf16/fp32 inputs; fp32 dots use IEEE precision.
"""
from __future__ import annotations

import collections
import functools
import inspect
import math
import os

import torch

from crossflow_kernels._dispatch import interpreting
from crossflow_kernels._triton import tl, triton
from crossflow_kernels._utils import (
    check_float, check_kernel_dtype, check_same, cuda_device_guard, deferred_triton_op,
    register_triton_ops, wrap_triton,
)
from crossflow_kernels.attention_tuning import (
    _DKDV_CONFIGS, _DQ_CONFIGS, _FUSED_CONFIGS, _FWD_CONFIGS, _FWD_SM90_CONFIGS, _SM90_MAX_LANES, _delta_block_m,
    _fused_starved, _prune, _prune_sm90, _sm90_kernel_arch, _split_head_dim,
)

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------------------------------
# Checks shared by the reference and the launchers
# ---------------------------------------------------------------------------------------------------------------------


def _check(q, k, v, scale, key_padding_mask, key_lengths=None) -> None:
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
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim D={q.shape[3]} is not supported; need 1 <= D <= {MAX_HEAD_DIM}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
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
    if key_lengths is not None:
        n = key_lengths
        if key_padding_mask is not None:
            raise ValueError(f"{name}: pass key_padding_mask or key_lengths, not both")
        if not isinstance(n, torch.Tensor) or n.dtype not in (torch.int32, torch.int64):
            got = getattr(n, "dtype", type(n))
            raise ValueError(f"{name}: key_lengths must be an int32 or int64 tensor, got {got}")
        if n.shape != (k.shape[0],):
            raise ValueError(f"{name}: key_lengths must be (B,) = ({k.shape[0]},), got {tuple(n.shape)}")
        if n.device != q.device:
            raise ValueError(f"{name}: key_lengths is on {n.device} but q is on {q.device}")


# ---------------------------------------------------------------------------------------------------------------------
# Torch reference (also the torch backend)
# ---------------------------------------------------------------------------------------------------------------------


def lengths_mask(key_lengths: torch.Tensor, tk: int) -> torch.Tensor:
    """The bool (B, Tk) key-padding mask of per-batch key lengths: key j of batch b attends iff j < key_lengths[b]
    (so a length below 0 acts as 0, one above Tk as Tk)."""
    return torch.arange(tk, device=key_lengths.device) < key_lengths[:, None]


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, upcast: bool = False, *, key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Explicit-math reference. Scores and softmax in fp32 (fp64 for fp64 input); P·V in the input dtype (in that
    compute dtype when `upcast`). Masked keys take no part, whatever values they hold (NaN and Inf included).
    key_lengths is the prefix mask `lengths_mask(key_lengths, Tk)`."""
    _check(q, k, v, scale, key_padding_mask, key_lengths)
    if key_lengths is not None:
        key_padding_mask = lengths_mask(key_lengths, k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32; fp64 stays fp64 (a high-precision oracle in tests)
    dtype = acc if upcast else q.dtype
    if upcast:
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
    if key_padding_mask is not None:
        # Zero masked keys and values: a 0 probability times a NaN value is still NaN, so masking P is not enough.
        drop = ~key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(drop, 0), v.masked_fill(drop, 0)
    # fp32 scores: a 16-bit q·kᵀ overflows (Inf, then NaN after softmax) past 65504. Upcasting q and k costs less
    # memory than the (B, H, Tq, Tk) fp32 score matrix itself.
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]
        s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.where(keep.any(-1, keepdim=True), p, torch.zeros_like(p))  # all-masked rows: zeros, not NaN
    else:
        p = torch.softmax(s, dim=-1)
    return torch.matmul(p.to(v.dtype), v).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------
# Every (T, D) operand is read as two column parts, lanes [0, D0) and [D0, D0 + D1) with D0, D1 powers of two
# (D1 = 0: one part). Row and head strides arrive divided by UNIT (a constexpr): multiplying them back by UNIT in the
# kernel lets Triton prove every row starts on a UNIT-element boundary, which is what 16-byte loads and cp.async need.


@triton.jit
def _load_rows(BASE, rows, row_ok, stride_t, UNIT: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
               D1: tl.constexpr):
    # -> (x0, x1): the (rows, D0) and (rows, D1) parts. Rows with row_ok False and lanes past HEAD_DIM read as 0, so
    # they add nothing to any dot product and a masked key's NaN never enters one. x1 aliases x0 when D1 == 0.
    row_ptr = BASE + rows[:, None] * (stride_t * UNIT)
    c0 = tl.arange(0, D0)
    x0 = tl.load(row_ptr + c0[None, :], mask=row_ok[:, None] & (c0[None, :] < HEAD_DIM), other=0.0)
    x1 = x0
    if D1 > 0:
        c1 = D0 + tl.arange(0, D1)
        x1 = tl.load(row_ptr + c1[None, :], mask=row_ok[:, None] & (c1[None, :] < HEAD_DIM), other=0.0)
    return x0, x1


@triton.jit
def _store_rows(BASE, x0, x1, rows, row_ok, stride_t, UNIT: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                D1: tl.constexpr):
    row_ptr = BASE + rows[:, None] * (stride_t * UNIT)
    c0 = tl.arange(0, D0)
    tl.store(row_ptr + c0[None, :], x0.to(BASE.dtype.element_ty), mask=row_ok[:, None] & (c0[None, :] < HEAD_DIM))
    if D1 > 0:
        c1 = D0 + tl.arange(0, D1)
        tl.store(row_ptr + c1[None, :], x1.to(BASE.dtype.element_ty), mask=row_ok[:, None] & (c1[None, :] < HEAD_DIM))


@triton.jit
def _dot_t(a0, a1, b0, b1, D1: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # a bᵀ over the split head dim: one dot per part, accumulated in fp32.
    s = tl.dot(a0, tl.trans(b0), input_precision=DOT_PRECISION)
    if D1 > 0:
        s = tl.dot(a1, tl.trans(b1), s, input_precision=DOT_PRECISION)
    return s


@triton.jit
def _block_and_head(N, BLOCK: tl.constexpr, GRID_FOLD: tl.constexpr):
    # -> (block index along a length-N axis, b·H + h). The grid is (cdiv(N, BLOCK), B·H), or with GRID_FOLD (B·H past
    # 65,535, CUDA's cap on y and z; x allows 2**31 - 1) 1-D, (cdiv(N, BLOCK) · B·H,), blocks of one head adjacent. Two
    # variants, not always the 1-D one: its division costs registers, and kernels at 255 registers spilled (3.6).
    if GRID_FOLD:
        pid = tl.program_id(0)
        n = tl.cdiv(N, BLOCK)
        return pid % n, (pid // n).to(tl.int64)  # int64 base offsets: B*H*T*D may pass 2**31
    else:
        return tl.program_id(0), tl.program_id(1).to(tl.int64)


@triton.jit
def _key_count(MASK_ROW, TK, KEY_LENS: tl.constexpr):
    # Keys of this batch row that can take part: with KEY_LENS its length (MASK_ROW points at it: int32, clamped to
    # [0, Tk] by the launcher), else all Tk. Loops end there and masks compare indices with it: no byte mask is read.
    n = TK
    if KEY_LENS:
        n = tl.load(MASK_ROW)
    return n


@triton.jit
def _keys_ok(MASK_ROW, cols, TK, stride_mt, HAS_MASK: tl.constexpr):
    # A key takes part iff it exists (ragged tail, or past the batch row's length: TK is `_key_count`'s) and, with a
    # padding mask, is marked True.
    ok = cols < TK
    if HAS_MASK:
        ok = ok & (tl.load(MASK_ROW + cols * stride_mt, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _recompute_p_ds(a0, a1, b0, b1, c0, c1, e0, e1, lse, delta, key_ok, qk_scale,
                    KEYS_ON_ROWS: tl.constexpr, D1: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The backward's shared core: P = exp2(S·qk_scale − lse) and dS = P ∘ (dP − delta), with S = a bᵀ, dP = c eᵀ.

    dQ passes (a, b, c, e) = (q, k, dO, v): tiles are (queries, keys). dK/dV passes (k, q, v, dO): tiles are (keys,
    queries), so no tile is transposed in registers. Masked or missing keys get P = 0 (their loads are zero, but
    exp2(0 − lse) is not); query rows past Tq read lse = +inf, hence P = 0.
    """
    s = _dot_t(a0, a1, b0, b1, D1, DOT_PRECISION)
    dp = _dot_t(c0, c1, e0, e1, D1, DOT_PRECISION)
    if KEYS_ON_ROWS:
        p = tl.where(key_ok[:, None], tl.exp2(s * qk_scale - lse[None, :]), 0.0)
        ds = p * (dp - delta[None, :])
    else:
        p = tl.where(key_ok[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
    return p, ds


# Tuned per (length buckets, grid bucket = B·H, head dim, mask or key lengths, stride unit); the autotuner adds the
# dtypes itself.
_TUNE_KEY = ["TQ_BUCKET", "TK_BUCKET", "BH_BUCKET", "HEAD_DIM", "HAS_MASK", "KEY_LENS", "UNIT"]
_BUCKETS = ["TQ_BUCKET", "TK_BUCKET", "BH_BUCKET"]


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune("fwd")})
@triton.jit(do_not_specialize=_BUCKETS)
def _attention_fwd_kernel(
    Q, K, V,  # (B, H, Tq|Tk, D), unit head-dim stride
    MASK,  # uint8 view of the bool key_padding_mask (B, Tk) with HAS_MASK; int32 key lengths (B,) with KEY_LENS
    OUT,  # (B, H, Tq, D) view of (B, Tq, H, D) memory
    LSE,  # fp32 (B, H, Tq): base-2 log-sum-exp of the scaled scores, +inf for rows with no key
    stride_qb, stride_qh, stride_qt,  # all row/head/batch strides in units of UNIT elements
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_mb, stride_mt,  # mask strides, in elements (lengths: 1, 0)
    H, TQ, TK,
    qk_scale,  # softmax scale * log2(e): scores come out of one multiply already in base 2
    TQ_BUCKET, TK_BUCKET, BH_BUCKET,  # power-of-two buckets: autotune key only
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, UNIT: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr, GRID_FOLD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_bh = _block_and_head(TQ, BLOCK_M, GRID_FOLD)
    off_b, off_h = pid_bh // H, pid_bh % H
    Q += (off_b * stride_qb + off_h * stride_qh) * UNIT
    K += (off_b * stride_kb + off_h * stride_kh) * UNIT
    V += (off_b * stride_vb + off_h * stride_vh) * UNIT
    OUT += (off_b * stride_ob + off_h * stride_oh) * UNIT
    MASK += off_b * stride_mb
    n_keys = _key_count(MASK, TK, KEY_LENS)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < TQ
    offs_n = tl.arange(0, BLOCK_N)

    q0, q1 = _load_rows(Q, rows, row_ok, stride_qt, UNIT, HEAD_DIM, D0, D1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the base-2 scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], tl.float32)
    for start_n in range(0, n_keys, BLOCK_N):
        cols = start_n + offs_n
        ok = _keys_ok(MASK, cols, n_keys, stride_mt, HAS_MASK)
        # Missing and masked keys are loaded as zeros (whatever they hold) and scored -inf *before* the row max, so
        # they never win it and exp2 sends them to 0.
        k0, k1 = _load_rows(K, cols, ok, stride_kt, UNIT, HEAD_DIM, D0, D1)
        s = tl.where(ok[None, :], _dot_t(q0, q1, k0, k1, D1, DOT_PRECISION) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no live key so far has m = -inf; subtracting 0 instead keeps exp2 at 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0, v1 = _load_rows(V, cols, ok, stride_vt, UNIT, HEAD_DIM, D0, D1)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if D1 > 0:
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    live = l_i > 0.0  # l >= 1 whenever a row has one live key (its max term is exp2(0))
    inv_l = 1.0 / tl.where(live, l_i, 1.0)  # dead rows: acc is 0, keep it 0 (no 0/0) and take no log of 0
    _store_rows(OUT, acc0 * inv_l[:, None], acc1 * inv_l[:, None], rows, row_ok, stride_ot, UNIT, HEAD_DIM, D0, D1)
    # +inf for dead rows: the backward recomputes p = exp2(s - lse) = 0 there, so they get no gradient.
    lse = tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)), float("inf"))
    tl.store(LSE + pid_bh * TQ + rows, lse, mask=row_ok)


# The sm_90 forward: tensor descriptors (TMA) for Q, K, V and O, the key loop warp-specialized (a producer warp group
# issues the TMA loads, consumer warp groups run wgmma and the softmax). 16-bit inputs only (fp32 runs FMA dots, where
# neither helps). Its tiles, shared-memory budgets and spill tables: `attention_tuning`.


@triton.jit
def _tile_desc(BASE, rows, stride_t, UNIT: tl.constexpr, cols, BLOCK: tl.constexpr, D: tl.constexpr):
    # A (rows, cols) row-major view of one head, read and written in (BLOCK, D) boxes: rows past `rows` and lanes past
    # `cols` read as 0 and are never written.
    return tl.make_tensor_descriptor(BASE, [rows, cols], [stride_t * UNIT, 1], [BLOCK, D])


@triton.autotune(configs=_FWD_SM90_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_sm90})
@triton.jit(do_not_specialize=_BUCKETS)
def _attention_fwd_sm90_kernel(
    Q, K, V,  # (B, H, Tq|Tk, D), unit head-dim stride; base, rows and row strides on 16-byte boundaries
    MASK,  # uint8 (B, Tk) with HAS_MASK; int32 key lengths (B,) with KEY_LENS
    OUT,  # (B, H, Tq, D) view of (B, Tq, H, D) memory
    LSE,  # fp32 (B, H, Tq), as the portable kernel
    stride_qb, stride_qh, stride_qt,  # in units of UNIT elements (16 bytes)
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_mb, stride_mt,  # mask strides, in elements (lengths: 1, 0)
    H, TQ, TK,
    qk_scale,
    TQ_BUCKET, TK_BUCKET, BH_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, UNIT: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    GRID_FOLD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The same online softmax as `_attention_fwd_kernel`; only the data movement differs. One descriptor per head and
    # head-dim part, made in the kernel (its 128-byte scratch comes from `triton.set_allocator`): per-head row counts
    # make TMA zero-fill past Tq / Tk and clip the O store, so no row of another head is read or written.
    pid_m, pid_bh = _block_and_head(TQ, BLOCK_M, GRID_FOLD)
    off_b, off_h = pid_bh // H, pid_bh % H
    Q += (off_b * stride_qb + off_h * stride_qh) * UNIT
    K += (off_b * stride_kb + off_h * stride_kh) * UNIT
    V += (off_b * stride_vb + off_h * stride_vh) * UNIT
    OUT += (off_b * stride_ob + off_h * stride_oh) * UNIT
    MASK += off_b * stride_mb
    n_keys = _key_count(MASK, TK, KEY_LENS)
    # With key lengths the K/V descriptors end at the row's length: TMA zero-fills the keys past it (a NaN there is
    # never read), so V needs no masking. At least one row: a descriptor of none is never loaded from (no iteration).
    k_rows = TK
    if KEY_LENS:
        k_rows = tl.maximum(n_keys, 1)
    start_m = pid_m * BLOCK_M
    # Part 0 holds lanes [0, min(D, D0)), part 1 lanes [D0, D).
    W0: tl.constexpr = HEAD_DIM if D1 == 0 else D0
    q_d0 = _tile_desc(Q, TQ, stride_qt, UNIT, W0, BLOCK_M, D0)
    k_d0 = _tile_desc(K, k_rows, stride_kt, UNIT, W0, BLOCK_N, D0)
    v_d0 = _tile_desc(V, k_rows, stride_vt, UNIT, W0, BLOCK_N, D0)
    o_d0 = _tile_desc(OUT, TQ, stride_ot, UNIT, W0, BLOCK_M, D0)
    q0 = q_d0.load([start_m, 0])
    q1 = q0
    if D1 > 0:
        q_d1 = _tile_desc(Q + D0, TQ, stride_qt, UNIT, HEAD_DIM - D0, BLOCK_M, D1)
        k_d1 = _tile_desc(K + D0, k_rows, stride_kt, UNIT, HEAD_DIM - D0, BLOCK_N, D1)
        v_d1 = _tile_desc(V + D0, k_rows, stride_vt, UNIT, HEAD_DIM - D0, BLOCK_N, D1)
        o_d1 = _tile_desc(OUT + D0, TQ, stride_ot, UNIT, HEAD_DIM - D0, BLOCK_M, D1)
        q1 = q_d1.load([start_m, 0])
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], tl.float32)
    for start_n in tl.range(0, n_keys, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = start_n + offs_n
        ok = _keys_ok(MASK, cols, n_keys, stride_mt, HAS_MASK)
        # TMA cannot skip rows: a masked key arrives with whatever it holds. Its score is replaced by -inf (a NaN
        # score included) and, with a mask, its V row by zeros (0 · NaN would still be NaN).
        k0 = k_d0.load([start_n, 0])
        s = tl.dot(q0, k0.T, input_precision=DOT_PRECISION)
        if D1 > 0:
            k1 = k_d1.load([start_n, 0])
            s = tl.dot(q1, k1.T, s, input_precision=DOT_PRECISION)
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = v_d0.load([start_n, 0])
        if HAS_MASK:
            v0 = tl.where(ok[:, None], v0, 0.0)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if D1 > 0:
            v1 = v_d1.load([start_n, 0])
            if HAS_MASK:
                v1 = tl.where(ok[:, None], v1, 0.0)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    live = l_i > 0.0
    inv_l = 1.0 / tl.where(live, l_i, 1.0)
    o_d0.store([start_m, 0], (acc0 * inv_l[:, None]).to(OUT.dtype.element_ty))
    if D1 > 0:
        o_d1.store([start_m, 0], (acc1 * inv_l[:, None]).to(OUT.dtype.element_ty))
    rows = start_m + tl.arange(0, BLOCK_M)
    lse = tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)), float("inf"))
    tl.store(LSE + pid_bh * TQ + rows, lse, mask=rows < TQ)


@triton.jit
def _attention_bwd_delta_kernel(
    O, DO,  # (B, H, Tq, D), unit head-dim stride
    DELTA,  # fp32 (B, H, Tq): rowsum(dO * O), the softmax-backward correction
    DQ_ACC,  # fp32 (B, H, Tq, D) view of (B, Tq, H, D) memory, the fused backward's dQ sum; unused unless ZERO_DQ
    stride_ob, stride_oh, stride_ot,  # in units of UNIT elements
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, TQ,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, UNIT: tl.constexpr, ZERO_DQ: tl.constexpr,
    GRID_FOLD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # The backward's preprocess. With ZERO_DQ (the fused backward) it also zeroes the rows of the dQ accumulator that
    # the fused kernel's atomics add into: the accumulator needs one pass of initialisation anyway, and doing it here
    # saves a launch (a torch.zeros) and a pass over the rows. delta is not computed inside the fused kernel instead:
    # every key-block program would re-read the (BLOCK_M, D) O tile of every query block (Tk / BLOCK_N times the O
    # traffic) and hold it beside K, V, dK, dV, Q, dO and the dQ partial, where register pressure is the risk.
    pid_m, pid_bh = _block_and_head(TQ, BLOCK_M, GRID_FOLD)
    off_b, off_h = pid_bh // H, pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < TQ
    O += (off_b * stride_ob + off_h * stride_oh) * UNIT
    DO += (off_b * stride_dob + off_h * stride_doh) * UNIT
    o0, o1 = _load_rows(O, rows, row_ok, stride_ot, UNIT, HEAD_DIM, D0, D1)
    do0, do1 = _load_rows(DO, rows, row_ok, stride_dot, UNIT, HEAD_DIM, D0, D1)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    if D1 > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * TQ + rows, delta, mask=row_ok)
    if ZERO_DQ:
        DQ_ACC += (off_b * stride_dqb + off_h * stride_dqh) * UNIT
        _store_rows(DQ_ACC, tl.zeros([BLOCK_M, D0], tl.float32), tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], tl.float32),
                    rows, row_ok, stride_dqt, UNIT, HEAD_DIM, D0, D1)


@triton.jit
def _bwd_key_block(
    Q, K, V, DO, MASK, LSE, DELTA, DK, DV, DQ_ACC,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt, stride_dqb, stride_dqh, stride_dqt,
    stride_mb, stride_mt, H, TQ, TK, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, UNIT: tl.constexpr, HAS_MASK: tl.constexpr,
    KEY_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WITH_DQ: tl.constexpr, GRID_FOLD: tl.constexpr,
):
    # One program owns a block of keys and sweeps every query block: dV = Pᵀ dO, dK = scale · dSᵀ Q. WITH_DQ (the
    # fused backward) also adds each query block's dQ share scale · dS K into the fp32 accumulator DQ_ACC with
    # atomics: S, dP, dV, dK, dQ are five matmuls per (query, key) tile where the split pair (WITH_DQ off, plus the dQ
    # kernel) runs seven, P and dP recomputed twice. Atomics make dQ's fp32 sum order (so its last bits) depend on
    # scheduling: `torch.use_deterministic_algorithms(True)` takes the pair. Without WITH_DQ, DQ_ACC and its strides
    # are not read.
    pid_n, pid_bh = _block_and_head(TK, BLOCK_N, GRID_FOLD)
    off_b, off_h = pid_bh // H, pid_bh % H
    Q += (off_b * stride_qb + off_h * stride_qh) * UNIT
    K += (off_b * stride_kb + off_h * stride_kh) * UNIT
    V += (off_b * stride_vb + off_h * stride_vh) * UNIT
    DO += (off_b * stride_dob + off_h * stride_doh) * UNIT
    DK += (off_b * stride_dkb + off_h * stride_dkh) * UNIT
    DV += (off_b * stride_dkb + off_h * stride_dkh) * UNIT
    DQ_ACC += (off_b * stride_dqb + off_h * stride_dqh) * UNIT
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)

    # Masked keys load as zeros and get P = dS = 0: their dK, dV are exactly 0 and they add exactly 0 to dQ; rows
    # past Tk are never stored.
    MASK += off_b * stride_mb
    n_keys = _key_count(MASK, TK, KEY_LENS)
    ok = _keys_ok(MASK, cols, n_keys, stride_mt, HAS_MASK)
    k0, k1 = _load_rows(K, cols, ok, stride_kt, UNIT, HEAD_DIM, D0, D1)
    v0, v1 = _load_rows(V, cols, ok, stride_vt, UNIT, HEAD_DIM, D0, D1)
    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], tl.float32)
    # With key lengths a block wholly past the row's length sweeps no query: its dK, dV are the zeros stored below.
    q_end = TQ
    if KEY_LENS:
        q_end = tl.where(pid_n * BLOCK_N < n_keys, TQ, 0)
    for start_m in range(0, q_end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < TQ
        q0, q1 = _load_rows(Q, rows, row_ok, stride_qt, UNIT, HEAD_DIM, D0, D1)
        do0, do1 = _load_rows(DO, rows, row_ok, stride_dot, UNIT, HEAD_DIM, D0, D1)
        lse = tl.load(LSE + pid_bh * TQ + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * TQ + rows, mask=row_ok, other=0.0)
        p_t, ds_t = _recompute_p_ds(k0, k1, q0, q1, v0, v1, do0, do1, lse, delta, ok, qk_scale,
                                    True, D1, DOT_PRECISION)  # (BLOCK_N, BLOCK_M): keys on rows
        dv0 = tl.dot(p_t.to(do0.dtype), do0, dv0, input_precision=DOT_PRECISION)
        ds_h = ds_t.to(q0.dtype)
        dk0 = tl.dot(ds_h, q0, dk0, input_precision=DOT_PRECISION)
        # The scale goes on the (BLOCK_M, D) partial, not on dS: one multiply per dQ element, and the finished
        # accumulator needs only the cast to the input dtype.
        dq_row = DQ_ACC + rows[:, None] * (stride_dqt * UNIT)
        if WITH_DQ:
            dq0 = tl.dot(tl.trans(ds_h), k0, input_precision=DOT_PRECISION) * sm_scale
            tl.atomic_add(dq_row + c0[None, :], dq0, mask=row_ok[:, None] & (c0[None, :] < HEAD_DIM), sem="relaxed")
        if D1 > 0:
            dv1 = tl.dot(p_t.to(do1.dtype), do1, dv1, input_precision=DOT_PRECISION)
            dk1 = tl.dot(ds_h, q1, dk1, input_precision=DOT_PRECISION)
            if WITH_DQ:
                dq1 = tl.dot(tl.trans(ds_h), k1, input_precision=DOT_PRECISION) * sm_scale
                tl.atomic_add(dq_row + c1[None, :], dq1, mask=row_ok[:, None] & (c1[None, :] < HEAD_DIM),
                              sem="relaxed")
    col_ok = cols < TK
    _store_rows(DK, dk0 * sm_scale, dk1 * sm_scale, cols, col_ok, stride_dkt, UNIT, HEAD_DIM, D0, D1)
    _store_rows(DV, dv0, dv1, cols, col_ok, stride_dkt, UNIT, HEAD_DIM, D0, D1)


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune("dkdv")})
@triton.jit(do_not_specialize=_BUCKETS)
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO,  # (B, H, T, D), unit head-dim stride
    MASK,  # uint8 (B, Tk) with HAS_MASK; int32 key lengths (B,) with KEY_LENS
    LSE, DELTA,  # fp32 (B, H, Tq) from the forward and the delta kernel
    DK, DV,  # (B, H, Tk, D) views of (B, Tk, H, D) memory, one layout for both
    stride_qb, stride_qh, stride_qt,  # in units of UNIT elements
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_mb, stride_mt,
    H, TQ, TK,
    sm_scale, qk_scale,
    TQ_BUCKET, TK_BUCKET, BH_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, UNIT: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr, GRID_FOLD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The split backward's key-block half: dK and dV (DK stands in for the unused dQ accumulator).
    _bwd_key_block(Q, K, V, DO, MASK, LSE, DELTA, DK, DV, DK,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                   stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt, stride_dkb, stride_dkh,
                   stride_dkt, stride_mb, stride_mt, H, TQ, TK, sm_scale, qk_scale,
                   HEAD_DIM, D0, D1, UNIT, HAS_MASK, KEY_LENS, DOT_PRECISION, BLOCK_M, BLOCK_N, False, GRID_FOLD)


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune("dq")})
@triton.jit(do_not_specialize=_BUCKETS)
def _attention_bwd_dq_kernel(
    Q, K, V, DO,  # (B, H, T, D), unit head-dim stride
    MASK,  # uint8 (B, Tk) with HAS_MASK; int32 key lengths (B,) with KEY_LENS
    LSE, DELTA,  # fp32 (B, H, Tq)
    DQ,  # (B, H, Tq, D) view of (B, Tq, H, D) memory
    stride_qb, stride_qh, stride_qt,  # in units of UNIT elements
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_mb, stride_mt,
    H, TQ, TK,
    sm_scale, qk_scale,
    TQ_BUCKET, TK_BUCKET, BH_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, UNIT: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr, GRID_FOLD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program owns a block of queries and sweeps every key block: dQ = scale · dS K, dS = P ∘ (dO Vᵀ − delta).
    pid_m, pid_bh = _block_and_head(TQ, BLOCK_M, GRID_FOLD)
    off_b, off_h = pid_bh // H, pid_bh % H
    Q += (off_b * stride_qb + off_h * stride_qh) * UNIT
    K += (off_b * stride_kb + off_h * stride_kh) * UNIT
    V += (off_b * stride_vb + off_h * stride_vh) * UNIT
    DO += (off_b * stride_dob + off_h * stride_doh) * UNIT
    DQ += (off_b * stride_dqb + off_h * stride_dqh) * UNIT
    MASK += off_b * stride_mb
    n_keys = _key_count(MASK, TK, KEY_LENS)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < TQ
    offs_n = tl.arange(0, BLOCK_N)

    q0, q1 = _load_rows(Q, rows, row_ok, stride_qt, UNIT, HEAD_DIM, D0, D1)
    do0, do1 = _load_rows(DO, rows, row_ok, stride_dot, UNIT, HEAD_DIM, D0, D1)
    lse = tl.load(LSE + pid_bh * TQ + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * TQ + rows, mask=row_ok, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], tl.float32)
    for start_n in range(0, n_keys, BLOCK_N):
        cols = start_n + offs_n
        ok = _keys_ok(MASK, cols, n_keys, stride_mt, HAS_MASK)
        k0, k1 = _load_rows(K, cols, ok, stride_kt, UNIT, HEAD_DIM, D0, D1)
        v0, v1 = _load_rows(V, cols, ok, stride_vt, UNIT, HEAD_DIM, D0, D1)
        _, ds = _recompute_p_ds(q0, q1, k0, k1, do0, do1, v0, v1, lse, delta, ok, qk_scale,
                                False, D1, DOT_PRECISION)  # (BLOCK_M, BLOCK_N): queries on rows
        dq0 = tl.dot(ds.to(k0.dtype), k0, dq0, input_precision=DOT_PRECISION)
        if D1 > 0:
            dq1 = tl.dot(ds.to(k1.dtype), k1, dq1, input_precision=DOT_PRECISION)
    _store_rows(DQ, dq0 * sm_scale, dq1 * sm_scale, rows, row_ok, stride_dqt, UNIT, HEAD_DIM, D0, D1)


# DQ_ACC is added into (atomics): the autotuner launches every kept config many times before the winner runs, so it
# must zero DQ_ACC before each launch (`reset_to_zero`, which Inductor's autotuner honours too); the preprocess zeroes
# it for the launches that are not tuned. Every other autotuned kernel here only stores (no argument is read back).
@triton.autotune(configs=_FUSED_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune("fused")},
                 reset_to_zero=["DQ_ACC"])
@triton.jit(do_not_specialize=_BUCKETS)
def _attention_bwd_fused_kernel(
    Q, K, V, DO,  # (B, H, T, D), unit head-dim stride
    MASK,  # uint8 (B, Tk) with HAS_MASK; int32 key lengths (B,) with KEY_LENS
    LSE, DELTA,  # fp32 (B, H, Tq) from the forward and the preprocess
    DK, DV,  # (B, H, Tk, D) views of (B, Tk, H, D) memory, one layout for both
    DQ_ACC,  # fp32 (B, H, Tq, D) view of (B, Tq, H, D) memory, zeroed by the preprocess; receives scale · dS K
    stride_qb, stride_qh, stride_qt,  # in units of UNIT elements
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dqb, stride_dqh, stride_dqt,
    stride_mb, stride_mt,
    H, TQ, TK,
    sm_scale, qk_scale,
    TQ_BUCKET, TK_BUCKET, BH_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, UNIT: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr, GRID_FOLD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The fused backward: dK, dV and dQ's share from one sweep (`_bwd_key_block` with WITH_DQ).
    _bwd_key_block(Q, K, V, DO, MASK, LSE, DELTA, DK, DV, DQ_ACC,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                   stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt, stride_dqb, stride_dqh,
                   stride_dqt, stride_mb, stride_mt, H, TQ, TK, sm_scale, qk_scale,
                   HEAD_DIM, D0, D1, UNIT, HAS_MASK, KEY_LENS, DOT_PRECISION, BLOCK_M, BLOCK_N, True, GRID_FOLD)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops on first use so torch.compile(fullgraph=True) traces through them
# ---------------------------------------------------------------------------------------------------------------------


def _vec(t: torch.Tensor) -> int:
    """Elements per 16-byte vector: the unit a row must start on for 16-byte loads, cp.async and TMA."""
    return max(1, 16 // t.element_size())


def _stride_unit(*tensors: torch.Tensor) -> int:
    """16 bytes in elements if every batch/head/row stride of `tensors` is a multiple of it, else 1.

    Strides are passed to the kernels divided by this unit, so Triton can prove 16-byte row alignment (it specializes
    only pointers and integer arguments, not their products). Base pointers are Triton's own business: it specializes
    on 16-byte-aligned data pointers, and `_aligned` copies views whose storage offset would break that.
    """
    vec = _vec(tensors[0])
    ok = all(s % vec == 0 for t in tensors for s in _strides(t))
    return vec if ok else 1


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    # Batch, head and row strides; 0 for a size-1 dim (its index is always 0, and its stride may be anything).
    return tuple(s if n > 1 else 0 for s, n in zip(t.stride()[:3], t.shape[:3]))


def _units(t: torch.Tensor, unit: int) -> tuple[int, int, int]:
    return tuple(s // unit for s in _strides(t))


def _meta(q: torch.Tensor, mask: torch.Tensor | None, unit: int, lengths: torch.Tensor | None = None, tk: int = 0):
    """Kernel arguments shared by every launch: mask (or key lengths) pointer/strides and the compile-time switches."""
    d = q.shape[3]
    fp32 = q.dtype == torch.float32
    d0, d1 = _split_head_dim(d)
    if lengths is not None:  # int32 (B,) in [0, Tk]: out-of-range lengths are clamped (documented), no sync to check
        m, mask_strides = lengths.clamp(0, tk).to(torch.int32), (1, 0)
    else:
        # A bool tensor is one byte per element; the uint8 view is read as 0/1 without a copy.
        m = mask.view(torch.uint8) if mask is not None else q
        mask_strides = tuple(mask.stride()) if mask is not None else (0, 0)
    constexprs = dict(
        HEAD_DIM=d, D0=d0, D1=d1, UNIT=unit, HAS_MASK=mask is not None, KEY_LENS=lengths is not None,
        GRID_FOLD=q.shape[0] * q.shape[1] > MAX_GRID_Y,  # B·H past CUDA's grid y limit: a 1-D grid (`_grid`)
        DOT_PRECISION="ieee" if fp32 else "tf32",  # tf32 is ignored for fp16/bf16 operands
    )
    return m, mask_strides, constexprs


# CUDA's limit on grid y and z; past it the launchers fold B·H into x (GRID_FOLD).
MAX_GRID_Y = 65_535


def _grid(n: int, block: int, bh: int) -> tuple[int, ...]:
    """The kernels' grid (`_block_and_head`): cdiv(n, block) blocks for each of the B·H heads, (blocks, B·H), or 1-D
    past `MAX_GRID_Y` heads."""
    return (triton.cdiv(n, block) * bh,) if bh > MAX_GRID_Y else (triton.cdiv(n, block), bh)


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


# Which forward kernel runs: "auto" (default) takes the sm_90 kernel on a CUDA device of capability 9.x or 10.x and
# the portable one elsewhere (sm_80, sm_120, the interpreter); "sm90" / "portable" force one (tests run the sm_90
# kernel in the interpreter that way). Read at every launch. Inputs the sm_90 kernel cannot take (fp32, rows or bases off the
# 16-byte grid) run the portable kernel whatever the setting.
FWD_KERNEL_ENV = "CROSSFLOW_KERNELS_ATTENTION_FWD"
_FWD_KERNELS = ("auto", "sm90", "portable")
# Forward launches per kernel ("sm90" / "portable") in this process: which one ran is observable, never silent.
fwd_kernel_launches: collections.Counter = collections.Counter()


def _fwd_kernel_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, masked: bool = False) -> str:
    """"sm90" or "portable": the forward kernel for these (prepared) tensors under `CROSSFLOW_KERNELS_ATTENTION_FWD`."""
    want = os.environ.get(FWD_KERNEL_ENV, "") or "auto"
    if want not in _FWD_KERNELS:
        raise ValueError(f"attention: {FWD_KERNEL_ENV}={want!r} is not one of {', '.join(_FWD_KERNELS)}")
    if want == "portable":
        return "portable"
    if want == "auto" and not (q.is_cuda and torch.version.hip is None and not interpreting()
                               and _sm90_kernel_arch(torch.cuda.get_device_capability(q.device))):
        return "portable"
    vec = _vec(q)
    # Storage offsets, not data pointers: torch.compile traces this with fake tensors, which have none (storages
    # from torch's allocators start on 256-byte boundaries).
    aligned = all(t.storage_offset() % vec == 0 and all(s % vec == 0 for s in _strides(t)) for t in (q, k, v, o))
    # Head dims up to 128 padded lanes (on sm_100 96, and 32 with a mask: past them every tile spills there): the
    # compile report checks the sm_90 kernel there (the DiT and Text VE dims).
    major = torch.cuda.get_device_capability(q.device)[0] if q.is_cuda and not interpreting() else 9
    small = sum(_split_head_dim(q.shape[3])) <= _SM90_MAX_LANES.get(major, (128, 128))[bool(masked)]
    ok = aligned and small and q.dtype in (torch.float16, torch.bfloat16) and _can_warp_specialize()
    return "sm90" if ok else "portable"


@functools.cache
def _can_warp_specialize() -> bool:
    # `tl.range(..., warp_specialize=)` exists from triton 3.4 on (3.6 and 3.9 checked); older ones keep the portable
    # forward everywhere.
    return "warp_specialize" in inspect.signature(tl.range).parameters


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # Global scratch for the descriptors the sm_90 kernel makes in-kernel (128 bytes each per program); torch's caching
    # allocator returns 256-byte aligned blocks on the current (guarded) device.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_descriptor_allocator() -> None:
    """Give Triton an allocator for in-kernel descriptors unless the caller already set one (it is a per-thread
    ContextVar: set here, at the first sm_90 launch, never at import)."""
    from triton.runtime import _allocation
    current = getattr(getattr(_allocation, "_allocator", None), "get", lambda: None)()
    if current is None or isinstance(current, getattr(_allocation, "NullAllocator", ())):
        triton.set_allocator(_descriptor_scratch)


def _row_units(t: torch.Tensor, unit: int) -> tuple[int, int, int]:
    # _units, but a one-row tensor gets a real row stride (the row's own width): a descriptor needs a non-zero one.
    sb, sh, st = _units(t, unit)
    return sb, sh, st if t.shape[2] > 1 else triton.cdiv(t.shape[3], unit)


@deferred_triton_op("crossflow_kernels::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, lengths: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, tq, d = q.shape
    tk = k.shape[2]
    if b * h * tq == 0 or tk == 0:  # nothing to launch (and no empty-tensor pointers): no keys -> zeros
        return q.new_zeros(b, tq, h, d), q.new_full((b, h, tq), float("inf"), dtype=torch.float32)
    out = q.new_empty(b, tq, h, d)  # (B, Tq, H, D): heads side by side, so the caller's merge is a free reshape
    lse = q.new_empty(b, h, tq, dtype=torch.float32)
    o = out.transpose(1, 2)
    unit = _stride_unit(q, k, v, o)
    m, mask_strides, constexprs = _meta(q, mask, unit, lengths, tk)
    grid = lambda meta: _grid(tq, meta["BLOCK_M"], b * h)  # noqa: E731
    which = _fwd_kernel_for(q, k, v, o, mask is not None)
    fwd_kernel_launches[which] += 1
    with cuda_device_guard(q):
        if which == "sm90":
            if q.is_cuda:
                _ensure_descriptor_allocator()
            wrap_triton(_attention_fwd_sm90_kernel)[grid](
                q, k, v, m, o, lse, *_row_units(q, unit), *_row_units(k, unit), *_row_units(v, unit),
                *_row_units(o, unit), *mask_strides, h, tq, tk, scale * _LOG2E, _bucket(tq), _bucket(tk),
                _bucket(b * h), WARP_SPECIALIZE=True, **constexprs,
            )
        else:
            wrap_triton(_attention_fwd_kernel)[grid](
                q, k, v, m, o, lse, *_units(q, unit), *_units(k, unit), *_units(v, unit), *_units(o, unit),
                *mask_strides, h, tq, tk, scale * _LOG2E, _bucket(tq), _bucket(tk), _bucket(b * h), **constexprs,
            )
    return out, lse


# Which backward runs: "fused" (one kernel per key block; dQ through fp32 atomics) or "split" (the dK/dV kernel plus
# the dQ kernel: every gradient written by one program, bitwise reproducible). "auto" (default) takes the fused one
# except on a pre-sm_90 GPU at the split head dims of 64+16 / 64+32 lanes (`_fused_starved`); "fused" / "split" force
# one (tests run both in the interpreter). Whatever the setting, `torch.are_deterministic_algorithms_enabled()` gets
# the split pair: a promise of reproducible gradients outranks a speed setting. Read at every launch.
BWD_KERNEL_ENV = "CROSSFLOW_KERNELS_ATTENTION_BWD"
_BWD_KERNELS = ("auto", "fused", "split")
# Backward launches per path ("fused" / "split") in this process: which one ran is observable, never silent.
bwd_kernel_launches: collections.Counter = collections.Counter()


def _bwd_kernel_for(q: torch.Tensor) -> str:
    """"fused" or "split": the backward path for `q` under `CROSSFLOW_KERNELS_ATTENTION_BWD` and torch's deterministic mode."""
    want = os.environ.get(BWD_KERNEL_ENV, "") or "auto"
    if want not in _BWD_KERNELS:
        raise ValueError(f"attention: {BWD_KERNEL_ENV}={want!r} is not one of {', '.join(_BWD_KERNELS)}")
    if want == "split" or torch.are_deterministic_algorithms_enabled():
        return "split"
    if want == "auto" and q.is_cuda and torch.version.hip is None and not interpreting():
        major, minor = torch.cuda.get_device_capability(q.device)
        if _fused_starved(q.shape[3], 10 * major + minor):
            return "split"
    return "fused"


@deferred_triton_op("crossflow_kernels::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask: torch.Tensor | None, lengths: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, tq, d = q.shape
    tk = k.shape[2]
    if b * h * tq == 0 or tk == 0:  # no query rows or no keys: every gradient is zero (or empty)
        return q.new_zeros(b, tq, h, d), k.new_zeros(b, tk, h, d), v.new_zeros(b, tk, h, d)
    which = _bwd_kernel_for(q)
    bwd_kernel_launches[which] += 1
    dk, dv = k.new_empty(b, tk, h, d), v.new_empty(b, tk, h, d)
    # The fused path accumulates dQ in fp32 (for fp32 inputs that buffer is dQ itself); (B, Tq, H, D) memory either way.
    fused = which == "fused"
    dq = q.new_empty(b, tq, h, d, dtype=torch.float32 if fused else q.dtype)
    dq_, dk_, dv_ = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    delta = torch.empty_like(lse)
    unit = _stride_unit(q, k, v, do, out, dq_, dk_)
    m, mask_strides, constexprs = _meta(q, mask, unit, lengths, tk)
    common = (*_units(q, unit), *_units(k, unit), *_units(v, unit), *_units(do, unit))
    tail = (h, tq, tk, scale, scale * _LOG2E, _bucket(tq), _bucket(tk), _bucket(b * h))
    block_m = _delta_block_m(constexprs["D0"] + constexprs["D1"])
    grid_q = lambda meta: _grid(tq, meta["BLOCK_M"], b * h)  # noqa: E731
    grid_k = lambda meta: _grid(tk, meta["BLOCK_N"], b * h)  # noqa: E731
    split = {key: constexprs[key] for key in ("HEAD_DIM", "D0", "D1", "UNIT", "GRID_FOLD")}
    with cuda_device_guard(q):
        # delta, and for the fused path the zeroed dQ accumulator, in one launch
        wrap_triton(_attention_bwd_delta_kernel)[_grid(tq, block_m, b * h)](
            out, do, delta, dq_, *_units(out, unit), *_units(do, unit), *_units(dq_, unit), h, tq, **split,
            ZERO_DQ=fused, BLOCK_M=block_m,
        )
        if fused:
            wrap_triton(_attention_bwd_fused_kernel)[grid_k](
                q, k, v, do, m, lse, delta, dk_, dv_, dq_, *common, *_units(dk_, unit), *_units(dq_, unit),
                *mask_strides, *tail, **constexprs,
            )
        else:
            wrap_triton(_attention_bwd_dkdv_kernel)[grid_k](
                q, k, v, do, m, lse, delta, dk_, dv_, *common, *_units(dk_, unit), *mask_strides, *tail,
                **constexprs,
            )
            wrap_triton(_attention_bwd_dq_kernel)[grid_q](
                q, k, v, do, m, lse, delta, dq_, *common, *_units(dq_, unit), *mask_strides, *tail, **constexprs,
            )
    if fused and dq.dtype != q.dtype:
        dq = dq.to(q.dtype)  # the one op after the kernels: fp32 accumulator -> input dtype, same (B, Tq, H, D) layout
    return dq, dk, dv


def _prepare(t: torch.Tensor) -> torch.Tensor:
    """The layout the kernels read fast: unit head-dim stride, rows on 16-byte boundaries where the head dim allows.

    (B, H, T, D) contiguous, (B, T, H, D) transposed and fused-qkv (B, T, 3, H, D) views all qualify as they are
    (their strides are multiples of D) and are never copied. A copy is made only for a view that is truly unaligned:
    a non-unit head-dim stride, or (when D itself fills whole 16-byte vectors) a row stride or storage offset off the
    16-byte grid. Head dims that are not a multiple of 16 bytes cannot be aligned by any copy and are read as they are.
    """
    d, vec = t.shape[-1], _vec(t)
    if d > 1 and t.stride(-1) != 1:
        return t.contiguous()
    if d % vec == 0 and (t.storage_offset() % vec or any(s % vec for s in _strides(t))):
        return t.clone(memory_format=torch.contiguous_format)  # fresh, aligned storage even for a contiguous view
    return t


def attention_fwd(q, k, v, scale: float, mask=None, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, H, Tq, D) as a view of (B, Tq, H, D) memory, lse fp32 (B, H, Tq) in base 2."""
    out, lse = torch.ops.crossflow_kernels.attention_fwd(_prepare(q), _prepare(k), _prepare(v), mask, lengths, scale)
    return out.transpose(1, 2), lse


def attention_bwd(do, q, k, v, out, lse, scale: float, mask=None, lengths=None):
    """-> dq, dk, dv, each (B, H, T, D) as a view of (B, T, H, D) memory."""
    dq, dk, dv = torch.ops.crossflow_kernels.attention_bwd(_prepare(do.to(q.dtype)), _prepare(q), _prepare(k),
                                                           _prepare(v), out, lse, mask, lengths, scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd and the direct Triton entry point
# ---------------------------------------------------------------------------------------------------------------------


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, mask, lengths):
        q, k, v = _prepare(q), _prepare(k), _prepare(v)  # once here, so the backward reuses the same tensors
        out, lse = attention_fwd(q, k, v, scale, mask, lengths)
        ctx.save_for_backward(q, k, v, out, lse, mask, lengths)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, mask, lengths = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, out, lse, ctx.scale, mask, lengths)
        return dq, dk, dv, None, None, None


def attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, *, key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v with the Triton kernels. q (B, H, Tq, D), k/v (B, H, Tk, D) -> (B, H, Tq, D).
    key_lengths: int32/int64 (B,), key j of batch b attends iff j < key_lengths[b] (instead of a prefix mask)."""
    _check(q, k, v, scale, key_padding_mask, key_lengths)
    check_kernel_dtype("attention", q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    register_triton_ops()
    # Empty B/H/Tq give empty results and Tk = 0 gives zeros: the launchers return those without a launch.
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return AttentionFunction.apply(q, k, v, scale, key_padding_mask, key_lengths)
    return attention_fwd(q, k, v, scale, key_padding_mask, key_lengths)[0]
