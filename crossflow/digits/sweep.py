"""Quality against network evaluations (NFE): a preset's eval at every (sampler, steps) of a grid, plus each point's
distance to the converged ODE solution, and the cheapest setting that is as good as the shipped one.

    crossflow eval --preset digits-sr --sweep-steps 1,2,4,8,16,25,50 --sweep-samplers euler,midpoint,dpm++

Distance to the converged solution: every sampler call of the eval is recorded (its start latents z0 and its end z1);
the reference is the same eval with a fine solver (`REFERENCE`: midpoint, 128 steps = 256 NFE). The start latents do
not depend on the sampler (each call draws them from the seeded generator before sampling), which is checked call by
call, so point and reference integrate the same ODEs: rmse = sqrt(mean((z1 - z1_ref)^2)) over the samples of every
call up to the first that starts elsewhere (`rmse_calls` of them: captioning's text variation rewords the captions
the sampler just made, so its calls start from the point's own outputs).

Recommendation (`recommend`): the point with the fewest NFE whose rmse is at most that of the checkpoint's own setting
(its sampling.json: what ships today), and which passes the preset's bars; its saving is baseline NFE / its NFE.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

REFERENCE = ("midpoint", 128)
DEFAULT_STEPS = (1, 2, 4, 8, 16, 25, 50)
DEFAULT_SAMPLERS = ("euler", "midpoint")


class _Recorder:
    """Wraps a sampler: the same calls and results, and a copy of every (z0, z1) on the CPU."""

    def __init__(self, sampler: Any) -> None:
        self.sampler, self.z0, self.z1 = sampler, [], []

    def __getattr__(self, name: str) -> Any:  # resolve, nfe, steps, ... are the wrapped sampler's
        return getattr(self.sampler, name)

    def __call__(self, flow: Callable, z0: torch.Tensor, **kw: Any) -> torch.Tensor:
        z1 = self.sampler(flow, z0, **kw)
        self.z0.append(z0.detach().float().cpu().clone())
        self.z1.append(z1.detach().float().cpu().clone())
        return z1


def _numbers(res: dict[str, Any]) -> dict[str, Any]:
    """The eval's scalar numbers (examples, paths and nested tables left out)."""
    return {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _point(preset: str, pipe: Any, checkpoint: str, name: str, steps: int, guidance_scale: float,
           **eval_kw: Any) -> tuple[dict[str, Any], _Recorder]:
    from crossflow.digits import eval as judge
    from crossflow.scheduler_sampler import make_sampler

    rec = _Recorder(make_sampler(name, steps=steps, guidance_scale=guidance_scale))
    own, pipe.sampler = pipe.sampler, rec
    start = time.perf_counter()
    try:
        res = judge.run(preset, pipe, checkpoint, **eval_kw)
    finally:
        pipe.sampler = own  # the caller's pipeline keeps its sampler
    ok, _ = judge.verdict(preset, res)
    point = {"sampler": name, "steps": steps, "nfe": rec.nfe(steps), **_numbers(res), "passed": ok,
             "seconds": round(time.perf_counter() - start, 2)}
    return point, rec


def _rmse(rec: _Recorder, ref: _Recorder, where: str) -> tuple[float, int]:
    """(rmse, calls compared): over the eval's sampler calls up to the first whose start latents differ from the
    reference run's (a later call may start from an earlier one's output: captioning's text variation words the
    captions it just made); none comparable is an error."""
    n = 0
    while n < min(len(rec.z0), len(ref.z0)) and torch.equal(rec.z0[n], ref.z0[n]):
        n += 1
    if n == 0:
        raise RuntimeError(f"{where}: the eval's start latents differ from the reference run's; the sweep needs a "
                           "sampler that draws no random numbers")
    z1, z1_ref = torch.cat([z.flatten() for z in rec.z1[:n]]), torch.cat([z.flatten() for z in ref.z1[:n]])
    return math.sqrt(float(((z1.double() - z1_ref.double()) ** 2).mean())), n


def recommend(points: list[dict[str, Any]], baseline: dict[str, Any]) -> dict[str, Any]:
    """The fewest-NFE point at least as close to the converged solution as `baseline` (ties: the smaller rmse) that
    passes the preset's bars; `saving` = baseline NFE / its NFE."""
    good = [p for p in points if p["rmse_to_converged"] <= baseline["rmse_to_converged"] and p["passed"]]
    best = min(good, key=lambda p: (p["nfe"], p["rmse_to_converged"]))  # the baseline itself is always good
    return {"sampler": best["sampler"], "steps": best["steps"], "nfe": best["nfe"],
            "rmse_to_converged": best["rmse_to_converged"], "baseline": {k: baseline[k] for k in (
                "sampler", "steps", "nfe", "rmse_to_converged")}, "saving": baseline["nfe"] / best["nfe"]}


def sweep(preset: str, pipe: Any, checkpoint: str, steps: tuple[int, ...] = DEFAULT_STEPS,
          samplers: tuple[str, ...] = DEFAULT_SAMPLERS, guidance_scale: float | None = None,
          reference: tuple[str, int] = REFERENCE, log: Callable[[str], None] | None = None,
          **eval_kw: Any) -> dict[str, Any]:
    """The sweep's result (one JSON): every point, the reference, the checkpoint's own setting (`pipe.sampler`'s) and
    the recommendation. `eval_kw`: `digits.eval.run`'s seed / per_prompt / per_image / extras (default False: the
    points leave out the slow extras, which `crossflow eval` judges at the shipped setting)."""
    eval_kw.setdefault("extras", False)
    shipped = dict(pipe.sampling)
    base_name, base_steps = shipped.get("method", "euler"), shipped["steps"]
    scale = shipped["guidance_scale"] if guidance_scale is None else guidance_scale
    say = log or (lambda line: None)
    ref_point, ref = _point(preset, pipe, checkpoint, *reference, scale, **eval_kw)
    grid = [(n, s) for n in samplers for s in steps]
    if (base_name, base_steps) not in grid:
        grid.append((base_name, base_steps))
    points = []
    for name, n in grid:
        point, rec = _point(preset, pipe, checkpoint, name, n, scale, **eval_kw)
        point["rmse_to_converged"], point["rmse_calls"] = _rmse(rec, ref, f"{name} x {n}")
        points.append(point)
        say(f"{name:>10} {n:>3} steps, {point['nfe']:>3} NFE: rmse {point['rmse_to_converged']:.4f}, "
            f"{point['seconds']:.1f} s")
    baseline = next(p for p in points if (p["sampler"], p["steps"]) == (base_name, base_steps))
    return {"preset": preset, "checkpoint": checkpoint, "guidance_scale": scale,
            "reference": {k: ref_point[k] for k in ("sampler", "steps", "nfe")},
            "shipped": {"sampler": base_name, "steps": base_steps}, "points": points,
            "recommended": recommend(points, baseline), **{k: v for k, v in eval_kw.items()}}
