"""Helpers shared by the op files: input checks, block sizes, autotune configs under the interpreter."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch

from crossflow_kernels._dispatch import INTERPRETER_DTYPES, KERNEL_DTYPES, interpreting
from crossflow_kernels._triton import LOADED as TRITON_LOADED, WHY_ABSENT, triton

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def widen(t: torch.Tensor) -> torch.Tensor:
    """The references' compute dtype: fp32 for 16/32-bit inputs, fp64 stays fp64 (a high-precision oracle in tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def check_float(name: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError unless every tensor has a floating dtype."""
    for arg, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: `{arg}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: `{arg}` must be a floating tensor, got dtype {t.dtype}")


def check_eps(name: str, eps) -> None:
    """eps must be a positive, finite real number; bools (``eps=True`` would silently be 1.0) and tensors are not."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"{name}: eps must be a positive float, got {type(eps).__name__} {eps!r}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{name}: eps must be a positive float, got {eps!r}")


def check_same(name: str, attr: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError unless every tensor agrees on `attr` ("device" or "dtype")."""
    vals = {arg: getattr(t, attr) for arg, t in tensors.items()}
    if len(set(vals.values())) > 1:
        desc = ", ".join(f"{arg}: {v}" for arg, v in vals.items())
        raise ValueError(f"{name}: all tensors must share one {attr}; got {desc}")


def check_kernel_dtype(name: str, t: torch.Tensor) -> None:
    """The Triton kernels take fp16, bf16 and fp32 (fp64 is a reference-only dtype). Direct calls of `<op>_triton`
    get this ValueError; the dispatcher routes `auto` to torch first (`crossflow_kernels._dispatch.why_not_triton`)."""
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}: the Triton backend supports float16, bfloat16 and float32, got {t.dtype}")
    if interpreting() and t.dtype not in INTERPRETER_DTYPES:
        raise ValueError(f"{name}: the Triton interpreter has no bfloat16 arithmetic; use float16/float32 on CPU")


def row_block(n: int) -> int:
    """Power-of-two block that covers a row of `n` elements (Triton blocks must be powers of two)."""
    return max(16, triton.next_power_of_2(n))


def autotune_configs(configs: Sequence[triton.Config]) -> list[triton.Config]:
    """All configs on a GPU; only the first under the interpreter (several configs cannot be timed on a CPU)."""
    return list(configs[:1]) if interpreting() else list(configs)


def cuda_device_guard(t: torch.Tensor):
    """Launch on the tensor's own GPU, not the current one (multi-GPU safety)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# The launchers are torch custom ops (so torch.compile(fullgraph=True) traces through them). `torch.library.triton_op`
# parses each launcher's source with torch._inductor, an import of ~1 s, so the ops are recorded here and registered by
# `register_triton_ops()`: at `import crossflow_kernels` where the Triton path can run (a CUDA/ROCm build of torch, or
# the interpreter), else on the first direct `<op>_triton` call. A CPU-only `crossflow sample` never pays for it.
_DEFERRED: dict[str, tuple[Callable, object]] = {}


def deferred_triton_op(name: str, mutates_args) -> Callable[[Callable], Callable]:
    """`torch.library.triton_op(name, mutates_args=...)`, applied by `register_triton_ops()`; returns fn unchanged.
    Call the registered op as `torch.ops.crossflow_kernels.<name>`."""
    def record(fn: Callable) -> Callable:
        if name in _DEFERRED:
            raise RuntimeError(f"triton op {name!r} is defined twice")
        _DEFERRED[name] = (fn, mutates_args)
        return fn
    return record


def wrap_triton(kernel):
    """`torch.library.wrap_triton(kernel)`; under the interpreter the kernel itself (an `InterpretedFunction`, which
    torch before 2.13 refuses to wrap and 2.13 returns unwrapped)."""
    return kernel if interpreting() else torch.library.wrap_triton(kernel)


def register_triton_ops() -> None:
    """Register every recorded launcher as a custom op. Idempotent; once done it is a check of an empty dict, which
    torch.compile traces as a constant (every public `<op>_triton` calls it before its first op call). Where Triton
    is not loaded (`crossflow_kernels._triton`) the first call raises a RuntimeError saying why."""
    if _DEFERRED and not TRITON_LOADED:
        raise RuntimeError(f"crossflow_kernels: the Triton backend cannot run: {WHY_ABSENT}")
    while _DEFERRED:
        name = next(iter(_DEFERRED))
        fn, mutates_args = _DEFERRED[name]
        torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        del _DEFERRED[name]


def triton_can_run_here() -> bool:
    """Can any tensor take the Triton path in this process? Reads the torch build, makes no driver call."""
    return interpreting() or torch.backends.cuda.is_built()
