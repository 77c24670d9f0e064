"""Profiler ranges that cost nothing when profiling is off.

``CROSSFLOW_KERNELS_NVTX`` (read at call time, so a profiling script can set it after import):
  * unset / "0" -- off: `nvtx_range` returns one shared no-op context.
  * "1" / "nvtx" -- NVTX ranges from the `nvtx` package, for Nsight Systems (`nsys profile -t cuda,nvtx`). The
    package is used rather than `torch.cuda.nvtx`, which raises on CPU-only torch builds.
  * "torch" -- `torch.profiler.record_function` ranges with the same names, for a `torch.profiler` trace where nsys is
    missing.
Range names are hierarchical: ``crossflow/step{i}``, ``crossflow/block{i}``, ``kernels/<op>``.
"""

from __future__ import annotations

import contextlib
import os

_OFF = contextlib.nullcontext()


def nvtx_mode() -> str:
    mode = os.environ.get("CROSSFLOW_KERNELS_NVTX", "0").strip().lower()
    return {"": "off", "0": "off", "1": "nvtx", "nvtx": "nvtx", "torch": "torch"}.get(mode, "off")


def nvtx_range(name: str):
    """A context manager marking `name` on the profiler timeline (a shared no-op when profiling is off)."""
    mode = nvtx_mode()
    if mode == "off":
        return _OFF
    if mode == "torch":
        import torch

        return torch.profiler.record_function(name)
    try:
        import nvtx
    except ImportError as e:  # asked for explicitly, so say why it cannot be honoured
        raise RuntimeError("CROSSFLOW_KERNELS_NVTX=1 needs the `nvtx` package (pip install nvtx)") from e
    return nvtx.annotate(name)
