"""Helpers shared by the benchmark suites, the profiler script and the report.

Nothing here touches a device at import time: CUDA is probed inside functions, and `crossflow_kernels`, `triton` and
`crossflow` are imported lazily, so `benchmarks/conftest.py` (and `profile_sampler.py`) can switch the Triton
interpreter on first.

Timers: on CUDA, `triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])` (CUDA events, L2 flushed between reps); on
CPU (the tiny smoke), `time.perf_counter` around each call. Every result records which one (`timer`).
"""

from __future__ import annotations

import datetime as _dt
import functools
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------------------
# Device, versions, timers
# ---------------------------------------------------------------------------------------------------------------------


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine() or 'unknown'}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def results_path(what: str) -> Path:
    """benchmarks/results/<YYYY-MM-DD>_<device-name-slug>_<what>.json (UTC date)."""
    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return RESULTS_DIR / f"{day}_{slug(device_name())}_{slug(what)}.json"


def env_info() -> dict[str, Any]:
    import triton

    return {"device_name": device_name(), "torch": torch.__version__, "triton": triton.__version__}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
    """pytest-benchmark times on the host, so the timed callable waits for the GPU work it queued."""

    def run():
        out = fn()
        sync()
        return out

    return run


def measure(fn: Callable[[], Any], reps: int = 5) -> dict[str, Any]:
    """p50/p20/p80 milliseconds of `fn` (already warmed up by the caller)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms_p50": p50, "ms_p20": p20, "ms_p80": p80, "timer": "do_bench"}
    ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else ms * 9
    return {"ms_p50": statistics.median(ms), "ms_p20": q[1], "ms_p80": q[7], "timer": "perf_counter"}


def measure_limits(tiny: bool) -> dict[str, Any]:
    """The device's practical limits, measured now: a device-to-device copy (GB/s, bytes read + written) and a
    bf16 matmul (TFLOP/s, 2·M·N·K). On CPU (smoke only) an fp32 copy and matmul stand in, and say so."""
    dev, cuda = device(), torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    n_copy = (1 << 29) if cuda and not tiny else (1 << 22)  # 1 GiB of bf16 on a GPU; 16 MiB fp32 on a CPU
    n_mm = 8192 if cuda and not tiny else 512
    src = torch.randn(n_copy, device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    a = torch.randn(n_mm, n_mm, device=dev, dtype=dtype)
    b = torch.randn(n_mm, n_mm, device=dev, dtype=dtype)
    for f in (lambda: dst.copy_(src), lambda: a @ b):  # warm-up (cuBLAS handle, heuristics)
        f()
    sync()
    copy = measure(lambda: dst.copy_(src))
    mm = measure(lambda: a @ b)
    copy_bytes, mm_flops = 2 * src.numel() * src.element_size(), 2 * n_mm**3
    return {
        "copy_gbps": copy_bytes / (copy["ms_p50"] * 1e-3) / 1e9, "copy_bytes": copy_bytes, "copy_ms": copy,
        "matmul_tflops": mm_flops / (mm["ms_p50"] * 1e-3) / 1e12, "matmul_shape": [n_mm] * 3, "matmul_ms": mm,
        "dtype": str(dtype).replace("torch.", ""), "timer": copy["timer"],
        "note": "" if cuda else "CPU smoke: fp32 copy/matmul on the CPU, not a GPU limit",
        **env_info(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Shapes: realistic DiT operating points (batch B before the CFG doubling) and the tiny CPU set
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchShape:
    model: str  # "xl256" = DiT-XL/2 at 256 px, "xl512" = DiT-XL/2 at 512 px, "h512" = CrossFlow DiT-H/2 512 px
    batch: int  # images; model ops see 2B rows (cond + uncond in one forward)
    hidden: int
    heads: int
    tokens: int
    latent: tuple[int, int, int]  # (C, H, W) of one image latent: the Euler update's operand

    @property
    def id(self) -> str:
        return f"{self.model}-b{self.batch}"

    @property
    def rows(self) -> tuple[int, int, int]:  # (2B, T, C) activations of the norm ops
        return (2 * self.batch, self.tokens, self.hidden)

    @property
    def attn(self) -> tuple[int, int, int, int]:  # (2B, H, T, D)
        return (2 * self.batch, self.heads, self.tokens, self.hidden // self.heads)

    @property
    def image(self) -> tuple[int, int, int, int]:  # (B, C, H, W)
        return (self.batch, *self.latent)


_MODELS = {
    "xl256": dict(hidden=1152, heads=16, tokens=256, latent=(4, 32, 32)),  # head dim 72
    "xl512": dict(hidden=1152, heads=16, tokens=1024, latent=(4, 64, 64)),
    "h512": dict(hidden=1280, heads=20, tokens=1024, latent=(4, 64, 64)),  # head dim 64
    "tiny": dict(hidden=64, heads=2, tokens=16, latent=(4, 8, 8)),  # head dim 32; interpreter-sized
}
_BATCHES = {"xl256": (1, 8, 64), "xl512": (1, 8, 32), "h512": (1, 8, 32), "tiny": (1,)}


def kernel_shapes(tiny: bool, only: list[str] | None = None) -> list[BenchShape]:
    models = ["tiny"] if tiny else ["xl256", "xl512", "h512"]
    shapes = [BenchShape(m, b, **_MODELS[m]) for m in models for b in _BATCHES[m]]
    if only:
        unknown = sorted(set(only) - {s.id for s in shapes})
        if unknown:
            raise ValueError(f"unknown --bench-shapes {unknown}; known: {[s.id for s in shapes]}")
        shapes = [s for s in shapes if s.id in only]
    return shapes


# ---------------------------------------------------------------------------------------------------------------------
# The model side (imported lazily: the kernel suite never depends on it)
# ---------------------------------------------------------------------------------------------------------------------


def crossflow_api() -> SimpleNamespace:
    """CrossFlowConfig, FlowTransformer, EulerSampler and FastSampler (None when missing) from `crossflow`; falls
    back to the defining modules while the package's top-level exports are being written."""
    import importlib

    import crossflow

    where = {"CrossFlowConfig": "crossflow.config", "FlowTransformer": "crossflow.models.model",
             "EulerSampler": "crossflow.sampling", "FastSampler": "crossflow.fast_sampler"}
    api = {}
    for name, module in where.items():
        obj = getattr(crossflow, name, None)
        if obj is None:
            try:
                obj = getattr(importlib.import_module(module), name, None)
            except ImportError:
                obj = None
        api[name] = obj
    missing = [n for n, o in api.items() if o is None and n != "FastSampler"]
    if missing:
        raise ImportError(f"crossflow does not provide {missing} yet")
    return SimpleNamespace(**api)


def build_flow(preset: str, dtype: torch.dtype, seed: int = 0) -> tuple[Any, torch.nn.Module]:
    """(cfg, flow network) with random weights, built directly on the device, eval mode, no grads: the DiT
    `FlowTransformer` or, for a DiMR preset, `DiMRFlow` (`crossflow.models.model.build_flow`).

    Every parameter is redrawn from N(0, 0.02): adaLN-Zero's init zeroes the output, which is a degenerate field."""
    from crossflow.models.model import build_flow as build

    cfg = crossflow_api().CrossFlowConfig.from_name(preset)
    torch.manual_seed(seed)
    with torch.device(device()):
        model = build(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return cfg, model.to(dtype).eval().requires_grad_(False)


def flow_flops_per_forward(cfg: Any, batch: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one FlowTransformer forward on `batch` latents.

    Per sample, T tokens, width D, depth L, MLP width M, patch p, latent channels C:
      patch embed 2·T·(C·p²)·D; timestep MLP 2·(256·D + D²); adaLN linear 2·D·(6L + 2)·D;
      per block: qkv 2·T·D·3D, proj 2·T·D², MLP 2·2·T·D·M, attention 4·T²·D (QKᵀ and PV);
      final linear 2·T·D·(p²·C).
    Elementwise ops, norms and softmax are not counted. For DiT-XL/2 at 256 px this gives 118.6 G multiply-adds per
    image, the DiT paper's "118.6 Gflops". A CFG sampling step costs flow_flops_per_forward(cfg, 2B).
    DiMR (Transformer and ConvNeXt stages, PixelShuffle, skips) is counted by `torch.utils.flop_counter` on one forward
    on the meta device: matmuls, convolutions (the depthwise ones included) and attention, the same classes of op.
    """
    if getattr(cfg, "backbone", "dit") == "dimr":
        return batch * counted_flops_per_sample(cfg)
    T, D, L, M = cfg.num_tokens, cfg.hidden_size, cfg.depth, cfg.mlp_hidden
    patch = cfg.patch_size**2 * cfg.latent_channels
    block = 2 * T * D * 3 * D + 2 * T * D * D + 2 * 2 * T * D * M + 4 * T * T * D
    per_sample = 2 * T * patch * D + 2 * (256 * D + D * D) + 2 * D * (6 * L + 2) * D + L * block + 2 * T * D * patch
    return batch * per_sample


@functools.lru_cache(maxsize=None)
def counted_flops_per_sample(cfg: Any) -> int:
    """FLOPs of one flow forward on one latent as `torch.utils.flop_counter` counts them, on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from crossflow.models.model import build_flow as build

    with torch.device("meta"):
        flow = build(cfg)
        x = torch.empty(1, *cfg.latent_shape)
        t, ind = torch.full((1,), 0.5), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            flow(x, t, ind)
    return int(counter.get_total_flops())
