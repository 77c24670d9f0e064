"""Triton kernels for adaLN-modulated DiT blocks, flash attention, fused Euler/CFG updates and DiMR's RMS norms / GEGLU.

Every op dispatches between its torch reference (`op.ref`) and its Triton implementation (`op.triton`); see
`crossflow_kernels._dispatch` for the rules and `use_backend` / ``CROSSFLOW_KERNELS_BACKEND`` to choose. Importing this
package makes no driver calls and launches nothing, and imports triton only where a Triton kernel can run
(`crossflow_kernels._triton`)."""

from crossflow_kernels import adaln as _adaln
from crossflow_kernels import euler as _euler
from crossflow_kernels import attention as _attention
from crossflow_kernels import attention_routes as _attention_routes
from crossflow_kernels import geglu as _geglu
from crossflow_kernels import rms_norm as _rms_norm
from crossflow_kernels._dispatch import (
    BACKENDS, dispatch_counts, get_backend, interpreting, op, reset_dispatch_counts, routing_enabled, triton_ok,
    use_backend, use_routing, why_not_triton,
)
from crossflow_kernels._nvtx import nvtx_range
from crossflow_kernels._utils import register_triton_ops, triton_can_run_here

if triton_can_run_here():  # else registered on first direct use: no torch._inductor import on a CPU-only build
    register_triton_ops()

adaln_modulate = op("adaln_modulate", _adaln.adaln_modulate_ref, _adaln.adaln_modulate_triton)
gated_residual_adaln = op("gated_residual_adaln", _adaln.gated_residual_adaln_ref, _adaln.gated_residual_adaln_triton)
attention = op("attention", _attention.attention_ref, _attention.attention_triton, route=_attention_routes.route)
euler_step = op("euler_step", _euler.euler_step_ref, _euler.euler_step_triton)
cfg_euler_step = op("cfg_euler_step", _euler.cfg_euler_step_ref, _euler.cfg_euler_step_triton)
rms_norm = op("rms_norm", _rms_norm.rms_norm_ref, _rms_norm.rms_norm_triton)
geglu = op("geglu", _geglu.geglu_ref, _geglu.geglu_triton)

# The op table that tests and benchmarks iterate over.
OPS = {f.__name__: f for f in (adaln_modulate, gated_residual_adaln, attention, euler_step, cfg_euler_step, rms_norm,
                                geglu)}

__all__ = [
    "BACKENDS", "OPS", "adaln_modulate", "attention", "cfg_euler_step", "dispatch_counts", "euler_step",
    "gated_residual_adaln", "geglu", "get_backend", "interpreting", "nvtx_range", "reset_dispatch_counts", "rms_norm",
    "routing_enabled", "triton_ok", "use_backend", "use_routing", "why_not_triton",
]
