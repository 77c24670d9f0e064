"""Quality against network evaluations (NFE): a preset's eval at every (sampler, steps) of a grid, each point's
distance to the converged ODE solution, and the cheapest setting whose quality is within noise of the converged one.

    crossflow eval --preset digits-sr --sweep-steps 1,2,4,8,16,25,50 --sweep-samplers euler,midpoint,dpm++

Distance to the converged solution: every sampler call of the eval is recorded (its start latents z0 and its end z1);
the reference is the same eval with a fine solver (`REFERENCE`: midpoint, 128 steps = 256 NFE). The start latents do
not depend on the sampler (each call draws them from the seeded generator before sampling), which is checked call by
call, so point and reference integrate the same ODEs: rmse = sqrt(mean((z1 - z1_ref)^2)) over the samples of every
call up to the first that starts elsewhere (`rmse_calls` of them: captioning's text variation rewords the captions
the sampler just made, so its calls start from the point's own outputs).

Noise: the reference eval is repeated at `noise_seeds` seeds (seed, seed + 1, ...); a judged number's noise is its
standard deviation over them, the change a user sees from rerunning with another seed. Judged numbers: the preset's
bars (`digits.eval.BARS`: ">=" higher is better, "<=" lower is better, "in" nearer the reference) and realism (lower
is better; 50 % = indistinguishable from real digits).

Recommendation (`recommend`): the point with the fewest NFE that passes the preset's bars and whose every judged number
is no worse than the reference's (same seed) by more than `NOISE_K` standard deviations, and which then passes the
full eval (the slow extras the points skip: super-resolution's posterior mean, captioning of shifted digits); its
saving is the baseline's NFE / its NFE. The baseline (`BASELINE`, Euler x 50) is the setting every preset shipped
before the sweep existed. `per_sampler`: the same rule within each sampler's points (the shipped presets take the
cheapest of our own solvers, `config.SAMPLING`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

REFERENCE = ("midpoint", 128)
BASELINE = ("euler", 50)
NOISE_SEEDS = 3
NOISE_K = 2.0
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


def judged(preset: str, res: dict[str, Any]) -> list[tuple[str, str]]:
    """(result key, direction) of each judged number `res` has: the preset's bars, then realism."""
    from crossflow.digits.eval import BARS

    keys = [(k, op) for k, op, _ in BARS[preset]]
    keys += [("realism", "<=")] if "realism" not in dict(keys) else []
    return [(k, op) for k, op in keys if k in res]


def noise(runs: list[dict[str, Any]], keys: list[tuple[str, str]]) -> dict[str, float]:
    """Each judged number's standard deviation over `runs` (one eval per seed; at least two)."""
    if len(runs) < 2:
        raise ValueError(f"noise needs the reference at >= 2 seeds, got {len(runs)}")
    return {k: float(torch.tensor([float(r[k]) for r in runs], dtype=torch.float64).std()) for k, _ in keys}


def worse_than(point: dict[str, Any], reference: dict[str, Any], keys: list[tuple[str, str]],
               sigma: dict[str, float], k: float = NOISE_K) -> list[str]:
    """The judged numbers on which `point` is worse than `reference` by more than k standard deviations."""
    out = []
    for key, op in keys:
        d = float(point[key]) - float(reference[key])
        if (-d if op == ">=" else d if op == "<=" else abs(d)) > k * sigma[key]:
            out.append(key)
    return out


def recommend(points: list[dict[str, Any]], baseline: dict[str, Any],
              confirm: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
    """The fewest-NFE point that passes the preset's bars with every judged number within noise of the reference
    (`within_noise`; ties: the smaller rmse) and that `confirm` accepts (called on the candidates in that order until
    one is accepted), None if there is none; `saving` = baseline NFE / its NFE."""
    good = sorted((p for p in points if p["within_noise"] and p["passed"]),
                  key=lambda p: (p["nfe"], p["rmse_to_converged"]))
    best = next((p for p in good if confirm is None or confirm(p)), None)
    if best is None:
        return None
    return {**{k: best[k] for k in ("sampler", "steps", "nfe", "rmse_to_converged")},
            "baseline": {k: baseline[k] for k in ("sampler", "steps", "nfe", "rmse_to_converged", "within_noise")},
            "saving": baseline["nfe"] / best["nfe"]}


def sweep(preset: str, pipe: Any, checkpoint: str, steps: tuple[int, ...] = DEFAULT_STEPS,
          samplers: tuple[str, ...] = DEFAULT_SAMPLERS, guidance_scale: float | None = None,
          reference: tuple[str, int] = REFERENCE, baseline: tuple[str, int] = BASELINE,
          noise_seeds: int = NOISE_SEEDS, log: Callable[[str], None] | None = None,
          **eval_kw: Any) -> dict[str, Any]:
    """The sweep's result (one JSON): every point (the grid, the baseline's setting and the checkpoint's own, each
    with its rmse, `within_noise` and the judged numbers `worse` than the reference's), the reference with its noise,
    and the recommendation. `eval_kw`: `digits.eval.run`'s seed / per_prompt / per_image / extras (default False: the
    points leave out the slow extras, which `crossflow eval` judges at the shipped setting)."""
    if noise_seeds < 2:
        raise ValueError(f"noise_seeds must be >= 2 (the reference's seed-to-seed spread), got {noise_seeds}")
    eval_kw.setdefault("extras", False)
    shipped = dict(pipe.sampling)
    own = (shipped.get("method", "euler"), shipped["steps"])
    scale = shipped["guidance_scale"] if guidance_scale is None else guidance_scale
    say = log or (lambda line: None)
    seed = eval_kw.pop("seed", 0)
    ref_point, ref = _point(preset, pipe, checkpoint, *reference, scale, seed=seed, **eval_kw)
    keys = judged(preset, ref_point)
    runs = [ref_point] + [_point(preset, pipe, checkpoint, *reference, scale, seed=seed + i, **eval_kw)[0]
                          for i in range(1, noise_seeds)]
    sigma = noise(runs, keys)
    say(f"reference {reference[0]} x {reference[1]} at {noise_seeds} seeds: "
        + ", ".join(f"{k} {ref_point[k]:.4g} +- {sigma[k]:.2g}" for k, _ in keys))
    grid = [(n, s) for n in samplers for s in steps]
    grid += [g for g in dict.fromkeys([tuple(baseline), own]) if g not in grid]
    points = []
    for name, n in grid:
        point, rec = _point(preset, pipe, checkpoint, name, n, scale, seed=seed, **eval_kw)
        point["rmse_to_converged"], point["rmse_calls"] = _rmse(rec, ref, f"{name} x {n}")
        point["worse"] = worse_than(point, ref_point, keys, sigma)
        point["within_noise"] = not point["worse"]
        points.append(point)
        say(f"{name:>10} {n:>3} steps, {point['nfe']:>3} NFE: rmse {point['rmse_to_converged']:.4f}, "
            + (f"worse on {', '.join(point['worse'])}" if point["worse"] else "within noise")
            + f", {point['seconds']:.1f} s")
    base = next(p for p in points if (p["sampler"], p["steps"]) == tuple(baseline))

    def confirm(p: dict[str, Any]) -> bool:  # the points skip the slow extras; a candidate must pass the full eval
        if not eval_kw["extras"] and "full_eval" not in p:  # each point's full eval runs at most once
            full, _ = _point(preset, pipe, checkpoint, p["sampler"], p["steps"], scale, seed=seed,
                             **{**eval_kw, "extras": True})
            p["full_eval"] = {k: v for k, v in full.items() if k not in ("sampler", "steps", "nfe")}
            say(f"{p['sampler']:>10} {p['steps']:>3} steps, the full eval: "
                + ("PASS" if full["passed"] else "FAIL, the next candidate"))
        return p.get("full_eval", p)["passed"]
    return {"preset": preset, "checkpoint": checkpoint, "guidance_scale": scale,
            "reference": {**{k: ref_point[k] for k in ("sampler", "steps", "nfe")}, "seeds": noise_seeds,
                          "judged": {k: {"better": {">=": "higher", "<=": "lower", "in": "nearer"}[op],
                                         "value": ref_point[k], "std": sigma[k]} for k, op in keys},
                          "noise_k": NOISE_K},
            "baseline": {"sampler": base["sampler"], "steps": base["steps"]},
            "shipped": {"sampler": own[0], "steps": own[1]}, "points": points,
            "recommended": recommend(points, base, confirm),
            "per_sampler": {name: recommend([p for p in points if p["sampler"] == name], base, confirm)
                            for name in dict.fromkeys(p["sampler"] for p in points)},
            "seed": seed, **eval_kw}
