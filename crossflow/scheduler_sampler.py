"""Any diffusers flow-matching scheduler (`set_timesteps` / `step`) driving a CrossFlow flow network with our batched
indicator CFG, so the ecosystem's solvers (FlowMatchEuler/Heun, DPM-Solver++ and UniPC with flow sigmas) need no
rewrite here.

    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe.sampler = SchedulerSampler(sched, steps=10, guidance_scale=1.5)

Conventions: our t runs from the source latent (t = 0) to the target (t = 1) and the network returns v = dz/dt;
diffusers' sigma runs from 1 (its "noise", our source) to 0 (its data, our target) and a flow-prediction scheduler
takes dx/dsigma. So the network is evaluated at t = 1 - sigma and the scheduler is given -v. Each evaluation is one
forward of 2B (cond and uncond halves) combined as v_u + s (v_c - v_u), or a cond-only forward of B at s = 1.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

import torch

from crossflow.fast_sampler import FastSampler
from crossflow.sampling import EulerSampler, _check_flow

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def _check_scheduler(scheduler: Any) -> None:
    if not (callable(getattr(scheduler, "set_timesteps", None)) and callable(getattr(scheduler, "step", None))):
        raise ValueError(f"scheduler must be a diffusers scheduler (set_timesteps, step), got "
                         f"{type(scheduler).__name__}")
    if type(scheduler).__name__ in FLOW_SCHEDULERS:
        return
    cfg = getattr(scheduler, "config", {})
    if not (cfg.get("use_flow_sigmas") and cfg.get("prediction_type") == "flow_prediction"):
        raise ValueError(
            f"{type(scheduler).__name__} is not set up for flow matching: build it with use_flow_sigmas=True and "
            "prediction_type='flow_prediction' (CrossFlow's network predicts a velocity, not noise)")


class SchedulerSampler(EulerSampler):
    """Sampling with a diffusers scheduler; the call and its checks are `EulerSampler`'s.

    Args:
        scheduler: a diffusers scheduler for flow matching (see `_check_scheduler`); it is copied per call, so the
            caller's object keeps its state and one sampler can serve several threads' calls in turn.
        steps, guidance_scale: as `EulerSampler`; `steps` is the scheduler's `num_inference_steps`.
        uniform_grid: give the scheduler our grid (sigma_i = 1 - i / steps, then 0) instead of its own spacing;
            needs a scheduler whose `set_timesteps` takes `sigmas` (FlowMatchEuler/Heun). With FlowMatchEuler it is
            our Euler exactly.
        name: its name among `config.SAMPLERS` (`make_sampler` passes it), so that `method`, and with it a
            pipeline's `sampling`, reads as sampling.json does; default the scheduler's class name.
    """

    def __init__(
        self, scheduler: Any, steps: int = 50, guidance_scale: float = 7.0, uniform_grid: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(steps, guidance_scale)
        _check_scheduler(scheduler)
        if uniform_grid and "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"uniform_grid needs a scheduler whose set_timesteps takes sigmas; "
                             f"{type(scheduler).__name__} does not")
        self.scheduler = scheduler
        self.uniform_grid = bool(uniform_grid)
        self.method = name or type(scheduler).__name__

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.method}, steps={self.steps}, guidance_scale={self.guidance_scale}, "
                f"uniform_grid={self.uniform_grid})")

    def _schedule(self, steps: int, device: torch.device) -> Any:
        sched = copy.deepcopy(self.scheduler)
        if self.uniform_grid:
            sched.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], device=device)
        else:
            sched.set_timesteps(steps, device=device)
        return sched

    def nfe(self, steps: int | None = None) -> int:
        """Network evaluations of a call: one per scheduler timestep (Heun's corrector counts)."""
        return len(self._schedule(self.steps if steps is None else steps, torch.device("cpu")).timesteps)

    @torch.no_grad()
    def __call__(
        self, flow: Callable, z0: torch.Tensor, *, steps: int | None = None, guidance_scale: float | None = None,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Integrate from z0 (B, C, H, W) at sigma_max to sigma = 0; returns a new tensor of z0's shape and dtype.

        callback(n): steps completed, `steps` in all (Heun's corrector evaluations share their step's count)."""
        steps, s = self._resolve(z0, steps, guidance_scale)
        _check_flow(flow)
        sched = self._schedule(steps, z0.device)
        sigmas = sched.sigmas.to(device=z0.device, dtype=torch.float32)
        x, nfe = z0.clone(), len(sched.timesteps)
        for i, timestep in enumerate(sched.timesteps):
            t = (1.0 - sigmas[i]).reshape(())
            v_cond, v_uncond = self._velocity(flow, x, t, s)
            v = v_cond if s is None else v_uncond + s * (v_cond - v_uncond)
            x = sched.step(-v, timestep, x, return_dict=False)[0].to(z0.dtype)
            done = (i + 1) * steps // nfe - i * steps // nfe
            if callback is not None and done:
                callback(done)
        return x


def _scheduler(name: str) -> Any:
    import diffusers

    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
    return {"flow-euler": lambda: diffusers.FlowMatchEulerDiscreteScheduler(),
            "flow-heun": lambda: diffusers.FlowMatchHeunDiscreteScheduler(),
            "dpm++": lambda: diffusers.DPMSolverMultistepScheduler(**flow),
            "unipc": lambda: diffusers.UniPCMultistepScheduler(**flow)}[name]()


def make_sampler(method: str = "euler", steps: int = 50, guidance_scale: float = 7.0, official_grid: bool = False,
                 **graph: Any) -> EulerSampler:
    """The sampler named `method` (one of `config.SAMPLERS`): "euler" / "midpoint" are `FastSampler`s (`graph`: its
    CUDA-graph options); the others drive a diffusers scheduler with its own spacing. `official_grid` applies to
    Euler only (the official solver's grid) and is dropped for the other methods."""
    from crossflow.config import SAMPLERS

    if method not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {method!r}")
    if method in ("euler", "midpoint"):
        return FastSampler(steps, guidance_scale, official_grid and method == "euler", method, **graph)
    return SchedulerSampler(_scheduler(method), steps, guidance_scale, name=method)
