"""The reference sampler: Euler integration of dz/dt = v(z, t, indicator) from the text latent z0 (t = 0) to the
image latent (t = 1), with indicator classifier-free guidance, plus the paper's latent interpolation and arithmetic.

Guidance (the project's design notes, reference/crossflow.md §1.8, kept outside this repository): v = v_u + s * (v_c -
v_u), both branches at the same x. Unlike the official code (two unbatched passes), cond and uncond go through ONE
forward of 2B (indicator 0 for the first half, 1 for the second), and the update is the fused
`crossflow_kernels.cfg_euler_step`, in place.

Methods (`method=`): "euler" (first order, one velocity evaluation per step) and "midpoint" (second order, two:
x_mid = x + dt/2 * v(x, t), then x + dt * v(x_mid, t + dt/2); each evaluation is the same batched cond/uncond forward
and the same fused update, so the midpoint needs no kernel of its own). NFE = steps * order.

Time grids:
  * default:  the model sees t_i = i / N, step dt = 1 / N  (i = 0 .. N-1), so the steps sum to exactly 1.
  * official: `official_grid=True` replays `ODEEulerFlowMatchingSolver` (step_in_dsigma) to the float32 bit: the model
    sees linspace(0, 1 - 1e-5, N)[i] (spacing 1/(N-1), a quirk) and steps by diff(linspace(1e-5, 1, N + 1))[i]
    (about (1 - 1e-5) / N each). Use it to match the released checkpoints' evaluation.

Shapes: B batch, C/H/W latent channels/height/width.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

import crossflow_kernels

OFFICIAL_TIMESCALE = 1.0 - 1e-5
METHODS = {"euler": 1, "midpoint": 2}  # name -> velocity evaluations per step


def timesteps(
    steps: int, official_grid: bool = False, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Euler grid: (t (N,) float32 times at which the model is evaluated, dt (N,) float32 step sizes).

    Default grid: t_i = i/N, dt_i = 1/N. Official grid: see the module docstring. Computed on the CPU in float32 (as
    the official code does) and then moved to `device`, so every device gets the same numbers.
    """
    _check_steps(steps)
    if official_grid:
        # official: t = tensor([0, 1.]) * (1 - 1e-5) in float32, then linspace(t[0], t[1], N)
        t = torch.linspace(0.0, float(torch.tensor(OFFICIAL_TIMESCALE)), steps)
        dt = torch.linspace(1e-5, 1.0, steps + 1).diff()
    else:
        t = torch.arange(steps, dtype=torch.float32) / steps
        dt = torch.full((steps,), 1.0 / steps)
    return t.to(device), dt.to(device)


def _check_steps(steps: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")


def _check_scale(guidance_scale: Any) -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(
        guidance_scale
    ) or guidance_scale < 0:
        # s < 0 would push samples away from their own prompt: never what a caller means
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    return float(guidance_scale)


def guidance(guidance_scale: Any) -> float | None:
    """The one place that decides whether guidance is on: the validated scale s, or None when guidance is off.

    Off exactly at s == 1, where v_u + s (v_c - v_u) = v_c: one cond-only pass per step instead of a forward of 2B.
    Every sampler (the eager loop, a captured CUDA graph's key) asks this function.
    """
    s = _check_scale(guidance_scale)
    return None if s == 1.0 else s


def _check_z0(z0: Any) -> None:
    if not isinstance(z0, torch.Tensor):
        raise ValueError(f"z0 must be a tensor (B, C, H, W), got {type(z0).__name__}")
    if z0.dim() != 4 or not z0.dtype.is_floating_point:
        raise ValueError(f"z0 must be a 4-D floating tensor (B, C, H, W), got shape {tuple(z0.shape)} {z0.dtype}")


def _check_flow(flow: Any) -> None:
    if not callable(flow) or hasattr(flow, "velocity"):  # a whole CrossFlow: the sampler integrates its `.flow`
        raise ValueError(f"the sampler takes the flow network (`model.flow`), callable as flow(x, t, indicator); got "
                         f"{type(flow).__name__}")


class EulerSampler:
    """Reference Euler sampler with batched indicator CFG.

    `sampler(flow, z0)` returns z1 (B, C, H, W). `flow` is the flow network (`CrossFlow.flow`), or any callable
    `flow(x (B,C,H,W), t (B,) float, indicator (B,) long: 0 cond / 1 uncond) -> v`. guidance_scale == 1
    runs the cond branch only (one pass per step). Runs under `torch.no_grad()`; the caller's z0 is never modified.
    Subclasses (FastSampler) reuse `_step` and the checks and replace the loop.
    """

    def __init__(
        self, steps: int = 50, guidance_scale: float = 7.0, official_grid: bool = False, method: str = "euler"
    ) -> None:
        _check_steps(steps)
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        if official_grid and method != "euler":
            raise ValueError(f"official_grid replays the official Euler solver; it has no {method!r} step")
        self.steps = steps
        self.guidance_scale = _check_scale(guidance_scale)
        self.official_grid = bool(official_grid)
        self.method = method

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(steps={self.steps}, guidance_scale={self.guidance_scale}, "
                f"official_grid={self.official_grid}, method={self.method!r})")

    def nfe(self, steps: int | None = None) -> int:
        """Velocity-field evaluations (batched cond/uncond forwards) of a call with `steps` (default: the sampler's)."""
        return (self.steps if steps is None else steps) * METHODS[self.method]

    def resolve(self, steps: int | None = None, guidance_scale: float | None = None) -> tuple[int, float]:
        """(steps, guidance_scale) a call with these arguments runs with: the call's values, else the sampler's;
        validated here (the sampler's entry), once. The pipelines, their progress bars and `crossflow eval` ask it."""
        steps = self.steps if steps is None else steps
        _check_steps(steps)
        return steps, _check_scale(self.guidance_scale if guidance_scale is None else guidance_scale)

    def _resolve(self, z0: Any, steps: int | None, guidance_scale: float | None) -> tuple[int, float | None]:
        """(steps, s) of `resolve`, z0 checked; s None = no guidance (see `guidance`)."""
        _check_z0(z0)
        steps, scale = self.resolve(steps, guidance_scale)
        return steps, guidance(scale)

    @staticmethod
    def _velocity(model: Callable, x: torch.Tensor, t: torch.Tensor, s) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(v_cond, v_uncond) at (x, t) from ONE forward of 2B; (v_cond, None) from a forward of B when s is None."""
        b = x.shape[0]
        if s is None:
            return model(x, t.expand(b), torch.zeros(b, dtype=torch.long, device=x.device)).to(x.dtype), None
        indicator = torch.arange(2 * b, device=x.device).ge(b).long()  # (2B,) 0 = cond, then 1 = uncond
        v_cond, v_uncond = model(torch.cat([x, x]), t.expand(2 * b), indicator).to(x.dtype).chunk(2)
        return v_cond, v_uncond

    @staticmethod
    def _update(x: torch.Tensor, v: tuple[torch.Tensor, torch.Tensor | None], dt, s, out: torch.Tensor) -> torch.Tensor:
        """out = x + dt * (guided v): one fused kernel either way."""
        if s is None:
            return crossflow_kernels.euler_step(x, v[0], dt, out=out)
        return crossflow_kernels.cfg_euler_step(x, v[0], v[1], dt, s, out=out)

    @classmethod
    def _step(
        cls, model: Callable, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor | float,
        s: torch.Tensor | float | None, out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x + dt * v(x, t) into `out` (default: x, in place); t a 0-d time; s None = no guidance (see `guidance`)."""
        return cls._update(x, cls._velocity(model, x, t, s), dt, s, x if out is None else out)

    @classmethod
    def _midpoint_step(
        cls, model: Callable, x: torch.Tensor, mid: torch.Tensor, t: torch.Tensor, dt, s
    ) -> torch.Tensor:
        """One midpoint step in place on x: the half Euler step into the scratch `mid`, then the full step from x with
        the velocity at (mid, t + dt/2)."""
        half = dt / 2
        cls._step(model, x, t, half, s, out=mid)
        return cls._update(x, cls._velocity(model, mid, t + half, s), dt, s, out=x)

    @torch.no_grad()
    def __call__(
        self, flow: Callable, z0: torch.Tensor, *, steps: int | None = None, guidance_scale: float | None = None,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Integrate from z0 (B, C, H, W) at t = 0 to t = 1; returns a new tensor of z0's shape and dtype.

        callback(n): called with the number of steps just completed (1 after each step here), e.g. a progress bar's
        `update`."""
        steps, s = self._resolve(z0, steps, guidance_scale)
        _check_flow(flow)
        ts, dts = timesteps(steps, self.official_grid, device=z0.device)
        return self._loop(flow, z0.clone(), ts, dts, s, callback)  # never write into z0

    def _loop(
        self, fn: Callable, x: torch.Tensor, ts: torch.Tensor, dts: torch.Tensor, s,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """All steps in place on x; one profiler range per step (a shared no-op unless CROSSFLOW_KERNELS_NVTX is set)."""
        mid = torch.empty_like(x) if self.method == "midpoint" else None
        for i in range(ts.shape[0]):
            with crossflow_kernels.nvtx_range(f"crossflow/step{i}"):
                if mid is None:
                    x = self._step(fn, x, ts[i], dts[i], s)
                else:
                    x = self._midpoint_step(fn, x, mid, ts[i], dts[i], s)
            if callback is not None:
                callback(1)
        return x


@torch.no_grad()
def invert(flow: Callable, z1: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """The flow run backwards: Euler from z1 at t = 1 to t = 0 with the conditional branch (no guidance, whose
    uncond half would not invert), evaluated at t = 1, 1 - 1/N, ..., 1/N. Returns a new tensor; z1 is not modified.

    Text variation uses it to find the source-side point a text latent came from
    (`pipelines.caption.CaptionPipeline.vary_text`).
    """
    _check_z0(z1)
    _check_steps(steps)
    _check_flow(flow)
    fn = flow
    x, b = z1.clone(), z1.shape[0]
    cond = torch.zeros(b, dtype=torch.long, device=z1.device)
    for i in range(steps):
        t = torch.full((b,), 1.0 - i / steps, device=z1.device)
        x = crossflow_kernels.euler_step(x, fn(x, t, cond).to(x.dtype), -1.0 / steps, out=x)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Latent interpolation and arithmetic (paper §4.4, official demo_t2i_arith.py)
# ---------------------------------------------------------------------------------------------------------------------


def interpolate_latents(z_a: torch.Tensor, z_b: torch.Tensor, n: int) -> torch.Tensor:
    """Linear interpolation between two text latents, endpoints included: z_a + (z_b - z_a) * i / (n + 1),
    i = 0 .. n + 1 (n in-betweens plus both ends, as the official demo), no renormalisation.

    z_a, z_b: (C, H, W) or (B, C, H, W), same shape. Returns a sampler-ready batch ((n + 2) * B, C, H, W), ordered
    frame-major (all of frame 0, then frame 1, ...); B = 1 for 3-D inputs.
    """
    if z_a.shape != z_b.shape:
        raise ValueError(f"interpolate_latents: z_a {tuple(z_a.shape)} and z_b {tuple(z_b.shape)} differ")
    if z_a.dim() not in (3, 4):
        raise ValueError(f"interpolate_latents: expected (C, H, W) or (B, C, H, W), got {tuple(z_a.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"interpolate_latents: n must be an int >= 0, got {n!r}")
    if z_a.dim() == 3:
        z_a, z_b = z_a[None], z_b[None]
    frames = [z_a + (z_b - z_a) * (i / (n + 1)) for i in range(n + 2)]
    frames[-1] = z_b  # exact endpoint, no rounding
    return torch.cat(frames, dim=0)


ARITHMETIC_MIN_SPREAD = 1e-3  # `latent_arithmetic` refuses a combination with less spread, relative to its first term


def latent_arithmetic(
    z0: torch.Tensor, z_add: torch.Tensor | None = None, z_sub: torch.Tensor | None = None
) -> torch.Tensor:
    """z = z0 + z_add - z_sub, then standardised to mean 0 / std 1 (unbiased std, as the official demo).

    Shapes: (C, H, W) -> standardised by the global mean/std; (B, C, H, W) -> per sample over (C, H, W), which is
    the official global statistic applied to each latent of the batch.
    """
    if z_add is None and z_sub is None:
        raise ValueError("latent_arithmetic: give z_add and/or z_sub")
    z = z0.clone()
    for name, other, sign in (("z_add", z_add, 1.0), ("z_sub", z_sub, -1.0)):
        if other is not None:
            if other.shape != z0.shape:
                raise ValueError(f"latent_arithmetic: {name} {tuple(other.shape)} != z0 {tuple(z0.shape)}")
            z = z + sign * other
    if z.dim() not in (3, 4):
        raise ValueError(f"latent_arithmetic: expected (C, H, W) or (B, C, H, W), got {tuple(z.shape)}")
    flat = z.flatten(1) if z.dim() == 4 else z.reshape(1, -1)
    mean, std = flat.mean(dim=1), flat.std(dim=1)
    # Terms that cancel (A - A) leave no spread, or rounding noise: standardising divides by zero (all-black images)
    # or samples from amplified noise. Near zero: under ARITHMETIC_MIN_SPREAD of the first term's own spread.
    ref = (z0.flatten(1) if z0.dim() == 4 else z0.reshape(1, -1)).float().std(dim=1)
    small = ~(std.float() > ARITHMETIC_MIN_SPREAD * ref)  # also catches nan
    if bool(small.any()):
        i = int(small.nonzero()[0])
        which = f" (sample {i})" if z.dim() == 4 else ""
        raise ValueError(f"latent_arithmetic: the terms cancel out: the combined latent's spread is "
                         f"{float(std[i]):.3g} against {float(ref[i]):.3g} for the first term{which}; nothing is left "
                         "to sample from: change the prompts")
    if z.dim() == 3:
        return (z - z.mean()) / z.std()
    return (z - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)
