"""FastSampler: a drop-in for `EulerSampler` that captures the whole sampling loop in one CUDA graph.

At small batch the Euler loop is launch-bound: a DiT-XL step issues hundreds of kernel launches. Here the loop (cond and
uncond batched into one forward of 2B, the fused `crossflow_kernels.cfg_euler_step` in place) is captured once per key
and replayed, so a 50-step sample costs one graph launch.

What is cached: one graph per key = (model, batch, latent shape, dtype, device, steps, time grid, method, guidance
on/off), in
an LRU cache of at most `max_graphs` entries that share one private memory pool. What a replay reads from device
memory, so changing it needs no re-capture: the start latent z0 (hence the prompts and seeds), the guidance scale, the
model's weights (updated in place, e.g. `load_state_dict`). What invalidates a graph: a new key, or a parameter or
buffer of the model that was re-allocated (`model.to(...)`, `.half()`): detected on every call, and the graph is then
captured again. Memory: each cached graph holds the activations of one forward at batch 2B in the shared pool, plus
its static input and output latents.

Capture happens after one eager warm-up run on a side stream (every Triton autotune runs there, outside capture). The
first replay is compared with that eager run; a model that cannot be captured, or whose replay differs from eager,
raises `RuntimeError` naming the cause and the fix; it never returns a silently wrong result.

On CPU (or with `use_cuda_graph=False`) the same ops run eagerly, exactly as `EulerSampler`.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from crossflow.sampling import EulerSampler, _check_flow, timesteps


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor  # (B, C, H, W), copied from z0 before each replay
    static_out: torch.Tensor  # (B, C, H, W), in the pool: cloned right after each replay
    scale: torch.Tensor | None  # 0-d guidance scale on the device (None: no guidance)
    model_ref: weakref.ref
    storage: tuple[int, ...]  # data pointers of the model's tensors at capture time


def _storage_of(model: Any) -> tuple[int, ...]:
    if not isinstance(model, torch.nn.Module):
        return ()
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


class FastSampler(EulerSampler):
    """Euler sampler with CUDA-graph capture; same constructor and call as `EulerSampler` plus graph options.

    Args:
        steps, guidance_scale, official_grid, method: as `EulerSampler` ("midpoint" is captured the same way).
        use_cuda_graph: capture on CUDA (default). False runs eagerly everywhere (for profiling per-block ranges).
        max_graphs: how many captured graphs to keep (LRU).
        check_replay: compare the first replay of each new graph with the eager warm-up run (recommended).
    """

    def __init__(
        self, steps: int = 50, guidance_scale: float = 7.0, official_grid: bool = False, method: str = "euler", *,
        use_cuda_graph: bool = True, max_graphs: int = 8, check_replay: bool = True,
    ) -> None:
        super().__init__(steps, guidance_scale, official_grid, method)
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.use_cuda_graph = bool(use_cuda_graph)
        self.max_graphs = max_graphs
        self.check_replay = bool(check_replay)
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._pool = None
        self.captures = 0  # how many graphs were captured (tests and users can watch re-capture)

    def clear(self) -> None:
        """Drop every cached graph and the memory pool."""
        self._graphs.clear()
        self._pool = None

    @torch.no_grad()
    def __call__(
        self, flow: Callable, z0: torch.Tensor, *, steps: int | None = None, guidance_scale: float | None = None,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Integrate from z0 (B, C, H, W) at t = 0 to t = 1; returns a new tensor of z0's shape and dtype.

        callback(n): the number of steps just completed; one call per step eagerly, one call with all the steps after
        a graph replay (a replay has no steps to report between)."""
        if not (self.use_cuda_graph and isinstance(z0, torch.Tensor) and z0.is_cuda):
            return super().__call__(flow, z0, steps=steps, guidance_scale=guidance_scale, callback=callback)
        steps, s = self._resolve(z0, steps, guidance_scale)  # s None = guidance off (sampling.guidance decides)
        _check_flow(flow)
        model = fn = flow
        key = (id(model), tuple(z0.shape), z0.dtype, z0.device, steps, self.official_grid, self.method, s is not None)
        entry = self._graphs.get(key)
        if entry is not None and (entry.model_ref() is not model or entry.storage != _storage_of(model)):
            del self._graphs[key]  # the model was replaced or its tensors re-allocated: the graph reads stale memory
            entry = None
        if entry is None:
            out = self._capture(key, model, fn, z0, steps, s)
        else:
            self._graphs.move_to_end(key)
            entry.static_in.copy_(z0)
            if entry.scale is not None:
                entry.scale.fill_(s)
            entry.graph.replay()
            out = entry.static_out.clone()
        if callback is not None:
            callback(steps)
        return out

    def _capture(self, key, model, fn, z0: torch.Tensor, steps: int, scale: float | None) -> torch.Tensor:
        device = z0.device
        ts, dts = timesteps(steps, self.official_grid, device=device)
        s = torch.tensor(scale, device=device, dtype=torch.float32) if scale is not None else None
        static_in = z0.clone()
        # Warm-up on a side stream, as CUDA graphs require: Triton autotuning and lazy initialisation happen here.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            eager = self._loop(fn, static_in.clone(), ts, dts, s)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self._loop(fn, static_in.clone(), ts, dts, s)
        except Exception as e:  # noqa: BLE001 - re-raised with the cause and the fix
            raise RuntimeError(
                f"FastSampler: the model could not be captured in a CUDA graph ({type(e).__name__}: {e}). Common "
                "causes: a host synchronisation inside forward (.item(), .cpu(), .tolist(), printing a tensor, "
                "Python control flow on tensor values), CPU tensors created inside forward, or kernels that autotune "
                "on first use. Fix the model's forward, or use FastSampler(use_cuda_graph=False) / EulerSampler."
            ) from e
        graph.replay()
        tol = 1e-3 if z0.dtype in (torch.float32, torch.float64) else 3e-2  # replay should match eager to roundoff
        if self.check_replay and not torch.allclose(static_out.float(), eager.float(), rtol=tol, atol=tol):
            err = (static_out.float() - eager.float()).abs().max().item()
            raise RuntimeError(
                f"FastSampler: the captured graph's result differs from eager execution (max |diff| {err:.3e}). The "
                "model's forward depends on state a CUDA graph cannot see (host-side values, random numbers, "
                "tensors re-created per call). Fix the forward, or use FastSampler(use_cuda_graph=False)."
            )
        self.captures += 1
        self._graphs[key] = _Graph(graph, static_in, static_out, s, weakref.ref(model), _storage_of(model))
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return static_out.clone()
