"""The one place where a backend is chosen for every op in `kernels`.

Backends:
  * ``torch``  -- the pure-PyTorch reference (`<op>_ref`), runs anywhere.
  * ``triton`` -- the Triton kernels; needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before
    ``kernels`` was imported (the interpreter switch is read when ``@triton.jit`` runs).
  * ``auto``   -- Triton when it can run on the given tensors, else torch. The default.

Selection: ``kernels.use_backend(name)`` (a context manager, innermost wins) overrides the ``KERNELS_BACKEND``
environment variable, read at call time. A forced ``triton`` that cannot run raises ``RuntimeError``; nothing falls
back silently. Under ``torch.compile`` the choice is made at trace time, so pick the backend before compiling.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from kernels._nvtx import nvtx_range

BACKENDS = ("auto", "torch", "triton")

# Captured at import: the interpreter is chosen per kernel when `@triton.jit` runs, which happens when the op modules
# are imported, so this is the truth about how our kernels were built.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_override: list[str] = []


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; choose one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost `use_backend`, else ``KERNELS_BACKEND``, else ``auto``."""
    if _override:
        return _override[-1]
    return _validate(os.environ.get("KERNELS_BACKEND", "auto").strip().lower() or "auto")


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed calls on backend `name` ("auto" | "torch" | "triton"); restores the previous one on exit."""
    _override.append(_validate(name))
    try:
        yield name
    finally:
        _override.pop()


def interpreting() -> bool:
    """True when our Triton kernels were built for the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRET


def triton_ok(t: torch.Tensor) -> bool:
    """Can our Triton kernels run on tensor `t`? CUDA tensors compiled, or CPU tensors interpreted."""
    if _INTERPRET:
        return t.device.type == "cpu"
    return t.is_cuda


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def op(name: str, ref: Callable, triton_impl: Callable, doc: str | None = None) -> Callable:
    """Build the public dispatching function for one op; it carries `.ref` and `.triton` twins."""

    range_name = f"kernels/{name}"

    # The twins are looked up on the function at call time, so a test (or a user) can swap one in place.
    def call(*args, **kwargs):
        with nvtx_range(range_name):
            return _dispatch(*args, **kwargs)

    def _dispatch(*args, **kwargs):
        backend = get_backend()
        if backend == "torch":
            return call.ref(*args, **kwargs)
        x = _first_tensor(args, kwargs)
        if x is None:
            raise ValueError(f"{name}: expected at least one tensor argument")
        if triton_ok(x):
            return call.triton(*args, **kwargs)
        if backend == "triton":
            where = "CPU tensors need TRITON_INTERPRET=1 set before `import kernels`" if x.device.type == "cpu" else (
                "the interpreter (TRITON_INTERPRET=1) only runs CPU tensors"
            )
            raise RuntimeError(f"{name}: backend 'triton' cannot run on {x.device} tensors ({where})")
        return call.ref(*args, **kwargs)

    functools.update_wrapper(call, triton_impl)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = doc or triton_impl.__doc__
    call.ref = ref
    call.triton = triton_impl
    return call
