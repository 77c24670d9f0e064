"""Non-causal scaled dot-product attention: out = softmax(q kᵀ · scale) v.

Shapes: q (B, H, Tq, D), k and v (B, H, Tk, D); Tq may differ from Tk; any T (ragged lengths are the norm: 77 text
tokens, 257 image+indicator tokens); any head dim 1 <= D <= 256 (24/48 in the Text VE, 72 in DiT-XL), padded inside the
kernels to a power of two >= 16 with masked loads and stores. key_padding_mask: optional bool (B, Tk), True = attend.
A query row whose keys are all masked returns zeros (not NaN) and passes no gradient. scale defaults to 1/sqrt(D).

Kernels (FlashAttention-2 style): the forward streams key blocks through an online softmax in base 2 (scale·log2(e)
folded into one multiply), fp32 statistics and accumulators, and stores the per-row log-sum-exp for the backward. The
backward recomputes P from it: one kernel per key block for dK/dV, one per query block for dQ, so every gradient is
written by exactly one program (deterministic, no atomics). q/k/v/dO are read through their strides (a permuted view of
a fused (B, T, 3, H, D) qkv projection is not copied); the output is (B, Tq, H, D) memory returned as a (B, H, Tq, D)
view, so `out.transpose(1, 2).reshape(B, Tq, H * D)` is free. fp16/bf16/fp32 inputs; fp32 dots use IEEE precision.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._utils import autotune_configs, check_float, check_kernel_dtype, check_same, cuda_device_guard

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------------------------------
# Checks shared by the reference and the launchers
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Torch reference (also the torch backend)
# ---------------------------------------------------------------------------------------------------------------------


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, upcast: bool = False,
) -> torch.Tensor:
    """Explicit-math reference. Scores and softmax in fp32 (fp64 for fp64 input); P·V in the input dtype (in that
    compute dtype when `upcast`)."""
    _check(q, k, v, scale, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32; fp64 stays fp64 (a high-precision oracle in tests)
    dtype = acc if upcast else q.dtype
    if upcast:
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale  # (B, H, Tq, Tk)
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


@triton.jit
def _load_tile(BASE, rows, cols, stride_t, stride_d, T, HEAD_DIM: tl.constexpr):
    # (rows, cols) tile of a (T, HEAD_DIM) matrix; rows past T and padded head-dim lanes read as 0, so they add
    # nothing to any dot product. HEAD_DIM is constexpr so the compiler sees the lane mask is constant over aligned
    # runs of lanes (all true when D is a power of two) and keeps the loads vectorized.
    ptrs = BASE + rows[:, None] * stride_t + cols[None, :] * stride_d
    return tl.load(ptrs, mask=(rows[:, None] < T) & (cols[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_tile(BASE, val, rows, cols, stride_t, stride_d, T, HEAD_DIM: tl.constexpr):
    ptrs = BASE + rows[:, None] * stride_t + cols[None, :] * stride_d
    tl.store(ptrs, val.to(BASE.dtype.element_ty), mask=(rows[:, None] < T) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _keys_ok(MASK_ROW, cols, TK, stride_mt, HAS_MASK: tl.constexpr):
    # A key takes part iff it exists (ragged tail) and, with a padding mask, is marked True.
    ok = cols < TK
    if HAS_MASK:
        ok = ok & (tl.load(MASK_ROW + cols * stride_mt, mask=ok, other=0) != 0)
    return ok


def _prune(kind: str):
    """Drop configs whose tiles would not fit a Hopper SM (~227 KB smem, 255 regs/thread) at this head dim / dtype.

    The register rules are fitted to `ptxas -v` on sm_90: they keep the configs that compile spill-free (or spill a few
    bytes) and drop those that spill 0.5-30 KB.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        bd = args["BLOCK_D"]
        fp32 = args["DOT_PRECISION"] == "ieee"  # "ieee" is used exactly for fp32 inputs
        elt = 4 if fp32 else 2
        kept = []
        for c in configs:
            bm, bn, st, threads = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, 32 * c.num_warps
            if kind == "fwd":  # resident Q; pipelined K, V; O accumulator and the S/P tile
                smem, regs = bm * bd * elt + st * 2 * bn * bd * elt, bm * bd + bm * bn + bm * bd * elt // 4
            elif kind == "dkdv":  # resident K, V; pipelined Q, dO; dK, dV accumulators and the P/dS tiles
                smem, regs = 2 * bn * bd * elt + st * 2 * bm * bd * elt, 2 * bn * bd + 2 * bn * bm + bn * bd * elt // 2
            else:  # dq: resident Q, dO; pipelined K, V; dQ accumulator and the P/dS tiles
                smem, regs = 2 * bm * bd * elt + st * 2 * bn * bd * elt, bm * bd + 2 * bm * bn + bm * bd * elt // 2
            if fp32:  # IEEE fp32 dots run on the FMA units: spills follow the dot work per thread instead
                fits = bm * bn * bd <= {"fwd": 1024, "dkdv": 256, "dq": 512}[kind] * threads
            else:
                fits = regs <= 200 * threads
            if smem <= 192 * 1024 and fits:
                kept.append(c)
        # Never prune to nothing: fall back to the config with the smallest tiles (the last one, by construction).
        return kept or [configs[-1]]

    return prune


def _configs(tiles) -> list[triton.Config]:
    return autotune_configs(
        [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s) for bm, bn, w, s in tiles]
    )


# (BLOCK_M, BLOCK_N, num_warps, num_stages). The first entry is the one the interpreter runs (one config only), so it
# is small; the last is the smallest-footprint fallback. BLOCK_M tiles queries, BLOCK_N keys. The small 8-warp entries
# serve D = 129..256 and the fp32 path, where 4 warps cannot hold the tiles.
_FWD_CONFIGS = _configs([
    (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 32, 4, 2), (64, 32, 8, 2),
    (32, 32, 4, 1), (32, 16, 8, 1),
])
_DKDV_CONFIGS = _configs([
    (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 8, 3), (32, 128, 8, 3), (32, 64, 8, 2), (32, 32, 8, 2),
    (16, 32, 4, 1), (16, 32, 8, 1),
])
_DQ_CONFIGS = _configs([
    (64, 32, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 16, 4, 2), (64, 16, 8, 2),
    (32, 16, 4, 1), (32, 16, 8, 1),
])
# Tuned per (length buckets, head dim, mask); the autotuner appends the tensor dtypes to the key itself.
_TUNE_KEY = ["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "HAS_MASK"]


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune("fwd")})
@triton.jit(do_not_specialize=["TQ_BUCKET", "TK_BUCKET"])
def _attn_fwd_kernel(
    Q, K, V,  # (B, H, Tq|Tk, D) through their strides
    MASK,  # uint8 view of the bool key_padding_mask (B, Tk); unused unless HAS_MASK
    OUT,  # (B, H, Tq, D) view of (B, Tq, H, D) memory
    LSE,  # fp32 (B, H, Tq): base-2 log-sum-exp of the scaled scores, +inf for rows with no key
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_mt,
    H, TQ, TK,
    qk_scale,  # softmax scale * log2(e): scores come out of one multiply already in base 2
    TQ_BUCKET, TK_BUCKET,  # power-of-two length buckets: autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64 base offsets: B*H*T*D may pass 2**31
    off_b, off_h = pid_bh // H, pid_bh % H
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    OUT += off_b * stride_ob + off_h * stride_oh
    MASK += off_b * stride_mb
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_tile(Q, rows, offs_d, stride_qt, stride_qd, TQ, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the base-2 scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, TK, BLOCK_N):
        cols = start_n + offs_n
        # Missing and masked keys get -inf *before* the row max, so they never win it and exp2 sends them to 0.
        bias = tl.where(_keys_ok(MASK, cols, TK, stride_mt, HAS_MASK), 0.0, float("-inf"))
        k = _load_tile(K, cols, offs_d, stride_kt, stride_kd, TK, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no live key so far has m = -inf; subtracting 0 instead keeps exp2 at 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, cols, offs_d, stride_vt, stride_vd, TK, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    live = l_i > 0.0  # l >= 1 whenever a row has one live key (its max term is exp2(0))
    l_safe = tl.where(live, l_i, 1.0)  # dead rows: acc is 0, keep it 0 (no 0/0) and take no log of 0
    _store_tile(OUT, acc / l_safe[:, None], rows, offs_d, stride_ot, stride_od, TQ, HEAD_DIM)
    # +inf for dead rows: the backward recomputes p = exp2(s - lse) = 0 there, so they get no gradient.
    lse = tl.where(live, m_i + tl.log2(l_safe), float("inf"))
    tl.store(LSE + pid_bh * TQ + rows, lse, mask=rows < TQ)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,  # (B, H, Tq, D) through their strides
    DELTA,  # fp32 (B, H, Tq): rowsum(dO * O), the softmax-backward correction
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, TQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = pid_bh // H, pid_bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh, rows, offs_d, stride_ot, stride_od, TQ, HEAD_DIM)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh, rows, offs_d, stride_dot, stride_dod, TQ, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * TQ + rows, delta, mask=rows < TQ)


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune("dkdv")})
@triton.jit(do_not_specialize=["TQ_BUCKET", "TK_BUCKET"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # (B, H, T, D) through their strides
    MASK,  # uint8 (B, Tk); unused unless HAS_MASK
    LSE, DELTA,  # fp32 (B, H, Tq) from the forward and the delta kernel
    DK, DV,  # (B, H, Tk, D) views of (B, Tk, H, D) memory
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_mb, stride_mt,
    H, TQ, TK,
    sm_scale, qk_scale,
    TQ_BUCKET, TK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program owns a block of keys and sweeps every query block: dV = Pᵀ dO, dK = scale · dSᵀ Q.
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = pid_bh // H, pid_bh % H
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    # dK and dV share one layout (both allocated (B, Tk, H, D)).
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dkb + off_h * stride_dkh
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    # Masked keys had p = 0 in the forward, so their P and dS columns are zeroed; rows past Tk are never stored.
    ok = _keys_ok(MASK + off_b * stride_mb, cols, TK, stride_mt, HAS_MASK)
    k = _load_tile(K, cols, offs_d, stride_kt, stride_kd, TK, HEAD_DIM)
    v = _load_tile(V, cols, offs_d, stride_vt, stride_vd, TK, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, TQ, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(Q, rows, offs_d, stride_qt, stride_qd, TQ, HEAD_DIM)
        do = _load_tile(DO, rows, offs_d, stride_dot, stride_dod, TQ, HEAD_DIM)
        # Query rows past Tq read lse = +inf, hence p = 0: they add nothing.
        lse = tl.load(LSE + pid_bh * TQ + rows, mask=rows < TQ, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * TQ + rows, mask=rows < TQ, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M): scores transposed
        p_t = tl.where(ok[:, None], tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    _store_tile(DK, dk * sm_scale, cols, offs_d, stride_dkt, stride_dkd, TK, HEAD_DIM)
    _store_tile(DV, dv, cols, offs_d, stride_dkt, stride_dkd, TK, HEAD_DIM)


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune("dq")})
@triton.jit(do_not_specialize=["TQ_BUCKET", "TK_BUCKET"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # (B, H, T, D) through their strides
    MASK,  # uint8 (B, Tk); unused unless HAS_MASK
    LSE, DELTA,  # fp32 (B, H, Tq)
    DQ,  # (B, H, Tq, D) view of (B, Tq, H, D) memory
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_mb, stride_mt,
    H, TQ, TK,
    sm_scale, qk_scale,
    TQ_BUCKET, TK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program owns a block of queries and sweeps every key block: dQ = scale · dS K, dS = P ∘ (dO Vᵀ − delta).
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = pid_bh // H, pid_bh % H
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DQ += off_b * stride_dqb + off_h * stride_dqh
    MASK += off_b * stride_mb
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_tile(Q, rows, offs_d, stride_qt, stride_qd, TQ, HEAD_DIM)
    do = _load_tile(DO, rows, offs_d, stride_dot, stride_dod, TQ, HEAD_DIM)
    lse = tl.load(LSE + pid_bh * TQ + rows, mask=rows < TQ, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * TQ + rows, mask=rows < TQ, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, TK, BLOCK_N):
        cols = start_n + offs_n
        ok = _keys_ok(MASK, cols, TK, stride_mt, HAS_MASK)
        k = _load_tile(K, cols, offs_d, stride_kt, stride_kd, TK, HEAD_DIM)
        v = _load_tile(V, cols, offs_d, stride_vt, stride_vd, TK, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.where(ok[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    _store_tile(DQ, dq * sm_scale, rows, offs_d, stride_dqt, stride_dqd, TQ, HEAD_DIM)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops so torch.compile(fullgraph=True) traces through them
# ---------------------------------------------------------------------------------------------------------------------


def _meta(q: torch.Tensor, mask: torch.Tensor | None):
    """Kernel arguments shared by every launch: mask pointer/strides and the compile-time switches."""
    d = q.shape[3]
    # A bool tensor is one byte per element; the uint8 view is read as 0/1 without a copy.
    m = mask.view(torch.uint8) if mask is not None else q
    mask_strides = tuple(mask.stride()) if mask is not None else (0, 0)
    constexprs = dict(
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_MASK=mask is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for fp16/bf16 operands
    )
    return m, mask_strides, constexprs


def _bucket(t: int) -> int:
    return triton.next_power_of_2(max(t, 1))


@torch.library.triton_op("kernels::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, tq, d = q.shape
    tk = k.shape[2]
    if b * h * tq == 0 or tk == 0:  # nothing to launch (and no empty-tensor pointers): no keys -> zeros
        return q.new_zeros(b, tq, h, d), q.new_full((b, h, tq), float("inf"), dtype=torch.float32)
    out = q.new_empty(b, tq, h, d)  # (B, Tq, H, D): heads side by side, so the caller's merge is a free reshape
    lse = q.new_empty(b, h, tq, dtype=torch.float32)
    o = out.transpose(1, 2)
    m, mask_strides, constexprs = _meta(q, mask)
    grid = lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), b * h)  # noqa: E731
    with cuda_device_guard(q):
        torch.library.wrap_triton(_attn_fwd_kernel)[grid](
            q, k, v, m, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *mask_strides,
            h, tq, tk, scale * _LOG2E, _bucket(tq), _bucket(tk), **constexprs,
        )
    return out, lse


@torch.library.triton_op("kernels::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, tq, d = q.shape
    tk = k.shape[2]
    if b * h * tq == 0 or tk == 0:  # no query rows or no keys: every gradient is zero (or empty)
        return q.new_zeros(b, tq, h, d), k.new_zeros(b, tk, h, d), v.new_zeros(b, tk, h, d)
    dq, dk, dv = q.new_empty(b, tq, h, d), k.new_empty(b, tk, h, d), v.new_empty(b, tk, h, d)
    dq_, dk_, dv_ = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    delta = torch.empty_like(lse)
    m, mask_strides, constexprs = _meta(q, mask)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    tail = (h, tq, tk, scale, scale * _LOG2E, _bucket(tq), _bucket(tk))
    block_m = 64
    grid_q = lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), b * h)  # noqa: E731
    grid_k = lambda meta: (triton.cdiv(tk, meta["BLOCK_N"]), b * h)  # noqa: E731
    with cuda_device_guard(q):
        torch.library.wrap_triton(_attn_bwd_delta_kernel)[(triton.cdiv(tq, block_m), b * h)](
            out, do, delta, *out.stride(), *do.stride(), h, tq,
            HEAD_DIM=d, BLOCK_D=constexprs["BLOCK_D"], BLOCK_M=block_m,
        )
        torch.library.wrap_triton(_attn_bwd_dkdv_kernel)[grid_k](
            q, k, v, do, m, lse, delta, dk_, dv_, *common, *dk_.stride(), *mask_strides, *tail, **constexprs,
        )
        torch.library.wrap_triton(_attn_bwd_dq_kernel)[grid_q](
            q, k, v, do, m, lse, delta, dq_, *common, *dq_.stride(), *mask_strides, *tail, **constexprs,
        )
    return dq, dk, dv


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any strides, but a unit head-dim stride is what makes their loads coalesced; copy only if not.
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def attention_fwd(q, k, v, scale: float, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, H, Tq, D) as a view of (B, Tq, H, D) memory, lse fp32 (B, H, Tq) in base 2."""
    out, lse = _attention_fwd_op(_unit_last(q), _unit_last(k), _unit_last(v), mask, scale)
    return out.transpose(1, 2), lse


def attention_bwd(do, q, k, v, out, lse, scale: float, mask=None):
    """-> dq, dk, dv, each (B, H, T, D) as a view of (B, T, H, D) memory."""
    do = _unit_last(do.to(q.dtype))
    dq, dk, dv = _attention_bwd_op(do, q, k, v, out, lse, mask, scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd and the direct Triton entry point
# ---------------------------------------------------------------------------------------------------------------------


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, mask):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        out, lse = attention_fwd(q, k, v, scale, mask)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, out, lse, ctx.scale, mask)
        return dq, dk, dv, None, None


def attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v with the Triton kernels. q (B, H, Tq, D), k/v (B, H, Tk, D) -> (B, H, Tq, D)."""
    _check(q, k, v, scale, key_padding_mask)
    check_kernel_dtype("attention", q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # Empty B/H/Tq give empty results and Tk = 0 gives zeros: the launchers return those without a launch.
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return AttentionFunction.apply(q, k, v, scale, key_padding_mask)
    return attention_fwd(q, k, v, scale, key_padding_mask)[0]
