"""`triton` and `triton.language` for the op files, imported only in a process where a Triton kernel can run.

On a CPU-only build of torch without ``TRITON_INTERPRET=1`` no Triton kernel can ever run (the interpreter switch is
read when ``@triton.jit`` runs, at import), yet ``import triton`` costs ~0.25 s, a tenth of a cold ``crossflow
sample`` there. In such a process the op files get stand-ins for the few names they use at import: ``@triton.jit``
keeps the Python function in an `UnloadedKernel` whose launch raises, ``@triton.autotune`` returns the kernel,
``triton.Config`` keeps its arguments, ``tl.constexpr(v)`` is ``v``; any other attribute raises a RuntimeError that
says why Triton is absent. The references, the dispatcher and everything `crossflow` runs on a CPU never touch them.

The real modules are imported when Triton can run here (a CUDA/ROCm build of torch, or the interpreter), when the
process has already imported triton, or with ``CROSSFLOW_KERNELS_IMPORT_TRITON=1`` (tools that compile for a GPU target
on a CPU machine, such as the compile report). Decided once, at ``import crossflow_kernels``."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import torch

from crossflow_kernels._dispatch import interpreting

WHY_ABSENT = ("Triton is not loaded in this process: this torch build has no CUDA and TRITON_INTERPRET=1 was not "
              "set before `import crossflow_kernels` (set CROSSFLOW_KERNELS_IMPORT_TRITON=1 to load it anyway, e.g. to compile for a GPU "
              "target)")


def wanted() -> bool:
    """Should the op files get the real triton? (See the module docstring.) Reads the build, makes no driver call."""
    return (interpreting() or torch.backends.cuda.is_built() or "triton" in sys.modules
            or os.environ.get("CROSSFLOW_KERNELS_IMPORT_TRITON", "0") == "1")


class UnloadedKernel:
    """A `@triton.jit` function defined while Triton is absent: it keeps the Python function; launching it raises."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        raise RuntimeError(f"cannot launch {self.fn.__name__}: {WHY_ABSENT}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"cannot call {self.fn.__name__}: {WHY_ABSENT}")


class _Config:
    """`triton.Config`'s constructor, for config lists built at import."""

    def __init__(self, kwargs: dict, num_warps: int = 4, num_stages: int = 3, **rest: Any) -> None:
        self.kwargs, self.num_warps, self.num_stages = dict(kwargs), num_warps, num_stages
        self.__dict__.update(rest)


class _Absent:
    """Stands in for a module; the names the op files use at import are set on the instance."""

    def __init__(self, name: str, **names: Any) -> None:
        self.__name__ = name
        self.__dict__.update(names)

    def __getattr__(self, attr: str):
        raise RuntimeError(f"{self.__name__}.{attr}: {WHY_ABSENT}")

    def __repr__(self) -> str:
        return f"<stand-in for {self.__name__}: Triton not loaded>"


def _jit(fn: Callable | None = None, **kwargs: Any):  # @triton.jit and @triton.jit(...): the options do not matter
    return UnloadedKernel(fn) if fn is not None else _jit


def _autotune(configs, key, **kwargs: Any) -> Callable:
    return lambda kernel: kernel


if wanted():
    import triton
    import triton.language as tl
else:
    triton = _Absent("triton", jit=_jit, autotune=_autotune, Config=_Config)
    tl = _Absent("triton.language", constexpr=lambda value: value)

LOADED = not isinstance(triton, _Absent)

__all__ = ["LOADED", "UnloadedKernel", "WHY_ABSENT", "tl", "triton", "wanted"]
