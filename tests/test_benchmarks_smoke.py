"""Fast checks of the benchmark helpers: the FLOP and byte models and the shape tables. The suites themselves are not
collected by `pytest`; their CPU smoke is `bash benchmarks/smoke.sh` (see benchmarks/README.md)."""

import math

import pytest

from benchmarks import _common
from benchmarks.bench_kernels import SPECS


def test_flow_flops_match_the_dit_paper():
    cfg = _common.crossflow_api().CrossFlowConfig.from_name("dit-xl-2")
    # DiT paper (Peebles & Xie 2023, Table 4): DiT-XL/2 at 256 px is 118.6 "Gflops", counted as multiply-adds.
    assert _common.flow_flops_per_forward(cfg, 1) / 2 == pytest.approx(118.6e9, rel=1e-3)
    assert _common.flow_flops_per_forward(cfg, 6) == 6 * _common.flow_flops_per_forward(cfg, 1)


def test_counted_flops_agree_with_the_formula_and_count_dimr():
    api = _common.crossflow_api()
    dit = api.CrossFlowConfig.from_name("dit-xl-2")
    assert _common.counted_flops_per_sample(dit) == _common.flow_flops_per_forward(dit, 1)  # the counter is sound
    dimr = api.CrossFlowConfig.from_name("dimr-256-clip")
    assert _common.flow_flops_per_forward(dimr, 4) == 4 * _common.counted_flops_per_sample(dimr)
    # By hand, the two stages' matmuls: 65 Transformer blocks (width 1024, 16x16 tokens, MLP x4) and 33 ConvNeXt
    # blocks (width 512, 32x32 positions, MLP x4); embeddings, adaLN, skips and upsampling add a few per cent.
    t, d, p, c = 256, 1024, 1024, 512
    by_hand = 65 * (24 * t * d * d + 4 * t * t * d) + 33 * 16 * p * c * c
    assert _common.flow_flops_per_forward(dimr, 1) == pytest.approx(by_hand, rel=0.05)


def test_kernel_cost_models():
    b, h, t, d = 4, 16, 256, 72
    fwd = SPECS["attention"].cost((b, h, t, d), "fwd", 2)
    assert fwd == ("flops", 4 * b * h * t * t * d)
    assert SPECS["attention"].cost((b, h, t, d), "fwd_bwd", 2)[1] == 3.5 * fwd[1]
    n, v = 2 * 256 * 1152, 2 * 1152
    assert SPECS["adaln_modulate"].cost((2, 256, 1152), "fwd", 2) == ("bytes", (2 * n + 2 * v) * 2)
    assert SPECS["gated_residual_adaln"].cost((2, 256, 1152), "fwd_bwd", 4) == ("bytes", (10 * n + 8 * v) * 4)
    assert SPECS["cfg_euler_step"].cost((8, 4, 32, 32), "fwd", 2) == ("bytes", 4 * 8 * 4096 * 2)
    # rms_norm: x and out (2N) + the (B, 1, C) weight (V); backward x, dout, dx (3N) + w, dw (2V)
    assert SPECS["rms_norm"].cost((2, 256, 1152), "fwd_bwd", 2) == ("bytes", (5 * n + 3 * v) * 2)
    # geglu on h (B, T, 2F): read h, write half of it; backward read h and dout, write dh
    assert SPECS["geglu"].cost((2, 256, 2304), "fwd", 2) == ("bytes", 1.5 * 2 * n * 2)
    assert SPECS["geglu"].cost((2, 256, 2304), "bwd", 4) == ("bytes", 2.5 * 2 * n * 4)


def test_shape_tables():
    shapes = {s.id: s for s in _common.kernel_shapes(tiny=False)}
    xl, h = shapes["xl256-b8"], shapes["h512-b32"]
    assert xl.rows == (16, 256, 1152) and xl.attn == (16, 16, 256, 72) and xl.image == (8, 4, 32, 32)
    assert h.attn == (64, 20, 1024, 64) and math.prod(h.rows) == 2 * 32 * 1024 * 1280
    assert [s.id for s in _common.kernel_shapes(tiny=True)] == ["tiny-b1"]
    with pytest.raises(ValueError, match="unknown --bench-shapes"):
        _common.kernel_shapes(tiny=False, only=["xl256-b3"])


def test_results_path_names_day_device_and_what():
    p = _common.results_path("Kernels Suite")
    assert p.parent == _common.RESULTS_DIR and p.suffix == ".json"
    day, dev, what = p.stem.split("_")
    assert len(day) == 10 and dev == _common.slug(_common.device_name()) and what == "kernels-suite"
