"""Compile report: what every Triton kernel becomes on sm_90 / sm_80 / sm_100 / sm_120, without a GPU.

    python -m benchmarks.compile_report [--quick] [--arch 90,80,100,120] [--filter attention] [--json PATH] [--jobs N]

How it works. The public ops (`crossflow_kernels.OPS[name].triton`) are driven with CPU tensors of the model's real
shapes, dtypes and strides (fused-qkv views, transposed (B, T, H, D) views, (B, 1, C) modulation views), forward and
autograd backward, while every Triton launch is intercepted (`JITFunction.run` / `Autotuner.run`): nothing runs, the
kernel, its bound arguments and constexprs are recorded. The kernels are found that way, never by module or function
name. Each autotuned launch is passed through the kernel's own `prune_configs_by` (`early_config_prune` / `perf_model`),
exactly as the autotuner would on a GPU, once per arch with that arch as Triton's active target (a prune may read it),
and every surviving config is compiled with Triton's own launcher path (`run(...,
warmup=True)`, so argument specialization -- 16-byte divisibility of pointers and ints -- is Triton's) against a stub
driver that reports `GPUTarget("cuda", arch, 32)`. From the artefacts:

* registers, stack, spill stores/loads: the `ptxas -v` log of Triton's own ptxas run (kept, as Triton deletes it);
* shared memory (`metadata.shared`) and occupancy (blocks and warps per SM from registers, smem and num_warps);
* each `tl.dot`: `wgmma` / `mma_sync` / `fma`, from the TTGIR (and the wgmma / mma.sync counts in the PTX);
* every global access with its width in bytes (16 = `ld.global.v4.b32`), cp.async size, TMA, attributed to the kernel
  argument it reads (pointer chains in the LLVM IR walked back to the parameters);
* num_stages, num_warps, warp specialization.

"Chosen config": without a GPU nothing can be timed, so every config that survives the prune counts as one the
autotuner may choose; a kernel passes only if all of them do. Hot loads: global loads (not cp.async/TMA, which are
16 B or bulk by construction unless narrower) from a *big* tensor argument -- a floating tensor holding at least 1/8
of the elements of the launch's largest floating tensor (attention Q/K/V/dO/O, adaLN x/y/dout rows, Euler x/v;
not LSE, statistics or modulation vectors). A hot load is *scalar* when one instruction moves one element, *narrow*
when it moves less than 16 bytes.

Cases named `attention/*-sm90` run the attention forward with `CROSSFLOW_KERNELS_ATTENTION_FWD=sm90` (the kernel an
sm_90 GPU picks: tensor descriptors, warp specialization) and are compiled for sm_90 and sm_100 only, the archs `auto`
takes it on (`--filter sm90`). Cases named `*-t257` run T = 257 (not a multiple of 16: other integer specializations),
`*-t77` the Text VE's attention (T = 77, 8 heads, masked, (B, T, H, D) views). Cases with `-lens` pass per-batch key
lengths (`key_lengths=`: the kernels' KEY_LENS variant, no byte mask) instead of a mask. sm_120 rows
are report-only (`REPORT_ONLY_ARCHS`). A warp-specialized kernel whose partitions store the same tile rows (the same
work done twice) fails (`ws_shared_rows`).

All figures are compile-time facts about the generated code, not speed measurements.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.compile_report import parse as P

RESULTS = Path(__file__).resolve().parents[1] / "results"
ARCHS = (90, 80, 100, 120)
# Reported, never failing: sm_120 (RTX 50xx) runs the portable kernels, whose prunes carry no sm_120 measurements yet.
REPORT_ONLY_ARCHS = frozenset({120})

# ---------------------------------------------------------------------------------------------------------------------
# The matrix: model shapes, dtypes, layouts
# ---------------------------------------------------------------------------------------------------------------------

# head dim -> (heads, tokens): H * D is a real model width (192 Text VE / 1152 DiT-XL / 1280 DiT-H), T the sequence.
ATTN_SHAPES = {24: (8, 77), 32: (6, 256), 48: (8, 77), 64: (20, 256), 72: (16, 256), 80: (16, 256), 96: (12, 256),
               128: (10, 256), 256: (5, 256)}
# The Text VE (T = 77 text tokens, 8 heads): its head dims on the CLIP and T5 presets (`TEXT_VE_DIMS`, cases `*-t77`).
TEXT_VE_DIMS, TEXT_VE_HEADS = (24, 32, 48, 64, 96, 128), 8
ATTN_DIMS = (24, 32, 48, 64, 72, 80, 96, 128)  # the presets' head dims; 256 (the limit) on request: --filter d256
QUICK_DIMS = (24, 72)  # the CI subset: the two head dims whose strides are not 16-byte multiples
ATTN_LAYOUTS = ("bhtd", "bthd", "qkv")  # contiguous (B,H,T,D); transposed (B,T,H,D) view; fused (B,T,3,H,D) unbound
ADALN_WIDTHS = (192, 1152, 1280, 4096)
# DiMR: (width, tokens or map side, layout) of the norms -- the transformer stage (1024 wide, 1 + 16*16 tokens) and the
# ConvNeXt maps (512 wide 32x32, 256 wide 64x64) -- and QKNorm at head dim 64 (16 heads); GEGLU hidden widths.
RMS_CASES = {1024: (257, "tokens"), 512: (32, "map"), 256: (64, "map")}
RMS_QK = (64, 16, 257)  # head dim, heads, tokens
GEGLU_CASES = {2048: 257, 1024: 32 * 32, 512: 64 * 64}  # F -> rows per sample
DTYPES = ("fp16", "bf16", "fp32")
BATCH = 2


@dataclass(frozen=True)
class Case:
    op: str  # key of crossflow_kernels.OPS
    name: str  # unique, e.g. "attention/d72-bf16-qkv-mask"
    params: dict = field(default_factory=dict, hash=False, compare=False)


def _sm90_archs(d: int, mask: bool) -> tuple[int, ...]:
    """The archs `auto` takes the sm_90 forward on at head dim d (crossflow_kernels.attention_tuning._SM90_MAX_LANES):
    sm_90, and sm_100 up to 96 lanes (32 with a byte mask; key lengths count as no mask). Padded lanes: 24 -> 32,
    48 -> 48, 72 -> 80, others d."""
    lanes = {24: 32, 72: 80}.get(d, d)
    return (90, 100) if lanes <= (32 if mask else 96) else (90,)


def matrix(quick: bool, include_256: bool = False) -> list[Case]:
    cases = []
    dims = QUICK_DIMS if quick else ATTN_DIMS + ((256,) if include_256 else ())
    dtypes = ("fp16",) if quick else DTYPES
    layouts = ("qkv",) if quick else ATTN_LAYOUTS
    for d in dims:
        for dt in dtypes:
            for lay in layouts:
                # The mask changes the code, not the tile addressing: with a mask, the model's fused-qkv layout only.
                for mask in (False, True) if lay == "qkv" and not quick else (False,):
                    name = f"attention/d{d}-{dt}-{lay}" + ("-mask" if mask else "")
                    cases.append(Case("attention", name, dict(d=d, dtype=dt, layout=lay, mask=mask)))
    # Ragged T (257 = 16x16 patches + the indicator token; the Text VE dims already run T = 77): the lengths enter as
    # integers Triton specializes on (divisible by 16 or not), so they compile to other code. Fused qkv, both masks.
    for d in (() if quick else dims):
        if ATTN_SHAPES[d][1] % 16 == 0:
            for dt in DTYPES:
                for mask in (False, True):
                    name = f"attention/d{d}-{dt}-qkv" + ("-mask" if mask else "") + "-t257"
                    cases.append(Case("attention", name, dict(d=d, dtype=dt, layout="qkv", mask=mask, t=257)))
    # T = 77 as the model runs it: the Text VE's attention over CLIP / T5 tokens (8 heads; head dims 24/48/96 on the
    # CLIP presets' widths 192/384/768, 32/64/128 on T5's 256/512/1024), masked, 16-bit, its separate W_Q/W_K/W_V
    # projections viewed (B, T, H, D) -> (B, H, T, D) ("bthd"), forward and backward; then its sm_90 forward below.
    t77 = () if quick else tuple(d for d in TEXT_VE_DIMS if d in dims)
    for d in t77:
        for dt in ("fp16", "bf16"):
            name = f"attention/d{d}-{dt}-bthd-mask-t77"
            cases.append(Case("attention", name, dict(d=d, dtype=dt, layout="bthd", mask=True, t=77,
                                                      h=TEXT_VE_HEADS)))
    # The sm_90 forward (TMA + warp specialization), forced as on an sm_90 GPU: 16-bit, the model's fused-qkv layout,
    # compiled for the archs `auto` takes it on (`only_archs`: sm_90, and sm_100 up to 96 lanes); forward only (the
    # backward kernels are the ones of the cases above). T = 257 too (TMA bounds by the per-head row count).
    for d in (QUICK_DIMS[1:] if quick else dims):
        for dt in (("fp16",) if quick else ("fp16", "bf16")):
            for mask in (False,) if quick else (False, True):
                for t in (None,) if quick or ATTN_SHAPES[d][1] % 16 else (None, 257):
                    name = f"attention/d{d}-{dt}-qkv" + ("-mask" if mask else "") + (f"-t{t}" if t else "") + "-sm90"
                    cases.append(Case("attention", name, dict(d=d, dtype=dt, layout="qkv", mask=mask, fwd="sm90",
                                                              t=t, only_archs=_sm90_archs(d, mask))))
    for d in t77:
        for dt in ("fp16", "bf16"):
            name = f"attention/d{d}-{dt}-bthd-mask-t77-sm90"
            cases.append(Case("attention", name, dict(d=d, dtype=dt, layout="bthd", mask=True, fwd="sm90", t=77,
                                                      h=TEXT_VE_HEADS, only_archs=_sm90_archs(d, True))))
    # Key lengths (`key_lengths=`, the KEY_LENS kernels: no byte mask) as the Text VE would pass them, T = 77, and
    # the ragged T = 257 on the fused-qkv layout at the DiT head dims; forward and backward, then the sm_90 forward.
    lens = [(d, "bthd", 77, TEXT_VE_HEADS) for d in t77] + [(d, "qkv", 257, None) for d in (72, 128) if d in dims
                                                            and not quick]
    for d, lay, t, h in lens:
        for dt in ("fp16", "bf16"):
            for fwd in (None, "sm90"):
                name = f"attention/d{d}-{dt}-{lay}-lens-t{t}" + ("-sm90" if fwd else "")
                extra = dict(fwd=fwd, only_archs=_sm90_archs(d, False)) if fwd else {}
                cases.append(Case("attention", name, dict(d=d, dtype=dt, layout=lay, mask=False, lens=True, t=t, h=h,
                                                          **extra)))
    widths = (1152,) if quick else ADALN_WIDTHS
    for op in ("adaln_modulate", "gated_residual_adaln"):
        for c in widths:
            for dt in (("bf16",) if quick else DTYPES):
                for mod in (("b1c",) if quick else ("bc", "b1c")):
                    for norm in (("layer", "rms") if c == 1152 and not quick else ("layer",)):
                        name = f"{op}/c{c}-{dt}-{mod}" + ("-rms" if norm == "rms" else "")
                        cases.append(Case(op, name, dict(c=c, dtype=dt, mod=mod, norm=norm)))
    for dt in (("bf16",) if quick else DTYPES):
        for c, (_, lay) in RMS_CASES.items():
            if quick and c != 1024:
                continue
            # a per-sample weight (TDRMSNorm/AdaRMSNorm on tokens), per sample and map column (AdaRMSNorm on a map)
            for w in (("sample",) if lay == "tokens" or quick else ("sample", "column")):
                cases.append(Case("rms_norm", f"rms_norm/c{c}-{dt}-{lay}-{w}", dict(c=c, dtype=dt, layout=lay, w=w)))
        cases.append(Case("rms_norm", f"rms_norm/qk-d{RMS_QK[0]}-{dt}", dict(c=RMS_QK[0], dtype=dt, layout="qk")))
        for f in ((1024,) if quick else GEGLU_CASES):
            cases.append(Case("geglu", f"geglu/f{f}-{dt}", dict(f=f, dtype=dt)))
    for op in ("euler_step", "cfg_euler_step"):
        for dt in (("bf16",) if quick else DTYPES):
            for scal in (("float",) if quick else ("float", "tensor")):
                cases.append(Case(op, f"{op}/{dt}-dt_{scal}", dict(dtype=dt, scalar=scal)))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# Driving the ops and intercepting launches
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: object  # the Autotuner / JITFunction that was launched
    args: tuple
    kwargs: dict
    autotuned: bool

    @property
    def jit(self):
        fn = self.kernel
        while not _is_jit(fn):
            fn = fn.fn
        return fn

    @property
    def name(self) -> str:
        return self.jit.fn.__name__

    @property
    def module(self) -> str:
        return self.jit.fn.__module__


def _is_jit(fn) -> bool:
    from triton.runtime.jit import JITFunction
    return isinstance(fn, JITFunction)


@contextlib.contextmanager
def intercept():
    """Record every Triton launch instead of running it."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    orig = JITFunction.run, Autotuner.run

    def jit_run(self, *args, **kwargs):
        launches.append(Launch(self, args, kwargs, False))

    def tune_run(self, *args, **kwargs):
        launches.append(Launch(self, args, kwargs, True))

    JITFunction.run, Autotuner.run = jit_run, tune_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = orig


def _dtype(name: str):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _drive(case: Case) -> None:
    """Call the op's Triton implementation forward and backward on tensors of the case's shape, dtype and strides.
    Storage is `torch.empty` (fresh allocations are 64-byte aligned, as CUDA's are); values are never read."""
    import torch

    crossflow_kernels = _import_kernels()
    p, B = case.params, BATCH
    dt = _dtype(p["dtype"])
    impl = crossflow_kernels.OPS[case.op].triton
    if case.op == "attention":
        d = p["d"]
        h, t = ATTN_SHAPES[d]
        h, t = p.get("h") or h, p.get("t") or t
        if p["layout"] == "qkv":  # the model's fused projection: (B, T, 3, H, D) -> three (B, H, T, D) views
            q, k, v = (x.transpose(1, 2) for x in torch.empty(B, t, 3, h, d, dtype=dt).unbind(2))
        elif p["layout"] == "bthd":
            q, k, v = (torch.empty(B, t, h, d, dtype=dt).transpose(1, 2) for _ in range(3))
        else:
            q, k, v = (torch.empty(B, h, t, d, dtype=dt) for _ in range(3))
        for x in (q, k, v):
            x.requires_grad_(True)
        mask = torch.ones(B, t, dtype=torch.bool) if p["mask"] else None
        lens = dict(key_lengths=torch.full((B,), t)) if p.get("lens") else {}
        out = impl(q, k, v, key_padding_mask=mask, **lens)
        if p.get("fwd"):  # a forward-kernel case: its backward launches are those of the case without the suffix
            return
        # The model merges heads with out.transpose(1, 2).reshape(B, T, H*D): its gradient arrives in that layout.
        dout = torch.empty(B, t, h, d, dtype=dt).transpose(1, 2)
        # Both backward paths: the fused kernel (the default) and the deterministic dK/dV + dQ pair (`split`).
        for path in BWD_PATHS:
            with _env(BWD_KERNEL_ENV, path):
                out.backward(dout, retain_graph=path != BWD_PATHS[-1])
    elif case.op in ("adaln_modulate", "gated_residual_adaln"):
        c, t = p["c"], 256
        x = torch.empty(B, t, c, dtype=dt, requires_grad=True)
        # adaLN-Zero: one (B, 6C) projection chunked into shift/scale/gate; (B, 1, C) when unsqueezed first.
        mod = torch.empty(B, 1, 6 * c, dtype=dt) if p["mod"] == "b1c" else torch.empty(B, 6 * c, dtype=dt)
        mod.requires_grad_(True)
        shift, scale, gate = mod.chunk(6, dim=-1)[:3]
        if case.op == "adaln_modulate":
            outs = (impl(x, shift, scale, norm=p["norm"]),)
        else:
            y = torch.empty(B, t, c, dtype=dt, requires_grad=True)
            outs = impl(x, y, gate, shift, scale, norm=p["norm"])
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
    elif case.op == "rms_norm":
        c = p["c"]
        if p["layout"] == "qk":  # q and k of the fused (B, T, 3, H, D) projection, a scalar per head
            d, h, t = RMS_QK
            qkv = torch.empty(B, t, 3, h, d, dtype=dt, requires_grad=True)
            x, w = qkv[:, :, :2], torch.empty(h, dtype=dt, requires_grad=True).view(1, h, 1).expand(2, h, 1)
        elif p["layout"] == "tokens":
            x = torch.empty(B, RMS_CASES[c][0], c, dtype=dt, requires_grad=True)
            w = torch.empty(B, 1, c, dtype=dt, requires_grad=True)
        else:  # a channel-last ConvNeXt map
            g = RMS_CASES[c][0]
            x = torch.empty(B, g, g, c, dtype=dt, requires_grad=True)
            w = torch.empty((B, 1, 1, c) if p["w"] == "sample" else (B, 1, g, c), dtype=dt, requires_grad=True)
        out = impl(x, w, 1e-6)
        out.backward(torch.empty_like(out))
    elif case.op == "geglu":
        f = p["f"]
        # fc_in's output (B, rows, 2F); the gradient comes back contiguous from fc_out's backward
        h = torch.empty(B, GEGLU_CASES[f], 2 * f, dtype=dt, requires_grad=True)
        out = impl(h)
        out.backward(torch.empty_like(out))
    elif case.op in ("euler_step", "cfg_euler_step"):
        x = torch.empty(8, 4, 32, 32, dtype=dt)
        dt_ = torch.tensor(-0.02) if p["scalar"] == "tensor" else -0.02
        with torch.no_grad():
            if case.op == "euler_step":
                impl(x, torch.empty_like(x), dt_)
            else:
                impl(x, torch.empty_like(x), torch.empty_like(x), dt_, torch.tensor(7.0) if p["scalar"] == "tensor"
                     else 7.0)
    else:
        raise ValueError(f"no driver for op {case.op!r}")


def capture(case: Case) -> list[Launch]:
    fwd = case.params.get("fwd")
    with intercept() as launches, _env(FWD_KERNEL_ENV, fwd):
        _drive(case)
    return launches


# crossflow_kernels.attention.FWD_KERNEL_ENV, named here without importing kernels
FWD_KERNEL_ENV = "CROSSFLOW_KERNELS_ATTENTION_FWD"
BWD_KERNEL_ENV = "CROSSFLOW_KERNELS_ATTENTION_BWD"  # crossflow_kernels.attention.BWD_KERNEL_ENV
BWD_PATHS = ("fused", "split")


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """Set (value) or leave alone (None) one environment variable for the block."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


# ---------------------------------------------------------------------------------------------------------------------
# Compiling for a GPU target on a CPU machine
# ---------------------------------------------------------------------------------------------------------------------


class _TargetDriver:
    """Stands in for the CUDA driver: reports the target to compile for; the device id is the arch, so Triton keeps
    one kernel cache per arch."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        try:
            from triton.backends.compiler import GPUTarget
        except ImportError:  # older layouts
            from triton.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


_PTXAS_LOG: list[str] = []


def _hook_ptxas() -> None:
    """Keep the `ptxas -v` log that Triton's compile writes to a temp file and deletes."""
    import triton.backends.nvidia.compiler as nv
    if getattr(nv.subprocess, "_compile_report", False):
        return
    real = nv.subprocess

    class _Sub:
        _compile_report = True

        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def run(cmd, *a, **kw):
            res = real.run(cmd, *a, **kw)
            f = kw.get("stderr")
            if isinstance(cmd, (list, tuple)) and "ptxas" in os.path.basename(str(cmd[0])) and hasattr(f, "name"):
                with open(f.name) as fh:
                    _PTXAS_LOG.append(fh.read())
            return res

    nv.subprocess = _Sub()


def _log_cache() -> Path:
    # v2: logs captured from Triton's own ptxas runs only
    return Path(os.environ.get("COMPILE_REPORT_CACHE", Path.home() / ".cache" / "crossflow-compile-report-v2"))


def _cached_log(md, arch: int) -> Path | None:
    h = getattr(md, "hash", None)
    return _log_cache() / f"{h}-sm{arch}.ptxas.log" if h else None


def _store_log(path: Path | None, log: str) -> None:
    if path is None:
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(log)
        os.replace(tmp, path)


@contextlib.contextmanager
def _always_compile():
    import triton
    old = triton.knobs.compilation.always_compile
    triton.knobs.compilation.always_compile = True
    try:
        yield
    finally:
        triton.knobs.compilation.always_compile = old


def _config_of(launch: Launch) -> list[tuple[dict, object]]:
    """(label, kwargs for the launch) for every config the autotuner would consider after its own prune."""
    if not launch.autotuned:
        opts = {k: launch.kwargs[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in launch.kwargs}
        return [(dict(opts, _fixed=True), {})]
    tuner = launch.kernel
    tuner.nargs = dict(zip(tuner.arg_names, launch.args))
    try:
        pruned = tuner.prune_configs(dict(launch.kwargs))
    finally:
        tuner.nargs = None
    return [(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages), c) for c in pruned]


def _launch_kwargs(launch: Launch, config) -> dict:
    kw = {k: v for k, v in launch.kwargs.items() if k not in ("grid", "warmup")}
    if config:
        kw.update(config.all_kwargs())
    return kw


def specialization_key(launch: Launch, kw: dict) -> tuple:
    """What Triton specializes a compile on (dtype and 16-byte alignment of pointers, 16-divisibility / ==1 / width of
    ints, constexpr values, options): equal keys compile to the same binary, so each is compiled once."""
    jit = launch.jit
    parts = []
    for i, a in enumerate(launch.args):
        name = jit.arg_names[i] if i < len(jit.arg_names) else i
        dns = i in jit.do_not_specialize or name in jit.do_not_specialize
        if hasattr(a, "data_ptr"):
            parts.append(("t", str(a.dtype), a.data_ptr() % 16 == 0))
        elif hasattr(getattr(a, "base", None), "data_ptr"):  # a host TensorDescriptor (TMA)
            parts.append(("desc", str(a.base.dtype), a.base.data_ptr() % 16 == 0, tuple(a.shape), tuple(a.strides),
                          tuple(getattr(a, "block_shape", ()))))
        elif isinstance(a, bool):
            parts.append(("b", a))
        elif isinstance(a, int):
            parts.append(("i", abs(a) >= 2**31) if dns else ("i", a % 16 == 0, a == 1, abs(a) >= 2**31))
        elif isinstance(a, float):
            parts.append(("f",))
        else:
            parts.append(("o", repr(a)))
    return (id(jit), tuple(parts), tuple(sorted((k, repr(v)) for k, v in kw.items())))


def _compile(launch: Launch, grid, kw: dict):
    kernel = launch.jit.run(*launch.args, grid=grid, warmup=True, **kw)
    return kernel.result() if hasattr(kernel, "result") else kernel  # an async-compile future


@contextlib.contextmanager
def active_target(arch: int):
    """Make `_TargetDriver(arch)` Triton's active driver for the block (prunes and compiles see sm_<arch>); the driver
    that was active before (or none yet) is put back."""
    from triton.runtime import driver
    old = driver._active  # not `driver.active`: on a machine without a GPU that raises ("0 active drivers")
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = old


def compile_one(launch: Launch, config, arch: int) -> dict:
    """Compile one (launch, config) for sm_<arch> and read the artefacts."""
    from triton.runtime import driver

    _hook_ptxas()
    driver.set_active(_TargetDriver(arch))
    kw = _launch_kwargs(launch, config)
    grid = launch.kwargs.get("grid", (1,))
    _PTXAS_LOG.clear()
    t0 = time.perf_counter()
    # The `ptxas -v` log is the one of Triton's own ptxas run (its flags, e.g. --regAllocOptLevel, change register
    # allocation, so ptxas is never re-run with guessed flags): captured during the compile, or, when Triton's cache
    # answered, from our cache of captured logs keyed by the kernel hash, or else by compiling again past the cache.
    try:
        kernel = _compile(launch, grid, kw)
        md = kernel.metadata
        path = _cached_log(md, arch)
        if _PTXAS_LOG:
            log = _PTXAS_LOG[-1]
        elif path is not None and path.exists():
            log = path.read_text()
        else:
            launch.jit.device_caches.pop(arch, None)  # drop Triton's in-memory cache too
            with _always_compile():
                kernel = _compile(launch, grid, kw)
            md = kernel.metadata
            if not _PTXAS_LOG:
                raise RuntimeError("no ptxas log: Triton did not run ptxas")
            log = _PTXAS_LOG[-1]
        _store_log(_cached_log(md, arch), log)
    except Exception as e:  # a compile error is a result of the report, not a crash of it
        return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500],
                    compile_s=round(time.perf_counter() - t0, 2))
    secs = time.perf_counter() - t0
    asm = kernel.asm
    res = P.parse_ptxas_log(log)
    shared = int(getattr(md, "shared", 0) or 0)
    num_warps, num_stages = int(md.num_warps), int(getattr(md, "num_stages", 0) or 0)
    names = P.ttir_arg_names(asm["ttir"])
    accesses = P.llir_accesses(asm["llir"], names)
    row = dict(
        **res,
        shared_bytes=shared,
        num_warps=num_warps,
        num_stages=num_stages,
        **P.occupancy(arch, res["registers"], num_warps, shared + res["static_smem_bytes"]),
        dots=P.ttgir_dots(asm["ttgir"]),
        dot_shapes=P.ttgir_dot_shapes(asm["ttgir"]),
        **P.ttgir_features(asm["ttgir"]),
        ws_shared_rows=P.ws_shared_rows(asm["ttgir"]),
        ptx=P.ptx_memory(asm["ptx"]),
        accesses=accesses,
        compile_s=round(secs, 2),
    )
    row.update(_hot(launch, accesses))
    return row


def big_args(launch: Launch) -> dict[str, int]:
    """Names of the launch's big floating tensor arguments (see the module doc) -> element size in bytes."""
    jit = launch.jit
    tens = {}
    for i, a in enumerate(launch.args):
        t = a if hasattr(a, "data_ptr") else getattr(a, "base", None)  # a TensorDescriptor reads its base tensor
        if hasattr(t, "data_ptr") and t.dtype.is_floating_point:
            tens[jit.arg_names[i]] = t
    if not tens:
        return {}
    top = max(t.numel() for t in tens.values())
    return {n: t.element_size() for n, t in tens.items() if t.numel() * 8 >= top}


def _hot(launch: Launch, accesses: list[dict]) -> dict:
    big = big_args(launch)
    hot = [a for a in accesses if a["kind"] in ("ld", "cp_async") and len(a["args"]) == 1 and a["args"][0] in big]
    widths = {}
    for a in hot:
        arg = a["args"][0]
        widths[arg] = min(widths.get(arg, 1 << 30), a["bytes"])
    scalar = sorted(n for n, w in widths.items() if w <= big[n])
    narrow = sorted(n for n, w in widths.items() if w < 16)
    return dict(hot_load_min_bytes=widths, hot_scalar=scalar, hot_narrow=narrow)


# ---------------------------------------------------------------------------------------------------------------------
# The run: capture every case, dedupe, compile (in parallel), rows
# ---------------------------------------------------------------------------------------------------------------------

_JOBS: list = []  # (launch, config, arch) -- read by forked workers


def _work(i: int) -> dict:
    launch, config, arch = _JOBS[i]
    try:
        return compile_one(launch, config, arch)
    except Exception as e:
        return dict(error=f"report: {type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-1500:])


def plan(cases: list[Case], archs) -> tuple[list[dict], list[tuple], list]:
    """Capture launches for every case -> (row stubs, unique compile jobs, launches-per-case info)."""
    stubs, jobs, index = [], [], {}
    for case in cases:
        try:
            launches = capture(case)
        except Exception as e:
            stubs.append(dict(op=case.op, case=case.name, kernel=None, arch=None, config=None,
                              error=f"driving the op failed: {type(e).__name__}: {e}"[:500]))
            continue
        seen = {}
        for launch in launches:
            n = seen[launch.name] = seen.get(launch.name, 0) + 1
            kname = launch.name if n == 1 else f"{launch.name}#{n}"
            total = len(launch.kernel.configs) if launch.autotuned else 1
            for arch in (a for a in archs if a in case.params.get("only_archs", archs)):
                # The prune may depend on the target (kernels read Triton's active driver): prune per arch.
                try:
                    with active_target(arch):
                        configs = _config_of(launch)
                except Exception as e:
                    stubs.append(dict(op=case.op, case=case.name, kernel=kname, module=launch.module, arch=arch,
                                      config=None, error=f"prune failed: {type(e).__name__}: {e}"[:500]))
                    continue
                for ci, (label, cfg) in enumerate(configs):
                    kw = _launch_kwargs(launch, cfg)
                    key = (specialization_key(launch, kw), arch)
                    if key not in index:
                        index[key] = len(jobs)
                        jobs.append((launch, cfg, arch))
                    stubs.append(dict(
                        op=case.op, case=case.name, kernel=kname, module=launch.module, arch=arch,
                        config={k: v for k, v in label.items() if not k.startswith("_")}, config_rank=ci,
                        configs_kept=len(configs), configs_total=total, autotuned=launch.autotuned,
                        constexprs={k: v for k, v in launch.kwargs.items() if k not in ("grid", "warmup")},
                        big_args=sorted(big_args(launch)), _job=index[key], _head_dim=case.params.get("d"),
                    ))
    return stubs, jobs, index


def run(cases: list[Case], archs, jobs_n: int = 1, progress=None) -> list[dict]:
    global _JOBS
    stubs, jobs, _ = plan(cases, archs)
    _JOBS = jobs
    results: list[dict | None] = [None] * len(jobs)
    t0 = time.time()
    if jobs_n > 1 and len(jobs) > 1:
        ctx = mp.get_context("fork")
        with cf.ProcessPoolExecutor(jobs_n, mp_context=ctx) as ex:
            futs = {ex.submit(_work, i): i for i in range(len(jobs))}
            for n, f in enumerate(cf.as_completed(futs), 1):
                results[futs[f]] = f.result()
                if progress:
                    progress(n, len(jobs), time.time() - t0)
    else:
        for i in range(len(jobs)):
            results[i] = _work(i)
            if progress:
                progress(i + 1, len(jobs), time.time() - t0)
    rows = []
    for s in stubs:
        j, d = s.pop("_job", None), s.pop("_head_dim", None)
        row = {**s, **(results[j] if j is not None else {})}
        cfg = row.get("config") or {}
        if d and row.get("dot_shapes") and "BLOCK_M" in cfg and "BLOCK_N" in cfg:
            row["head_dim_padding"] = P.head_dim_padding(row["dot_shapes"], cfg["BLOCK_M"], cfg["BLOCK_N"], d)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Verdicts, summary, table
# ---------------------------------------------------------------------------------------------------------------------


def problems(row: dict) -> list[str]:
    """What a row fails on: a compile error, a spill, a scalar hot load, warp-specialized partitions that compute the
    same rows (all work twice). Rows of a report-only arch (`REPORT_ONLY_ARCHS`) fail on nothing."""
    out = []
    if row.get("arch") in REPORT_ONLY_ARCHS:
        return out
    if row.get("error"):
        out.append("error")
        return out
    if row.get("spill_store_bytes", 0) or row.get("spill_load_bytes", 0):
        out.append(f"spill {row['spill_store_bytes']}B")
    if row.get("hot_scalar"):
        out.append("scalar load " + ",".join(row["hot_scalar"]))
    if row.get("ws_shared_rows"):
        out.append("WS partitions share rows " + ",".join(row["ws_shared_rows"]))
    return out


def _is_half(row) -> bool:
    return any(f"-{d}" in row["case"] for d in ("fp16", "bf16"))


def _pads(rows) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in rows:
        if r.get("head_dim_padding"):
            out.setdefault(int(re.search(r"/d(\d+)-", r["case"]).group(1)), []).append(r["head_dim_padding"])
    return dict(sorted(out.items()))


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r.get("error")]
    by_arch = {}
    for arch in sorted({r["arch"] for r in ok}):
        rs = [r for r in ok if r["arch"] == arch]
        spill = [r for r in rs if r["spill_store_bytes"] or r["spill_load_bytes"]]
        dots_half = [r for r in rs if _is_half(r) and sum(r["dots"].values())]
        by_arch[str(arch)] = dict(
            configs=len(rs),
            spilling_configs=len(spill),
            spilling_configs_half=sum(_is_half(r) for r in spill),
            max_spill_bytes=max((r["spill_store_bytes"] for r in rs), default=0),
            scalar_hot_load_configs=sum(bool(r["hot_scalar"]) for r in rs),
            narrow_hot_load_configs=sum(bool(r["hot_narrow"]) for r in rs),
            non_wgmma_dot_configs_half=(sum(any(k != "wgmma" for k in r["dots"]) for r in dots_half)
                                        if arch == 90 else None),  # wgmma exists on sm_90 only
            fma_dot_configs=sum("fma" in r["dots"] for r in rs),
            tma_configs=sum(bool(r["tma_loads"] or r["ptx"]["tma_load"]) for r in rs),
            warp_specialized_configs=sum(bool(r["warp_specialized"]) for r in rs),
            ws_shared_rows_configs=sum(bool(r.get("ws_shared_rows")) for r in rs),
            report_only=arch in REPORT_ONLY_ARCHS,
            max_registers=max((r["registers"] for r in rs), default=0),
            max_head_dim_padding={f"d{d}": max(pads) for d, pads in _pads(rs).items()},
        )
    failing = sorted({(r["kernel"] or "?", r["case"]) for r in rows if problems(r)})
    return dict(
        rows=len(rows),
        compile_errors=sum(bool(r.get("error")) for r in rows),
        by_arch=by_arch,
        failing_kernel_cases=[f"{k} {c}" for k, c in failing],
    )


def _dots_str(d: dict) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(d.items())) or "-"


def table(rows: list[dict], per_config: bool = False) -> str:
    """One line per (kernel, case, arch): the worst over the configs the prune keeps (per config with per_config)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["kernel"] or "?", r["arch"]), []).append(r)
    head = (f"{'case':38} {'kernel':26} {'sm':>3} {'cfg':>5} {'regs':>4} {'spill':>5} {'smem KB':>7} "
            f"{'warps/SM':>8} {'dots':14} {'pad':>4} {'hot ld B':>8} {'cp.async':>8} {'TMA':>3} {'WS':>2} "
            f"{'stg':>3}  verdict")
    lines = [head, "-" * len(head)]
    for (case, kern, arch), rs in groups.items():
        items = [[r] for r in rs] if per_config else [rs]
        for grp in items:
            good = [r for r in grp if not r.get("error")]
            verdict = sorted({p for r in grp for p in problems(r)})
            if not good:
                lines.append(f"{case:38} {kern:26} {arch or '-':>3} {'-':>5}  {grp[0].get('error', '')[:80]}")
                continue
            worst = lambda k: max(r[k] for r in good)  # noqa: E731
            hot = [w for r in good for w in r["hot_load_min_bytes"].values()]
            pads = [r["head_dim_padding"] for r in good if r.get("head_dim_padding")]
            pad = f"{max(pads):.2f}" if pads else "-"
            cfg = (f"{len(good)}/{grp[0].get('configs_total', 1)}" if not per_config else
                   "x".join(str(grp[0]["config"].get(k, "")) for k in ("BLOCK_M", "BLOCK_N") if k in grp[0]["config"])
                   or "fix")
            lines.append(
                f"{case:38} {kern:26} {arch:>3} {cfg:>5} {worst('registers'):>4} {worst('spill_store_bytes'):>5} "
                f"{worst('shared_bytes') / 1024:>7.1f} {min(r['warps_per_sm'] for r in good):>8} "
                f"{_dots_str(good[0]['dots']):14} {pad:>4} {min(hot) if hot else '-':>8} "
                f"{sum(sum(r['ptx']['cp_async'].values()) > 0 for r in good):>8} "
                f"{'y' if any(r['ptx']['tma_load'] or r['tma_loads'] for r in good) else '-':>3} "
                f"{'y' if any(r['warp_specialized'] for r in good) else '-':>2} "
                f"{'/'.join(sorted({str(r['num_stages']) for r in good})):>3}  "
                f"{'; '.join(verdict) if verdict else 'ok'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def _versions() -> dict:
    import torch
    import triton
    return dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version())


def _import_kernels():
    """`crossflow_kernels` with the real triton. On a CPU-only build of torch without the interpreter,
    `crossflow_kernels` leaves triton unloaded unless the process already imported it (`crossflow_kernels._triton`); the
    report compiles for GPU targets there."""
    import triton  # noqa: F401  (first, so that crossflow_kernels._triton takes the real one)

    import crossflow_kernels
    from crossflow_kernels._triton import LOADED, WHY_ABSENT
    if not LOADED:  # `crossflow_kernels` was imported earlier in this process, without triton
        raise RuntimeError(f"compile report: {WHY_ABSENT}")
    return crossflow_kernels


def _kernels_dir() -> Path:
    return Path(_import_kernels().__file__).resolve().parent


def _git_rev() -> str | None:
    """The commit of the tree whose `crossflow_kernels` package was reported on."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=_kernels_dir(), check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def check_backend() -> str | None:
    """Why this triton cannot produce sm_90 code here (None when it can)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set: the kernels are interpreted, not compiled; unset it"
    try:
        import triton.backends.nvidia.compiler as nv
        try:
            path = nv.get_ptxas(90).path
        except TypeError:
            path = nv.get_ptxas().path
    except Exception as e:  # no CUDA backend in this triton build
        return f"triton has no usable CUDA backend / ptxas: {type(e).__name__}: {e}"
    if not path or not os.path.exists(path):
        return f"ptxas not found at {path!r}"
    return None


def _parse_archs(s: str) -> tuple[int, ...]:
    try:
        archs = tuple(int(a) for a in s.split(",") if a.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers like 90,80, got {s!r}") from None
    bad = [a for a in archs if a not in P.SM_LIMITS]
    if bad or not archs:
        raise argparse.ArgumentTypeError(f"supported archs are {sorted(P.SM_LIMITS)}, got {s!r}")
    return archs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset (attention d 24/72 fp16 fused-qkv, bf16 "
                    "adaLN 1152, Euler; sm_90) instead of the full matrix")
    ap.add_argument("--arch", type=_parse_archs, default=None,
                    help="comma-separated SM archs (default 90,80,100,120; 90 with --quick); sm_120 is report-only")
    ap.add_argument("--filter", default="", help="regex on case names (e.g. attention, 'd72-.*qkv', adaln)")
    ap.add_argument("--json", type=Path, default=None,
                    help="output JSON (default benchmarks/results/<date>_compile-report_triton-<ver>[_quick].json)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile processes (default 1)")
    ap.add_argument("--per-config", action="store_true", help="one table line per config instead of the worst")
    ap.add_argument("--list", action="store_true", help="print the (kernel, case) pairs as JSON and compile nothing")
    ap.add_argument("--no-table", action="store_true", help="do not print the table")
    return ap


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    # One row per line: diffable between two reports, and half the size of an indented dump.
    head = json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=1, default=str)
    rows = ",\n".join(json.dumps(r, separators=(",", ":"), default=str) for r in doc.get("rows", []))
    tmp.write_text(head[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n")
    json.loads(tmp.read_text())  # verify before it replaces anything
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error("--jobs must be >= 1")
    try:
        flt = re.compile(a.filter)
    except re.error as e:
        ap.error(f"--filter is not a valid regex: {e}")
    why = check_backend()
    if why:
        print(f"compile_report: error: {why}", file=sys.stderr)
        return 1
    archs = a.arch or ((90,) if a.quick else ARCHS)
    cases = [c for c in matrix(a.quick, include_256="d256" in a.filter) if flt.search(c.name)]
    if not cases:
        ap.error(f"--filter {a.filter!r} matches no case")
    if a.list:
        pairs = []
        for c in cases:
            seen = {}
            for launch in capture(c):
                n = seen[launch.name] = seen.get(launch.name, 0) + 1
                pairs.append([launch.name if n == 1 else f"{launch.name}#{n}", c.name])
        print(json.dumps(pairs))
        return 0
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the 3.9 default, stated to silence its warning

    def progress(n, total, secs):
        if n == total or n % 10 == 0:
            print(f"\r  compiled {n}/{total} ({secs:.0f} s)", end="\n" if n == total else "", file=sys.stderr,
                  flush=True)

    t0, rev = time.time(), _git_rev()  # the commit of the kernels as imported now, before any compile
    rows = run(cases, archs, a.jobs, progress)
    summary = summarize(rows)
    vers = _versions()
    now = _dt.datetime.now(_dt.timezone.utc)
    doc = dict(
        kind="compile_report",
        date=now.isoformat(timespec="seconds"),
        **vers,
        git=rev,
        kernels=str(_kernels_dir()),
        archs=list(archs),
        quick=a.quick,
        filter=a.filter,
        seconds=round(time.time() - t0, 1),
        note="compile-time facts (registers, spills, smem, lowering, access widths), not speed measurements",
        definitions=dict(
            chosen_config="every config surviving the kernel's own prune_configs_by counts as choosable",
            hot_load="a global load from a floating tensor argument with >= 1/8 of the launch's largest tensor's "
                     "elements; scalar = one element per instruction, narrow = < 16 bytes",
            occupancy="blocks/warps per SM limited by registers (256-register warp granules), smem (+1 KB/block), "
                      "64 warps, 32 blocks",
        ),
        summary=summary,
        rows=rows,
    )
    path = a.json or RESULTS / (f"{now:%Y-%m-%d}_compile-report_triton-{vers['triton']}"
                                + ("_quick" if a.quick else "") + ".json")
    _write_json(path, doc)
    if not a.no_table:
        print(table(rows, a.per_config))
    print(json.dumps(summary["by_arch"], indent=1))
    print(f"{len(summary['failing_kernel_cases'])} (kernel, case) pairs fail (spill / scalar hot load / error); "
          f"compile errors: {summary['compile_errors']}; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
