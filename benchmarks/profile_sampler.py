"""A short sampler workload for profiling that shows the `crossflow_kernels.nvtx_range` ranges (NVTX or record_function).

Runs eagerly (FastSampler(use_cuda_graph=False) when it has that option, else EulerSampler on the Triton backend):
inside a replayed CUDA graph there are no per-step, per-block or per-op ranges. One warm-up run first (Triton autotune,
cuBLAS heuristics), then the profiled run:
  --cuda-profiler-range  brackets the profiled run with cudaProfilerStart/Stop (`nsys --capture-range=cudaProfilerApi`)
  --emit-nvtx            turns torch.profiler ranges (CROSSFLOW_KERNELS_NVTX=torch) into NVTX ranges, for nsys without `nvtx`
  --torch-profiler PATH  runs it under torch.profiler, writes a Chrome trace (JSON) to PATH and prints the top ops
Without CUDA it runs the Triton kernels in the interpreter on the `tiny` preset (the CPU smoke).

  python -m benchmarks.profile_sampler --preset dit-xl-2 --batch 8 --steps 5 --torch-profiler trace.json
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import time

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dit-xl-2" if cuda else "tiny")
    p.add_argument("--batch", type=int, default=8 if cuda else 1)
    p.add_argument("--steps", type=int, default=5 if cuda else 2)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16" if cuda else "fp32")
    p.add_argument("--cuda-profiler-range", action="store_true")
    p.add_argument("--emit-nvtx", action="store_true")
    p.add_argument("--torch-profiler", metavar="PATH", default=None)
    p.add_argument("--rows", type=int, default=25, help="rows of the torch.profiler table")
    return p.parse_args(argv)


def make_sampler(steps: int, guidance: float):
    """(sampler, backend context, description): eager so that every range is recorded."""
    import crossflow_kernels
    from benchmarks._common import crossflow_api

    api = crossflow_api()
    fast = api.FastSampler
    if fast is not None and "use_cuda_graph" in inspect.signature(fast).parameters:
        sampler = fast(steps, guidance, use_cuda_graph=False)
        return sampler, contextlib.nullcontext(), "FastSampler(use_cuda_graph=False)"
    backend = "triton" if torch.cuda.is_available() or crossflow_kernels.interpreting() else "torch"
    return api.EulerSampler(steps, guidance), crossflow_kernels.use_backend(backend), f"EulerSampler on {backend}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:  # before `crossflow_kernels` is imported: the interpreter switch is read when each kernel is defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from benchmarks._common import build_flow, sync

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg, model = build_flow(args.preset, dtype)
    sampler, backend, desc = make_sampler(args.steps, args.guidance)
    z0 = torch.randn(args.batch, *cfg.latent_shape, device=model.pos_embed.device, dtype=dtype)
    print(f"profile: {desc}, preset {args.preset}, batch {args.batch}, steps {args.steps}, {args.dtype}, "
          f"CROSSFLOW_KERNELS_NVTX={os.environ.get('CROSSFLOW_KERNELS_NVTX', '0')}, device {z0.device}")
    with backend:
        sampler(model, z0)  # warm-up: autotune and lazy init stay out of the profiled range
        sync()
        with contextlib.ExitStack() as stack:
            prof = None
            if args.torch_profiler:
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                prof = stack.enter_context(torch.profiler.profile(activities=acts))
            if args.emit_nvtx:
                stack.enter_context(torch.autograd.profiler.emit_nvtx())
            if args.cuda_profiler_range and cuda:
                torch.cuda.profiler.start()
                stack.callback(torch.cuda.profiler.stop)
            t0 = time.perf_counter()
            sampler(model, z0)
            sync()
            print(f"profiled run: {time.perf_counter() - t0:.3f} s (wall, profiler overhead included)")
    if prof is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.torch_profiler)), exist_ok=True)
        prof.export_chrome_trace(args.torch_profiler)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
        print(f"Chrome trace: {args.torch_profiler} (open in chrome://tracing or https://ui.perfetto.dev)")


if __name__ == "__main__":
    main()
