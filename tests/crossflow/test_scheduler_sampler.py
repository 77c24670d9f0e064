"""SchedulerSampler: diffusers' flow-matching schedulers over our flow network; conventions checked against our Euler
on the same grid, and the multistep solvers' convergence on a closed-form ODE."""

import pytest
import torch
from torch import nn

from crossflow.sampling import EulerSampler
from crossflow.scheduler_sampler import SchedulerSampler

diffusers = pytest.importorskip("diffusers")


class TimeField(nn.Module):
    """v = x cos(t) (+ 0.5 for the uncond half): cond-only, z(t) = z(t0) exp(sin t - sin t0)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, indicator):
        self.calls.append((x.shape[0], t.clone()))
        return x * torch.cos(t).view(-1, 1, 1, 1) + 0.5 * indicator.view(-1, 1, 1, 1).to(x.dtype)


def _z0(b=2, seed=0):
    return torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def _dpm():
    return diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")


def _unipc():
    return diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_flow_match_euler_on_our_grid_is_our_euler(guidance, torch_backend):
    z0, field = _z0(), TimeField()
    ours = EulerSampler(steps=7, guidance_scale=guidance)(field, z0)
    sampler = SchedulerSampler(diffusers.FlowMatchEulerDiscreteScheduler(), steps=7, guidance_scale=guidance,
                               uniform_grid=True)
    field.calls.clear()
    got = sampler(field, z0)
    torch.testing.assert_close(got, ours, rtol=1e-6, atol=1e-6)  # fp32 roundoff of the sigma differences
    # the network saw our times, t = i / 7, one batched forward per step (2B with guidance)
    ts = torch.stack([t[0] for _, t in field.calls])
    torch.testing.assert_close(ts, torch.arange(7) / 7)
    assert {b for b, _ in field.calls} == {2 if guidance == 1.0 else 4}


def test_flow_match_euler_on_a_tiny_flow_transformer(perturb, torch_backend):
    from crossflow.config import CrossFlowConfig
    from crossflow.models.model import FlowTransformer

    cfg = CrossFlowConfig.from_name("tiny")
    model = perturb(FlowTransformer(cfg), std=0.02, everywhere=True).eval()
    z0 = torch.randn(2, *cfg.latent_shape, generator=torch.Generator().manual_seed(1))
    ours = EulerSampler(steps=5, guidance_scale=3.0)(model, z0)
    got = SchedulerSampler(diffusers.FlowMatchEulerDiscreteScheduler(), 5, 3.0, uniform_grid=True)(model, z0)
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_dpm, _unipc], ids=["dpm++", "unipc"])
def test_multistep_solvers_converge_and_beat_euler(make):
    # dz/dt = z cos t from t0 = 1 - sigma_max (flow sigmas start just below 1) to t = 1, in closed form
    z0 = _z0()
    for n in (5, 10, 20):
        sampler = SchedulerSampler(make(), steps=n, guidance_scale=1.0)
        t0 = torch.tensor(1.0 - float(sampler._schedule(n, torch.device("cpu")).sigmas[0]), dtype=torch.float64)
        exact = z0.double() * torch.exp(torch.sin(torch.tensor(1.0, dtype=torch.float64)) - torch.sin(t0))
        err = (sampler(TimeField(), z0).double() - exact).abs().max().item()
        euler = EulerSampler(steps=n, guidance_scale=1.0)(TimeField(), z0).double()
        euler_err = (euler - z0.double() * torch.exp(torch.sin(torch.tensor(1.0, dtype=torch.float64)))).abs().max()
        assert err < float(euler_err) / 2, (n, err, float(euler_err))  # a sign or time slip fails by orders
        assert sampler.nfe(n) == n
        if n > 5:
            assert err < last
        last = err


def test_heun_counts_its_corrector_and_leaves_the_callers_scheduler_alone():
    sched = diffusers.FlowMatchHeunDiscreteScheduler()
    sampler = SchedulerSampler(sched, steps=3, guidance_scale=2.0)
    field, done = TimeField(), []
    sampler(field, _z0(), callback=done.append)
    assert len(field.calls) == sampler.nfe() == 5 and sum(done) == 3  # 3 steps, 2 correctors
    assert sched.timesteps is None or len(sched.timesteps) != 5  # the caller's scheduler was not set up by us


def test_bad_schedulers_raise():
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        SchedulerSampler(diffusers.DPMSolverMultistepScheduler())
    with pytest.raises(ValueError, match="diffusers scheduler"):
        SchedulerSampler(object())
    with pytest.raises(ValueError, match="uniform_grid"):
        SchedulerSampler(_dpm(), uniform_grid=True)
    with pytest.raises(ValueError, match="steps"):
        SchedulerSampler(_dpm(), steps=0)


def test_make_sampler_builds_every_name():
    from crossflow.config import SAMPLERS
    from crossflow.fast_sampler import FastSampler
    from crossflow.scheduler_sampler import make_sampler

    z0, built = _z0(), {}
    for name in SAMPLERS:
        sampler = make_sampler(name, steps=4, guidance_scale=2.0, official_grid=True)
        built[name] = sampler(TimeField(), z0)
        assert sampler.steps == 4 and sampler.guidance_scale == 2.0 and sampler.method == name  # as sampling.json
    assert isinstance(make_sampler("midpoint"), FastSampler)
    assert make_sampler("midpoint", official_grid=True).nfe(4) == 8
    assert make_sampler("euler", official_grid=True).official_grid  # the official grid stays with Euler only
    # every name is a different solver
    outs = list(built.values())
    assert all(not torch.equal(outs[i], outs[j]) for i in range(len(outs)) for j in range(i))
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_sampler("ddim")
