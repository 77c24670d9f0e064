"""The one place where a backend is chosen for every op in `crossflow_kernels`.

Backends:
  * ``torch``  -- the pure-PyTorch reference (`<op>_ref`), runs anywhere.
  * ``triton`` -- the Triton kernels; needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before
    ``crossflow_kernels`` was imported (the interpreter switch is read when ``@triton.jit`` runs).
  * ``auto``   -- Triton when it can run on the given tensors, else torch. The default. "Can run" looks at the
    first tensor argument: a CUDA tensor of float16/bfloat16/float32, or (interpreter) a CPU tensor of
    float16/float32 -- the interpreter computes with numpy, which has no bfloat16. float64 is reference-only.

Selection: ``crossflow_kernels.use_backend(name)`` (a context manager, innermost wins) overrides the
``CROSSFLOW_KERNELS_BACKEND`` environment variable, read at call time. A forced ``triton`` that cannot run raises
``RuntimeError``; nothing falls back silently. Under ``torch.compile`` the choice is made at trace time, so pick the
backend before compiling."""

from __future__ import annotations

import functools
import os
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from crossflow_kernels._nvtx import nvtx_range

BACKENDS = ("auto", "torch", "triton")

# Captured at import: the interpreter is chosen per kernel when `@triton.jit` runs, which happens when the op modules
# are imported, so this is the truth about how our kernels were built.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_override: list[str] = []
_routing: list[bool] = []
_counts: Counter = Counter()


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; choose one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost `use_backend`, else ``CROSSFLOW_KERNELS_BACKEND``, else ``auto``."""
    if _override:
        return _override[-1]
    return _validate(os.environ.get("CROSSFLOW_KERNELS_BACKEND", "auto").strip().lower() or "auto")


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed calls on backend `name` ("auto" | "torch" | "triton"); restores the previous one on exit."""
    _override.append(_validate(name))
    try:
        yield name
    finally:
        _override.pop()


@contextmanager
def use_routing(enabled: bool) -> Iterator[bool]:
    """Allow (True, the default) or forbid (False) per-shape routing under ``auto`` for the enclosed calls."""
    _routing.append(bool(enabled))
    try:
        yield bool(enabled)
    finally:
        _routing.pop()


def routing_enabled() -> bool:
    """False inside `use_routing(False)`; a route hook has its own switches too (attention: its table's env var)."""
    return _routing[-1] if _routing else True


def dispatch_counts() -> dict[tuple[str, str], int]:
    """Calls so far per (op, backend it was dispatched to): "torch", "triton" or a routed one ("sdpa_cudnn", ...).
    Eager Python calls only: calls traced by torch.compile, a compiled graph's runs and CUDA-graph replays are not
    counted (which backend a compiled graph uses is logged when a route is first taken)."""
    return dict(_counts)


def reset_dispatch_counts() -> None:
    _counts.clear()


def _count(name: str, backend: str) -> None:
    if not torch.compiler.is_compiling():  # a trace is not a call (and mutating a global would break the graph)
        _counts[(name, backend)] += 1


def interpreting() -> bool:
    """True when our Triton kernels were built for the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRET


# The dtypes our kernels compute in, compiled and interpreted.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_DTYPES = (torch.float16, torch.float32)


def why_not_triton(t: torch.Tensor) -> str | None:
    """None when our Triton kernels can run on tensor `t`, else the reason they cannot. Non-floating dtypes are not
    judged here: the op's own input checks reject them with a ValueError on every backend."""
    if _INTERPRET:
        if t.device.type != "cpu":
            return "the interpreter (TRITON_INTERPRET=1) only runs CPU tensors"
        if t.dtype.is_floating_point and t.dtype not in INTERPRETER_DTYPES:
            return f"the Triton interpreter computes in float16/float32 only, got {t.dtype}"
        return None
    if not t.is_cuda:
        return "CPU tensors need TRITON_INTERPRET=1 set before `import crossflow_kernels`"
    if t.dtype.is_floating_point and t.dtype not in KERNEL_DTYPES:
        return f"the Triton kernels support float16, bfloat16 and float32, got {t.dtype}"
    return None


def triton_ok(t: torch.Tensor) -> bool:
    """Can our Triton kernels run on tensor `t`? CUDA tensors compiled, or CPU tensors interpreted, of a dtype the
    kernels compute in (see `why_not_triton`)."""
    return why_not_triton(t) is None


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def op(name: str, ref: Callable, triton_impl: Callable, doc: str | None = None,
       route: Callable | None = None) -> Callable:
    """Build the public dispatching function for one op; it carries `.ref` and `.triton` twins, and `.route`: None,
    or a hook taking the op's arguments that returns None (ours) or (backend name, callable) under ``auto``."""

    range_name = f"kernels/{name}"

    # The twins are looked up on the function at call time, so a test (or a user) can swap one in place.
    def call(*args, **kwargs):
        with nvtx_range(range_name):
            return _dispatch(*args, **kwargs)

    def _dispatch(*args, **kwargs):
        backend = get_backend()
        if backend == "torch":
            _count(name, "torch")
            return call.ref(*args, **kwargs)
        x = _first_tensor(args, kwargs)
        if x is None:
            raise ValueError(f"{name}: expected at least one tensor argument")
        if triton_ok(x):
            if backend == "auto" and call.route is not None and routing_enabled():
                routed = call.route(*args, **kwargs)
                if routed is not None:
                    _count(name, routed[0])
                    return routed[1](*args, **kwargs)
            _count(name, "triton")
            return call.triton(*args, **kwargs)
        if backend == "triton":
            why = why_not_triton(x) or "triton_ok() says no"
            raise RuntimeError(f"{name}: backend 'triton' cannot run on {x.device} {x.dtype} tensors ({why})")
        _count(name, "torch")
        return call.ref(*args, **kwargs)

    functools.update_wrapper(call, triton_impl)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = doc or triton_impl.__doc__
    call.ref = ref
    call.triton = triton_impl
    call.route = route
    return call
