"""Which attention kernel configs to try and keep: the tile tables, the prune model with its measured spill tables,
each arch's shared-memory budget, the head-dim split, and the measured choices the launchers make from them (which
archs and head dims take the sm_90 forward, the delta kernel's rows, the fused backward's starved corner).

The kernels, launchers, autograd Function and public op are `crossflow_kernels.attention`, which imports this module
(never the other way). Every measured exclusion names the committed compile report under `benchmarks/results/` it
comes from (`REPORTS`; `tests/crossflow_kernels/test_attention_tuning.py` checks that each cited report exists and
shows the spill).
"""
from __future__ import annotations

from crossflow_kernels._triton import triton
from crossflow_kernels._utils import autotune_configs

# The committed compile reports (benchmarks/results/) that the measured tables below cite, by short name: the first
# that shows each spill (`python -m benchmarks.compile_report`, compiled on a CPU for each arch).
REPORTS = {
    "full-3.9": "2026-12-01_compile-report_triton-3.9.0.json",  # every kernel, sm_80 and sm_90
    "full-3.6": "2026-12-02_compile-report_triton-3.6.0_pre-fix.json",
    "masked-3.6": "2026-12-02_compile-report_triton-3.6.0_attention-masked-subset.json",
    "fused-tiles": "2026-12-02_compile-report_fused-bwd-tiles_triton-3.9.0+3.6.0.json",  # every fused tile, unpruned
    "t257-3.9": "2026-12-06_compile-report_triton-3.9.0_attention-sm100-sm120-t257_pre-fix.json",
    "t257-3.6": "2026-12-06_compile-report_triton-3.6.0_attention-sm100-sm120-t257_pre-fix.json",
    "t77-3.9": "2026-12-06_compile-report_triton-3.9.0_attention-t77_pre-fix.json",
    "t77-3.6": "2026-12-06_compile-report_triton-3.6.0_attention-t77_pre-fix.json",
    "sm100-3.9": "2026-12-06_compile-report_triton-3.9.0_sm90-forward-sm100_pre-fix.json",
    "sm100-3.6": "2026-12-06_compile-report_triton-3.6.0_sm90-forward-sm100_pre-fix.json",
    "lens-3.9": "2026-12-06_compile-report_triton-3.9.0_attention-lens_pre-fix.json",  # key lengths, T = 77 / 257
    "lens-3.6": "2026-12-06_compile-report_triton-3.6.0_attention-lens_pre-fix.json",
    # the same after the exclusions above: sm_100's fused d128 backward fell back to 32x32 tiles, which spilled
    "lens-3.6b": "2026-12-06_compile-report_triton-3.6.0_attention-lens_pre-fix-2.json",
}

def _split_head_dim(d: int) -> tuple[int, int]:
    """(D0, D1): power-of-two parts covering head dim `d`, D1 = 0 for one part.

    D0 is the largest power of two <= d, D1 the smallest power of two covering the rest, but at least 16 (tl.dot's
    smallest contraction on triton 3.6): 72 -> 64+16, 80 -> 64+16, 96 -> 64+32, 48 -> 32+16, 40 -> 32+16. A split that
    saves nothing over the next power of two is not made (24 -> 32: a 16-bit MMA contracts 16 lanes at a time anyway).
    """
    full = max(16, triton.next_power_of_2(d))
    d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d0
    if rest <= 0:
        return full, 0
    d1 = max(16, triton.next_power_of_2(rest))
    return (d0, d1) if d0 + d1 < full else (full, 0)


def _target_arch() -> int | None:
    """The CUDA arch Triton compiles for now (90 for sm_90), read from its active driver: on a GPU the current device,
    which the launchers set to the tensors' own (`cuda_device_guard`); in the compile report the target it stands in
    for. None when unknown: the interpreter or a machine without a GPU driver (no active driver), or not CUDA."""
    try:
        target = triton.runtime.driver.active.get_current_target()
    except (RuntimeError, AttributeError, ImportError):  # "0 active drivers" under the interpreter / without a GPU
        return None
    arch = getattr(target, "arch", None)
    return arch if getattr(target, "backend", None) == "cuda" and isinstance(arch, int) else None


def _prune(kind: str):
    """Keep the configs that compile without spills on the target arch at this head-dim split, dtype and mask; for
    16-bit inputs prefer those whose dots can be wgmma on sm_90 (an M side of at least 64 rows).

    The target is Triton's active one (`_target_arch`): sm_80 and sm_90 each drop their own measured spillers, so an
    sm_80 spill does not cost sm_90 a wgmma tile; any other or unknown target (the interpreter) drops both sets.
    Fitted to `ptxas -v` over every config x head dims 24..256 x both targets (triton 3.9, checked on 3.6). 16-bit:
    a budget of fp32 values live per thread (accumulators, score tiles, resident operands), the largest that compiled
    spill-free less a margin. fp32 runs its dots on the FMA units with IEEE precision, where small spills come and go
    with no simple rule: each fp32 tile carries the padded head dims at which it was measured spill-free.
    """

    def prune(configs, named_args, **kwargs):
        return _prune_for(kind, configs, {**named_args, **kwargs}, _target_arch())

    return prune


def _prune_for(kind: str, configs, args: dict, arch: int | None) -> list:
    """`_prune(kind)` for an explicit target arch (None: unknown, the union of every arch's exclusions)."""
    dp, split = args["D0"] + args["D1"], args["D1"] > 0
    fp32 = args["DOT_PRECISION"] == "ieee"  # "ieee" is used exactly for fp32 inputs
    # None (not given): match masked and unmasked exclusions alike; key lengths: "lens" (`_mask_matches`)
    masked = "lens" if args.get("KEY_LENS") else args.get("HAS_MASK")
    archs = _SPILL_ARCHS.get(arch, tuple(_PTXAS_SPILLS))
    elt = 4 if fp32 else 2
    fits, fast = [], []
    for c in configs:
        bm, bn, st, warps = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, c.num_warps
        tile = (bm, bn, warps, st)
        if (tile in _FP32_TILES[kind]) != fp32:
            continue  # each dtype class tunes over its own tiles
        if kind == "fwd":  # resident Q; pipelined K, V; the O accumulator and the S/P tile
            smem, mma_m = (bm + st * 2 * bn) * dp * elt, bm
            live = bm * dp + bm * bn + bm * dp * elt // 4
        elif kind == "dkdv":  # resident K, V; pipelined Q, dO; dK, dV accumulators; P and dS tiles
            smem, mma_m = (2 * bn + st * 2 * bm) * dp * elt, bn
            live = 2 * bn * dp + 2 * bn * bm + bn * dp * elt // 2
        elif kind == "dq":  # resident Q, dO; pipelined K, V; the dQ accumulator; P and dS tiles
            smem, mma_m = (2 * bm + st * 2 * bn) * dp * elt, bm
            live = bm * dp + 2 * bm * bn + bm * dp * elt // 2
        else:  # fused: dK/dV's residents, accumulators and tiles plus the (BLOCK_M, D) dQ partial; its dQ dot has M =
            # BLOCK_M, the others BLOCK_N
            smem, mma_m = (2 * bn + st * 2 * bm) * dp * elt, min(bm, bn)
            live = 2 * bn * dp + 2 * bn * bm + bn * dp * elt // 2 + bm * dp
        threads = 32 * warps
        ok = dp in _FP32_TILES[kind][tile] if fp32 else live <= _REG_BUDGET[kind] * threads
        ok = ok and not any(_spills(a, kind, dp, split, masked, tile) for a in archs)
        # At least two elements per thread in every tile load, or it would be one-element (scalar) loads.
        ok = ok and min(bm, bn) * (args["D1"] or args["D0"]) >= 2 * threads
        if ok and smem <= _smem_budget(arch):
            fits.append(c)
            if not fp32 and mma_m >= 64:
                fast.append(c)
    # Never prune to nothing: fall back to the config with the smallest tiles (the last one, by construction).
    return fast or fits or [configs[-1]]


def _mask_matches(m, masked) -> bool:
    """Does a table entry's mask class `m` (True, False, "lens" or None: any) apply to a launch's (`masked`: True,
    False, "lens", or None: unknown)? The key-lengths kernels read no mask: unmasked entries apply to them too."""
    return m is None or masked is None or m == masked or (masked == "lens" and m is False)


def _spills(arch: int, kind: str, dp: int, split: bool, masked, tile: tuple) -> bool:
    """Did ptxas for sm_<arch> spill this tile although it is within budget (measured)?"""
    for k, d, m, t in _PTXAS_SPILLS[arch]:
        if k == kind and d in (dp, None) and t == tile and _mask_matches(m, masked):
            return True
    # sm_80, split head dims: the dK/dV 64-row 8-warp tile spills 12 B (any mask; REPORTS["full-3.9"]).
    if arch == 80 and kind == "dkdv" and split and tile[0] == 64 and tile[2] == 8:
        return True
    # The fused backward at the split head dims of 64+16 and 64+32 lanes (10 dots, K/V/dK/dV in two parts each): on
    # sm_80 every tile but the 16-query ones spills (4 B to 13 KB), on sm_90 every one below 64x64 (4-550 B;
    # REPORTS["fused-tiles"]).
    if kind == "fused" and split and dp >= 80:
        return tile[0] > 16 if arch == 80 else min(tile[:2]) < 64
    return False


# fp32 values per thread, per kernel, for 16-bit inputs.
_REG_BUDGET = {"fwd": 192, "dkdv": 160, "dq": 224, "fused": 208}
# arch -> (kind, padded head dim or None for any, mask class (True / False / "lens": key lengths) or None for any,
# tile) where ptxas spills a few to 92
# bytes although the tile is within budget, measured (compile report of 2026-12-01, triton 3.9, and 3.6's ptxas 12.8).
# sm_80 caps registers for occupancy or runs out of its 255 where sm_90's wgmma keeps the accumulators elsewhere: the
# forward's 64x64 4-warp tile (4 B at 96-168 registers, head dims 32-96), and the masked kernels, which hold the mask
# tile beside P and dS (dQ at 48/80/96/128 lanes up to 92 B, dK/dV at 64/96 lanes). sm_90: one fp32 dQ tile. The fused
# backward holds the most (K, V, dK, dV, Q, dO, P, dS and a dQ partial): its own entries below. Each entry maps to the
# `REPORTS` name of the committed report that shows the spill (None: measured before reports were committed).
_PTXAS_SPILLS = {
    80: {
        ("fwd", None, None, (64, 64, 4, 3)): "full-3.9",
        ("fwd", 64, True, (128, 128, 8, 3)): "full-3.9",
        ("dkdv", 80, None, (32, 64, 8, 2)): None,  # triton 3.6 only: 4 B at 255 registers (2026-12-01)
        # triton 3.6's ptxas 12.8 only (4-16 B, reports of 2026-12-02: the masked subset and the full matrix):
        ("dkdv", 32, True, (32, 128, 4, 3)): "full-3.6",
        ("dq", 32, True, (128, 32, 4, 3)): "full-3.6",
        ("dq", 48, None, (32, 32, 8, 2)): "full-3.6",  # fp32 (FMA)
        ("dkdv", 64, True, (32, 64, 8, 2)): "masked-3.6",
        ("dkdv", 80, True, (32, 128, 8, 3)): "masked-3.6",
        ("dq", 80, True, (64, 64, 4, 3)): "masked-3.6",
        ("dq", 96, True, (64, 16, 4, 2)): "masked-3.6",
        ("dkdv", 64, True, (32, 64, 4, 3)): "full-3.9",
        ("dkdv", 64, True, (64, 64, 8, 3)): "full-3.9",
        ("dkdv", 64, True, (32, 128, 8, 3)): "full-3.9",
        ("dkdv", 96, True, (32, 64, 8, 2)): "full-3.9",
        ("dq", 48, True, (128, 32, 4, 3)): "full-3.9",
        ("dq", 48, True, (128, 64, 8, 3)): "full-3.9",
        ("dq", 48, True, (64, 64, 4, 3)): "full-3.9",
        ("dq", 80, True, (128, 32, 4, 3)): "full-3.9",
        ("dq", 96, True, (64, 64, 4, 3)): "full-3.9",
        ("dq", 128, True, (128, 64, 8, 3)): "full-3.9",
        ("dq", 128, True, (64, 64, 4, 3)): "full-3.9",
        # The fused backward, beyond `_spills`' split-dim rule (4-1600 B; every candidate tile compiled unpruned, fp16,
        # triton 3.9 and 3.6: results/2026-12-02_compile-report_fused-bwd-tiles_triton-3.9.0+3.6.0.json):
        ("fused", 32, False, (64, 64, 4, 2)): "fused-tiles",
        ("fused", 48, None, (64, 64, 4, 2)): "fused-tiles",
        ("fused", 48, None, (64, 128, 8, 2)): "fused-tiles",
        ("fused", 48, None, (64, 32, 4, 2)): "fused-tiles",
        ("fused", 48, False, (64, 32, 8, 2)): "fused-tiles",
        ("fused", 64, None, (64, 64, 4, 2)): "fused-tiles",
        ("fused", 64, None, (64, 64, 8, 2)): "fused-tiles",
        ("fused", 64, None, (64, 128, 8, 2)): "fused-tiles",
        ("fused", 64, True, (64, 32, 4, 2)): "fused-tiles",
        ("fused", 128, True, (64, 64, 8, 2)): "fused-tiles",
        ("fused", 128, True, (64, 32, 4, 2)): "fused-tiles",
        ("fused", 128, True, (16, 32, 8, 1)): "fused-tiles",
        ("fused", 32, True, (16, 16, 2, 1)): "fused-tiles",  # fp32 (FMA), 12 B at head dim 32 (not 24), triton 3.9
        # T = 257 (not a multiple of 16), masked (2026-12-06: 8-12 B on 3.6 and 3.9, 20 B on 3.9):
        ("dkdv", 80, True, (32, 64, 4, 3)): "t257-3.6",
        ("dq", 80, True, (128, 64, 8, 3)): "t257-3.9",
        ("fused", 128, True, (32, 32, 4, 1)): "t257-3.9",
        # The Text VE at T = 77, masked (B, T, H, D) views (2026-12-06: 4-60 B on 3.9, the 60 B one on 3.6 too):
        ("dq", 64, True, (64, 16, 8, 2)): "t77-3.9",
        ("dq", 96, True, (128, 64, 8, 3)): "t77-3.9",
        ("dkdv", 64, "lens", (64, 64, 8, 3)): "lens-3.6",  # key lengths, T = 77: 8 B at 255 registers (3.6)
    },
    90: {
        ("dq", 48, True, (32, 32, 8, 2)): "full-3.9",  # fp32 (FMA), 4 B
        # T = 257, masked (2026-12-06, triton 3.9: 12 and 92 B at 255 registers):
        ("fwd", 80, True, (128, 128, 8, 3)): "t257-3.9",
        ("dkdv", 128, True, (64, 64, 8, 3)): "t257-3.9",
        ("dkdv", 96, True, (64, 64, 8, 3)): "t77-3.9",  # T = 77 (the Text VE), masked: 8 B at 255 registers (3.9)
        # The fused backward (4-96 B, same measurements):
        ("fused", 48, None, (64, 32, 4, 2)): "fused-tiles",
        ("fused", 128, None, (64, 32, 4, 2)): "fused-tiles",
        ("fused", 48, True, (16, 32, 4, 1)): "fused-tiles",
        ("fused", 64, True, (16, 32, 4, 1)): "fused-tiles",
        ("fused", 32, False, (16, 16, 4, 1)): "fused-tiles",  # fp32 (FMA), 16 B at head dim 32 (not 24)
        # Key lengths (T = 77 and 257, 16-bit, 2026-12-06: 88 B at 255 registers, 3.9):
        ("dkdv", 128, "lens", (64, 64, 8, 3)): "lens-3.9",
    },
    # Measured on the subset d72/d128, 16-bit, fused qkv with a mask, T = 256 and 257 (2026-12-06, 3.6 and 3.9):
    # 4-112 B, nearly all at 255 registers.
    100: {
        ("fwd", 80, True, (128, 128, 8, 3)): "t257-3.9",
        ("fwd", 128, True, (64, 32, 8, 2)): "t257-3.6",
        ("dkdv", 128, True, (64, 64, 8, 3)): "t257-3.6",
        ("fused", 48, True, (64, 64, 8, 2)): "t77-3.9",  # T = 77 (the Text VE): 8 B (3.9)
        # Key lengths (T = 77 and 257, 16-bit, 2026-12-06: 4-12 B at 128 registers, 3.9):
        ("fused", 48, "lens", (64, 64, 8, 2)): "lens-3.9",
        ("fwd", 64, "lens", (128, 64, 8, 3)): "lens-3.9",
        ("dq", 128, "lens", (128, 64, 8, 3)): "lens-3.9",
        ("dkdv", 80, "lens", (32, 128, 8, 3)): "lens-3.9",
        ("fwd", 96, "lens", (128, 64, 8, 3)): "lens-3.6",  # 4-12 B on 3.6
        ("dkdv", 96, "lens", (32, 64, 8, 2)): "lens-3.6",
        ("fused", 128, "lens", (64, 64, 8, 2)): "lens-3.6",
        ("fused", 128, "lens", (32, 32, 8, 1)): "lens-3.6b",  # 8-20 B (3.6)
        ("fused", 128, "lens", (32, 32, 4, 1)): "lens-3.6b",
    },
    120: {
        ("fwd", 80, True, (128, 64, 8, 3)): "t257-3.9",
        ("dkdv", 80, True, (32, 64, 4, 3)): "t257-3.9",
        ("dq", 80, True, (64, 32, 4, 3)): "t257-3.9",
        ("fused", 128, True, (32, 32, 8, 1)): "t257-3.6",
        # T = 77 (the Text VE), masked: 20-40 B, 40 at 255 registers (3.9):
        ("dkdv", 48, True, (32, 64, 4, 3)): "t77-3.9",
        ("dkdv", 48, True, (32, 128, 8, 3)): "t77-3.9",
        ("dq", 64, True, (64, 16, 8, 2)): "t77-3.9",
        # Key lengths (T = 77 and 257, 16-bit, 2026-12-06: 16-128 B at 255 registers, 3.9):
        ("dkdv", 64, "lens", (64, 64, 8, 3)): "lens-3.9",
        ("dq", 64, "lens", (128, 32, 4, 3)): "lens-3.9",
        ("dq", 96, "lens", (64, 64, 4, 3)): "lens-3.9",
        ("dq", 80, "lens", (128, 32, 4, 3)): "lens-3.9",
        ("dq", 80, "lens", (64, 64, 4, 3)): "lens-3.9",
        ("fwd", 128, "lens", (64, 32, 8, 2)): "lens-3.6",  # 8-28 B on 3.6
        ("dq", 128, "lens", (64, 32, 4, 3)): "lens-3.6",
    },
}
# arch -> the spill tables its prune applies: sm_80 and sm_90 their own (the full matrix measured); sm_100 and sm_120,
# measured on a subset (the compile reports of 2026-12-06), their own plus both of those; any other arch every table.
_SPILL_ARCHS = {80: (80,), 90: (90,), 100: (100, 90, 80), 120: (120, 90, 80)}
# Shared memory per block (KB) that a kernel may ask for, per arch: 163 on sm_80/87, 227 on sm_90/100/103, but only
# 99 on the consumer parts (sm_86, sm_89, sm_120/121: RTX 30xx/40xx/50xx).
_SMEM_PER_BLOCK_KB = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 103: 227, 120: 99, 121: 99}


def _smem_budget(arch: int | None) -> int:
    """Bytes of the portable kernels' estimated tile footprint allowed on sm_<arch>: 160 KB where a block may have 163
    or more (sm_90's wgmma staging uses more than the estimate), 96 KB on the 99 KB parts; an unknown arch gets the
    smallest."""
    kb = _SMEM_PER_BLOCK_KB.get(arch, min(_SMEM_PER_BLOCK_KB.values()))
    return min(160, kb - 3) * 1024


def _configs(*tile_lists) -> list[triton.Config]:
    tiles = [t for tl_ in tile_lists for t in tl_]
    return autotune_configs(
        [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s) for bm, bn, w, s in tiles]
    )


# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M tiles queries, BLOCK_N keys. The first entry is the one the
# interpreter runs (one config only). 16-bit inputs tune over the tensor-core tiles, fp32 over its own small tiles
# (IEEE fp32 dots run on the FMA units), each limited to the head dims where it was measured spill-free. The last
# entry, the smallest tile, is the fallback when nothing else fits.
_FWD_TILES = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 1),
              (32, 16, 8, 1)]
_DKDV_TILES = [(32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 8, 3), (32, 128, 8, 3), (32, 64, 8, 2),
               (16, 32, 4, 1), (16, 32, 8, 1)]
# The fused backward: keys on the M side of dK/dV's dots, queries on dQ's, so wgmma wants both >= 64.
# Measured on both archs and triton versions: 128-query tiles and 3 stages spilled nearly everywhere (dropped).
_FUSED_TILES = [(64, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2), (32, 64, 4, 2),
                (64, 32, 4, 2), (32, 32, 8, 1), (16, 32, 8, 1), (32, 32, 4, 1), (16, 32, 4, 1)]
_DQ_TILES = [(64, 32, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 16, 4, 2), (64, 16, 8, 2),
             (32, 16, 4, 1), (32, 16, 8, 1)]
# fp32 tile -> the padded head dims (D0 + D1) at which it compiled spill-free on sm_90 and sm_80 (triton 3.9 at all
# of _MEASURED, 3.6 at 32/64/80/128: REPORTS["full-3.9"], ["full-3.6"], ["fused-tiles"]). ptxas's occupancy
# heuristic spills a few bytes at scattered widths (the 32x32 forward tile at 64+16 on 3.6), so the sets are measured,
# not derived; other widths fall back to the last tile.
_MEASURED = frozenset({32, 48, 64, 80, 96, 128, 256})
_FP32_TILES = {
    "fwd": {(32, 32, 8, 2): _MEASURED - {80}, (16, 16, 4, 1): _MEASURED},
    "dkdv": {(16, 16, 4, 1): _MEASURED},
    "dq": {(32, 32, 8, 2): _MEASURED, (32, 16, 4, 2): _MEASURED, (16, 32, 4, 2): _MEASURED,
           (16, 16, 4, 1): _MEASURED - {256}},
    # The fused backward, measured at head dims up to 128 only: 16x16 with 4 warps spills 8 B on sm_90 at 64+16 lanes,
    # with 2 warps nowhere (the fallback, last).
    "fused": {(16, 16, 4, 1): _MEASURED - {80, 256}, (16, 16, 2, 1): _MEASURED - {256}},
}
_FWD_CONFIGS = _configs(_FWD_TILES, _FP32_TILES["fwd"])
_DKDV_CONFIGS = _configs(_DKDV_TILES, _FP32_TILES["dkdv"])
_DQ_CONFIGS = _configs(_DQ_TILES, _FP32_TILES["dq"])
_FUSED_CONFIGS = _configs(_FUSED_TILES, _FP32_TILES["fused"])


# The sm_90 forward's tiles (BLOCK_M, BLOCK_N, num_warps, num_stages): num_warps is per consumer group; the first
# entry is the interpreter's. Every tile has BLOCK_M >= 64 (wgmma's M); shared memory is `_prune_sm90`'s check,
# spills and lowering the compile report's (cases `attention/*-sm90`).
# No 64-row tile: under Triton's warp specialization both consumer warp groups computed the same 64 rows and stored
# the same tile (all the work twice; TTGIR of triton 3.6 and 3.9), and the compile report flags any that do.
_FWD_SM90_TILES = [(128, 64, 4, 2), (128, 128, 4, 2), (128, 64, 4, 3)]
_FWD_SM90_CONFIGS = _configs(_FWD_SM90_TILES)
# The archs this kernel runs on (`_fwd_kernel_for`: capability major 9 and 10), each with its budget for resident Q
# plus the K/V ring (of 227 KB per block, leaving room for the barriers and the layout conversions).
_SM90_SMEM_BUDGET = {90: 200 * 1024, 100: 200 * 1024}
# arch -> {(padded head dim, HAS_MASK or None for either, tile): the `REPORTS` name} that ptxas spills although
# within budget, measured (compile reports of 2026-12-06, triton 3.6 and 3.9). On sm_100 (tcgen05 + TMEM): the
# 3-stage 128x64 tile at 80/96 lanes (4 B, 3.6), every tile at 128 lanes (320-328 B), and with a mask every (64-key)
# tile from 48 lanes on (20-928 B, 3.9), where the launcher keeps the portable kernel (`_SM90_MAX_LANES`).
_SM90_SPILLS = {
    90: {},
    100: {
        (80, None, (128, 64, 4, 3)): "sm100-3.6",
        (96, None, (128, 64, 4, 3)): "sm100-3.6",
        **{(128, None, t): "sm100-3.9" for t in _FWD_SM90_TILES},
        **{(dp, True, t): "sm100-3.9" for dp in (48, 64, 80, 96) for t in ((128, 64, 4, 2), (128, 64, 4, 3))},
    },
}
# Padded head dims (D0 + D1) up to which `auto` takes the sm_90 kernel, per capability major: (unmasked, masked).
_SM90_MAX_LANES = {9: (128, 128), 10: (96, 32)}


def _prune_sm90(configs, named_args, **kwargs):
    return _prune_sm90_for(configs, {**named_args, **kwargs}, _target_arch())


def _prune_sm90_for(configs, args: dict, arch: int | None) -> list:
    """`_prune_sm90` for an explicit target arch (None: unknown, the strictest budget and every spill table)."""
    dp = args["D0"] + args["D1"]
    elt = 2  # fp16 / bf16
    archs = (arch,) if arch in _SM90_SMEM_BUDGET else tuple(_SM90_SMEM_BUDGET)
    budget = min(_SM90_SMEM_BUDGET[a] for a in archs)
    fits = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        tile = (bm, bn, c.num_warps, c.num_stages)
        # Resident Q, a ring of num_stages K and V tiles (the launcher takes this kernel at padded head dims <= 128).
        if (bm + c.num_stages * 2 * bn) * dp * elt > budget:
            continue
        # Measured: with a mask, Triton's warp specialization pass fails on the 128-key tile ("unsupported load type
        # for producer commit", triton 3.6 and 3.9, every head dim).
        if args.get("HAS_MASK", True) and bn > 64:
            continue
        masked = "lens" if args.get("KEY_LENS") else args.get("HAS_MASK")
        if any(d == dp and t == tile and _mask_matches(m, masked)
               for a in archs for d, m, t in _SM90_SPILLS[a]):
            continue
        fits.append(c)
    return fits or [configs[-1]]


def _sm90_kernel_arch(capability: tuple[int, int]) -> bool:
    """Does `auto` take the sm_90 forward on a GPU of this capability? Major 9 (H100/H200) and 10 (B200/GB200, where
    it lowers to tcgen05 + TMEM + TMA), not 12 (RTX 50xx: mma.sync, 99 KB of shared memory per block, where its tiles
    spill and its 128-row tiles do not fit) nor anything older."""
    return capability[0] in (9, 10)


def _delta_block_m(lanes: int) -> int:
    """Query rows per program of the delta kernel (not autotuned) at `lanes` padded head-dim lanes. 16 from 128 lanes
    on: 64 and 32 rows x 128 lanes spilled 36 / 20 B on sm_100 (triton 3.9; T = 257); 32 from 64 lanes on: 64 rows x
    64 lanes spilled 8 / 20 B on sm_100 (3.9; the Text VE at T = 77), 32 rows none on sm_80/90/100/120
    (REPORTS["t257-3.9"], ["t77-3.9"])."""
    return 16 if lanes >= 128 else 32 if lanes >= 64 else 64


def _fused_starved(d: int, arch: int) -> bool:
    """Would the fused backward run on tiles far smaller than the split pair's? On sm_80 (any arch below 90) at the
    split head dims of 64+16 and 64+32 lanes only its 16-query tiles compile spill-free (`_spills`, measured), where
    the pair keeps 32- and 64-row tiles; sm_90 keeps 64x64 wgmma tiles there. Until a GPU run compares the two, `auto`
    keeps the pair in that corner."""
    d0, d1 = _split_head_dim(d)
    return arch < 90 and d1 > 0 and d0 + d1 >= 80
