"""The compile report in CI: every Triton kernel of the quick subset compiled for sm_90 on this CPU machine, and each
(kernel, case) checked for spills and scalar hot loads in every config its autotune prune keeps. Plus unit tests of the
artefact parsers on small synthetic PTX / TTGIR / LLVM IR / ptxas snippets.

The report runs in a subprocess: this test session has `TRITON_INTERPRET=1` (tests/conftest.py), under which the
kernels are interpreted, not compiled. Figures are compile-time facts, not speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.compile_report import parse as P

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _report(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.compile_report", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _pairs():
    """(kernel, case) pairs of the quick subset, discovered by driving the ops (no compile); or the skip reason."""
    r = _report("--quick", "--list", timeout=300)
    if r.returncode == 1 and "compile_report: error:" in r.stderr:  # this triton cannot compile for CUDA here
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=r.stderr.strip().splitlines()[-1]))]
    if r.returncode:
        raise RuntimeError(f"compile_report --list failed:\n{r.stderr[-3000:]}")
    return [pytest.param(k, c, id=f"{c}::{k}") for k, c in json.loads(r.stdout)]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("compile_report") / "quick.json"
    r = _report("--quick", "--jobs", "2", "--no-table", "--json", str(path))
    assert r.returncode == 0, f"compile_report --quick failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    doc = json.loads(path.read_text())
    assert doc["archs"] == [90] and doc["rows"], doc.get("summary")
    return doc


@pytest.mark.slow  # its module fixture compiles the whole --quick matrix (about a minute on 2 cores)
@pytest.mark.parametrize("kernel,case", _pairs())
def test_kernel_case_compiles_clean_on_sm90(quick_report, kernel, case):
    """Every config the prune keeps: compiles, 0 spill bytes, no hot (Q/K/V/dO, x/y rows) load of one element."""
    from benchmarks.compile_report.report import problems

    rows = [r for r in quick_report["rows"] if r["kernel"] == kernel and r["case"] == case]
    assert rows, f"no compiled config for {kernel} in {case}"
    bad = [r for r in rows if problems(r)]
    if bad:
        pytest.fail(f"{kernel} {case} on sm_90 (triton {quick_report['triton']}), {len(bad)} of {len(rows)} kept "
                    "configs fail:\n" + "\n".join(
                        f"  {r['config']}: {'; '.join(problems(r))} (regs {r.get('registers')}, narrowest hot loads "
                        f"{r.get('hot_load_min_bytes')} B)" for r in bad), pytrace=False)


# ---------------------------------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------------------------------

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_attn_bwd_dkdv_kernel' for 'sm_90a'
ptxas info    : Function properties for _attn_bwd_dkdv_kernel
    168 bytes stack frame, 168 bytes spill stores, 200 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 168 bytes cumulative stack size, 560 bytes cmem[0]
"""


def test_ptxas_log():
    assert P.parse_ptxas_log(PTXAS_LOG) == dict(registers=255, stack_bytes=168, spill_store_bytes=168,
                                                spill_load_bytes=200, static_smem_bytes=0)
    clean = PTXAS_LOG.replace("168 bytes spill stores, 200", "0 bytes spill stores, 0").replace("255", "96")
    assert P.parse_ptxas_log(clean)["spill_store_bytes"] == 0 and P.parse_ptxas_log(clean)["registers"] == 96
    with pytest.raises(ValueError):
        P.parse_ptxas_log("ptxas fatal")


def test_ptx_access_widths():
    assert P.access_width("ld.global.v4.b32") == 16
    assert P.access_width("ld.global.L1::evict_last.v2.b32") == 8
    assert P.access_width("ld.global.b16") == 2
    assert P.access_width("st.global.v4.b16") == 8
    ptx = """
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	@%p2 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
	ld.global.b16 { %rs2 }, [ %rd3 + 0 ];  // ld.global.v4.b32 in a comment does not count
	cp.async.cg.shared.global [ %r5 + 0 ], [ %rd4 + 0 ], 0x10, %r6;
	cp.async.ca.shared.global [ %r7 + 0 ], [ %rd5 + 0 ], 4, %r8;
	cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r9], [%rd6, {%r1, %r2}], [%r10];
	cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r9], [%rd6, {%r1, %r2}], [%r10];
	cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd6, {%r1, %r2}], [%r11];
	wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f1}, %rd7, %rd8, 1, 1, 1, 0, 1;
	mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f2};
	@%p3 st.global.v4.b32 [ %rd9 + 0 ], { %r1, %r2, %r3, %r4 };
"""
    m = P.ptx_memory(ptx)
    assert m["ld_global"] == {"2": 2, "16": 1}
    assert m["st_global"] == {"16": 1}
    assert m["cp_async"] == {"4": 1, "16": 1}
    assert (m["tma_load"], m["tma_store"], m["wgmma"], m["mma_sync"]) == (2, 1, 1, 1)  # 3.6 and 3.9 TMA spellings


TTGIR = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 64, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [2, 2], instrShape = [16, 8]}>
module {
    %1 = ttng.warp_group_dot %a, %b, %c {inputPrecision = 0 : i32} : !ttg.memdesc<64x64xf16, #shared, #smem> * !ttg.memdesc<64x64xf16, #shared1, #smem> -> tensor<64x64xf32, #mma>
    %2 = tt.dot %d, %e, %f : tensor<32x64xf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 2}>> * tensor<64x32xf16, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 2}>> -> tensor<32x32xf32, #mma1>
    %3 = tt.dot %g, %h, %i, inputPrecision = ieee : tensor<32x64xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<64x32xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<32x32xf32, #blocked>
    %4 = ttg.async_copy_global_to_local %p, %buf mask %m : tensor<64x64x!tt.ptr<f16>, #blocked> -> <64x64xf16, #shared, #smem, mutable>
    ttg.warp_specialize(%x)
}
"""


def test_ttgir_dot_lowering_and_features():
    assert P.ttgir_dots(TTGIR) == {"wgmma": 1, "mma_sync": 1, "fma": 1}
    assert P.ttgir_features(TTGIR) == dict(async_copies=1, tma_loads=0, warp_specialized=True)


def test_dot_shapes_and_head_dim_padding():
    assert P.ttgir_dot_shapes(TTGIR) == [[64, 64, 64], [32, 32, 64], [32, 32, 64]]
    # Head dim 72 padded to 128: Q K^T is (BM, BN, 128), P V is (BM, 128, BN).
    assert P.head_dim_padding([[64, 32, 128], [64, 128, 32]], 64, 32, 72) == round(128 / 72, 4)
    # Split 64 + 16: two dots per logical matmul; overhead 80/72.
    assert P.head_dim_padding([[64, 32, 64], [64, 32, 16], [64, 64, 32], [64, 16, 32]], 64, 32, 72) == round(80 / 72, 4)
    assert P.head_dim_padding([[64, 64, 64], [64, 64, 64]], 64, 64, 64) == 1.0
    assert P.head_dim_padding([], 64, 64, 64) is None


TTIR = 'tt.func public @k(%Q: !tt.ptr<f16> {tt.divisibility = 16 : i32} loc("Q"(#loc)), %arg1: !tt.ptr<f32> ' \
       'loc("LSE"(#loc)), %n: i32 loc("N"(#loc))) attributes {noinline = false} {'

LLIR = r"""
define ptx_kernel void @k(ptr addrspace(1) %0, ptr addrspace(1) readnone captures(none) %1, i32 %2, ptr addrspace(1) %3) {
  %5 = getelementptr i16, ptr addrspace(1) %0, i64 %4
  br label %loop
loop:
  %6 = phi ptr addrspace(1) [ %5, %entry ], [ %7, %loop ]
  %7 = getelementptr i8, ptr addrspace(1) %6, i64 144
  %8 = tail call { i32, i32, i32, i32 } asm sideeffect "mov.u32 $0, $4;\0A\09@$9 ld.global.v4.b32 { $0, $1, $2, $3 }, [ $8 + 0 ];", "=r,=r,=r,=r,r,r,r,r,l,b"(i32 0, i32 0, i32 0, i32 0, ptr addrspace(1) %7, i1 true)
  %9 = tail call i16 asm sideeffect "mov.u16 $0, 0x0;\0A\09ld.global.b16 { $0 }, [ $1 + 0 ];", "=c,l"(ptr addrspace(1) %6)
  %10 = select i1 %c, ptr addrspace(1) %1, ptr addrspace(1) %1
  %11 = load float, ptr addrspace(1) %10, align 4
  tail call void asm sideeffect "cp.async.cg.shared.global [ $0 + 0 ], [ $1 + 0 ], 0x10, $2;", "r,l,r"(ptr addrspace(3) %s, ptr addrspace(1) %5, i32 16)
  store <4 x i32> %v, ptr addrspace(1) %10, align 16
  ret void
}
"""


def test_llir_accesses_attributed_to_arguments():
    names = P.ttir_arg_names(TTIR)
    assert names == ["Q", "LSE", "N"]
    got = {(a["kind"], a["bytes"], tuple(a["args"])): a["sites"] for a in P.llir_accesses(LLIR, names)}
    assert got == {("ld", 16, ("Q",)): 1, ("ld", 2, ("Q",)): 1, ("ld", 4, ("LSE",)): 1, ("cp_async", 16, ("Q",)): 1,
                   ("st", 16, ("LSE",)): 1}


def test_occupancy():
    # 255 regs x 4 warps: 8 warps of 8192 registers fit 65536 -> 2 blocks = 8 warps; smem is not the limit.
    assert P.occupancy(90, 255, 4, 48 * 1024) == dict(blocks_per_sm=2, warps_per_sm=8, limiter="registers")
    # 96 KB of smem leaves room for 2 blocks on sm_90 (228 KB) but 1 on sm_80 (164 KB).
    assert P.occupancy(90, 64, 4, 96 * 1024)["blocks_per_sm"] == 2
    assert P.occupancy(80, 64, 4, 96 * 1024) == dict(blocks_per_sm=1, warps_per_sm=4, limiter="smem")
    assert P.occupancy(80, 32, 4, 200 * 1024)["blocks_per_sm"] == 0


def test_hot_load_verdict():
    from benchmarks.compile_report.report import problems

    row = dict(case="attention/d72-fp16-qkv", spill_store_bytes=0, spill_load_bytes=0, hot_scalar=["Q"])
    assert problems(row) == ["scalar load Q"]
    assert problems(dict(row, hot_scalar=[], spill_store_bytes=8, spill_load_bytes=8)) == ["spill 8B"]
    assert problems(dict(row, hot_scalar=[])) == []
    assert problems(dict(error="CompilationError: x")) == ["error"]


@pytest.mark.parametrize("argv", [["--arch", "70"], ["--arch", "x"], ["--jobs", "0"], ["--filter", "("]])
def test_cli_usage_errors_exit_2(argv, capsys):
    from benchmarks.compile_report.report import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_refuses_the_interpreter(monkeypatch):
    from benchmarks.compile_report.report import check_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET" in check_backend()


PLAN_PER_ARCH = """
import json
from benchmarks.compile_report import report as C
case = next(c for c in C.matrix(False) if c.name == "attention/d64-fp16-qkv-mask")
stubs, _, _ = C.plan([case], (90, 80))
kept = {}
for s in stubs:
    if s["kernel"] == "_attention_bwd_dkdv_kernel":
        tile = [s["config"][k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")]
        kept.setdefault(s["arch"], []).append(tile)
print(json.dumps(kept))
"""


def test_plan_prunes_per_arch():
    # The kernels' prunes read the target arch from Triton's active driver: the report must prune once per arch with
    # that arch active (masked d64 dK/dV: sm_80 drops three tiles that spill there, sm_90 keeps them for wgmma).
    r = subprocess.run([sys.executable, "-c", PLAN_PER_ARCH], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kept = {int(a): {tuple(t) for t in ts} for a, ts in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    assert set(kept) == {80, 90} and kept[80] and kept[90]
    # sm_80 falls back to small tiles there (every larger one spilled on 3.6 or 3.9); sm_90 keeps its wgmma tiles.
    assert kept[80] != kept[90] and (32, 64, 4, 3) in kept[90] - kept[80]


WS_TTGIR = """\
    ttg.warp_specialize(%TQ, %OUT) attributes {requestedRegisters = array<i32: 232, 232>}
    default {
      ttg.warp_yield
    }
    partition0(%TQ_0: i32, %arg33: !ttg.memdesc<64x64xf16>) num_warps(4) {
        %s = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<64x64xf16> * !ttg.memdesc<64x64xf16> -> tensor<64x64xf32, #mma>
      ttng.async_tma_copy_local_to_global %o_d0_34[%start_m, %c0_i32_19] %57 : !tt.tensordesc<64x64xf16>
    }
    partition1(%TQ_0: i32, %arg33: !ttg.memdesc<64x64xf16>) num_warps(4) {
        %s = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<64x64xf16> * !ttg.memdesc<64x64xf16> -> tensor<64x64xf32, #mma>
      ttng.async_tma_copy_local_to_global %o_d0_34[{row}, %c0_i32_19] %57 : !tt.tensordesc<64x64xf16>
    }
"""


def test_ws_partitions_that_store_the_same_rows_fail():
    # The sm_90 forward's 64-row tile under Triton's warp specialization: both consumer partitions store the tile at
    # start_m (all work twice); a 128-row tile's second partition stores at start_m + 64 (%54 in the TTGIR).
    from benchmarks.compile_report.report import problems

    assert P.ws_shared_rows(WS_TTGIR.replace("{row}", "%start_m")) == ["%o_d0[%start_m] x2"]
    assert P.ws_shared_rows(WS_TTGIR.replace("{row}", "%54")) == []
    assert P.ws_shared_rows(TTGIR) == []
    row = dict(case="attention/d64-fp16-qkv-sm90", arch=90, spill_store_bytes=0, spill_load_bytes=0, hot_scalar=[],
               ws_shared_rows=["%o_d0[%start_m] x2"])
    assert problems(row) == ["WS partitions share rows %o_d0[%start_m] x2"]
    assert problems(dict(row, arch=120, spill_store_bytes=436, spill_load_bytes=436)) == []  # sm_120: report-only


def test_matrix_runs_the_text_ve_at_t77():
    # T = 77 as the model runs it: the Text VE's attention of every 77-token preset (CLIP and T5 widths), masked,
    # 16-bit, its (B, T, H, D) views, and its sm_90 forward on the archs `auto` takes it on; not in the CI subset.
    from benchmarks.compile_report import report as C
    from crossflow.config import CONFIGS, CrossFlowConfig

    dims, heads = set(), set()
    for name in CONFIGS:
        cfg = CrossFlowConfig.from_name(name)
        if cfg.source == "text" and cfg.text_len == 77:
            widths = ([cfg.ve_width] if cfg.ve_layers else []) + [cfg.ve_width >> i for i in range(cfg.ve_reductions)]
            dims |= {w // cfg.ve_heads for w in widths}
            heads.add(cfg.ve_heads)
    assert dims == set(C.TEXT_VE_DIMS) and heads == {C.TEXT_VE_HEADS}
    cases = {c.name: c.params for c in C.matrix(False)}
    for d in C.TEXT_VE_DIMS:
        for dt in ("fp16", "bf16"):
            p = cases[f"attention/d{d}-{dt}-bthd-mask-t77"]
            assert (p["t"], p["h"], p["mask"], p["layout"], p.get("fwd")) == (77, 8, True, "bthd", None)
            p = cases[f"attention/d{d}-{dt}-bthd-mask-t77-sm90"]
            assert (p["t"], p["fwd"], p["only_archs"]) == (77, "sm90", (90, 100) if d <= 32 else (90,))
    assert not any("t77" in c.name for c in C.matrix(True))
