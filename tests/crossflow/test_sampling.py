"""EulerSampler and the latent helpers on analytic velocity fields (the design notes outside this repository,
reference/crossflow.md §1.8, §2).

These run on the default backend (the Triton interpreter on CPU) and on the torch one: the models are closed-form,
so only the fused Euler/CFG updates cost anything."""

import pytest
import torch
from torch import nn

import crossflow_kernels
from crossflow import sampling
from crossflow.sampling import EulerSampler, guidance, interpolate_latents, latent_arithmetic, timesteps

SIGMA = 1e-5
BACKENDS = ["auto", "torch"]


class LineField(nn.Module):
    """The exact flow-matching field towards fixed targets z1: from x on the straight path at time t, recover z0 and
    return z1 - (1 - sigma) z0. Euler follows the straight line exactly, whatever the step count."""

    def __init__(self, z1):
        super().__init__()
        self.z1, self.calls = z1, []

    def forward(self, x, t, indicator):
        self.calls.append(t.clone())
        tb = t.view(-1, 1, 1, 1)
        z0 = (x - tb * self.z1) / (1 - (1 - SIGMA) * tb)
        return self.z1 - (1 - SIGMA) * z0


class ConstField(nn.Module):
    """v = z1 - (1 - sigma) z0 everywhere (the target for one known pair)."""

    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x, t, indicator):
        return self.v.expand_as(x)


class Branches(nn.Module):
    """Known cond/uncond outputs; records every call's batch, times and indicator."""

    def __init__(self, v_cond, v_uncond):
        super().__init__()
        self.vc, self.vu, self.calls = v_cond, v_uncond, []

    def forward(self, x, t, indicator):
        self.calls.append((x.clone(), t.clone(), indicator.clone()))
        b = self.vc.shape[0]
        reps = x.shape[0] // b
        ind = indicator.view(-1, 1, 1, 1).bool()
        return torch.where(ind, self.vu.repeat(reps, 1, 1, 1), self.vc.repeat(reps, 1, 1, 1))


def _pair(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 5, 5, generator=g, dtype=torch.float64).float(), torch.randn(b, 4, 5, 5, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 7])
def test_exact_field_lands_on_z1(backend, steps):
    z0, z1 = _pair()
    with crossflow_kernels.use_backend(backend):
        out = EulerSampler(steps=steps, guidance_scale=1.0)(LineField(z1), z0)
    torch.testing.assert_close(out, z1 + SIGMA * z0, rtol=1e-5, atol=1e-5)  # z_1 of the path: z1 + sigma * z0


@pytest.mark.parametrize("official", [False, True])
def test_constant_field_on_both_grids(official):
    z0, z1 = _pair()
    v = z1 - (1 - SIGMA) * z0
    out = EulerSampler(steps=5, guidance_scale=1.0, official_grid=official)(ConstField(v), z0)
    _, dt = timesteps(5, official)
    torch.testing.assert_close(out, z0 + dt.sum() * v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, z1, rtol=0, atol=1e-4)  # both grids integrate (almost) all the way to t = 1


def test_grids():
    t, dt = timesteps(4)
    assert torch.equal(t, torch.tensor([0.0, 0.25, 0.5, 0.75])) and torch.equal(dt, torch.full((4,), 0.25))
    # Official: evaluation at linspace(0, 1 - 1e-5, N) (spacing 1/(N-1)), steps of diff(linspace(1e-5, 1, N + 1)).
    t, dt = timesteps(50, official_grid=True)
    ends = torch.tensor([0.0, 1.0]) * (1 - 1e-5)
    assert torch.equal(t, torch.linspace(ends[0], ends[1], 50))
    assert torch.equal(dt, torch.linspace(1e-5, 1.0, 51).diff())
    z0, z1 = _pair(b=1)
    field = LineField(z1)
    EulerSampler(steps=50, guidance_scale=1.0, official_grid=True)(field, z0)
    assert torch.equal(torch.stack([c[0] for c in field.calls]), t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cfg_is_one_batched_pass(backend):
    z0, vc = _pair(b=2)
    vu = torch.randn_like(vc)
    model, s, steps = Branches(vc, vu), 7.0, 3
    with crossflow_kernels.use_backend(backend):
        out = EulerSampler(steps=steps, guidance_scale=s)(model, z0)
    assert len(model.calls) == steps
    for x, t, ind in model.calls:
        assert x.shape[0] == 4 and torch.equal(x[:2], x[2:])  # both branches at the same x
        assert torch.equal(ind, torch.tensor([0, 0, 1, 1])) and t.shape == (4,)
    torch.testing.assert_close(out, z0 + (vu + s * (vc - vu)), rtol=1e-5, atol=1e-5)  # 3 steps of 1/3


def test_guidance_one_is_a_single_cond_pass_and_z0_is_untouched():
    z0, vc = _pair(b=2)
    model, keep = Branches(vc, torch.randn_like(vc)), z0.clone()
    out = EulerSampler(steps=4, guidance_scale=7.0)(model, z0, guidance_scale=1.0)
    assert len(model.calls) == 4
    assert all(x.shape[0] == 2 and torch.equal(ind, torch.zeros(2, dtype=torch.long)) for x, _, ind in model.calls)
    torch.testing.assert_close(out, z0 + vc)
    assert torch.equal(z0, keep) and out.data_ptr() != z0.data_ptr()
    EulerSampler(steps=2)(model, z0)  # the CFG path writes in place too, into its own copy
    assert torch.equal(z0, keep)


def test_call_overrides_and_the_sampler_takes_the_flow_network():
    class Counting:  # a flow network: called as flow(x, t, indicator)
        def __init__(self, f):
            self.f, self.n = f, 0

        def __call__(self, x, t, indicator):
            self.n += 1
            return self.f(x, t, indicator)

    z0, v = _pair(b=1)
    flow = Counting(ConstField(v))
    sampler = EulerSampler(steps=50, guidance_scale=7.0)
    out = sampler(flow, z0, steps=2, guidance_scale=1.0)
    assert flow.n == 2
    torch.testing.assert_close(out, z0 + v)
    assert sampler.resolve() == (50, 7.0) and sampler.resolve(2, 1) == (2, 1.0)  # the call's values, else its own

    class Whole:  # a whole model (CrossFlow): refused, naming `model.flow`
        velocity = flow

        def __call__(self, *a):
            raise AssertionError

    with pytest.raises(ValueError, match=r"model\.flow"):
        sampler(Whole(), z0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=-0.5), "guidance_scale"), (dict(guidance_scale=float("inf")), "guidance_scale"),
])
def test_bad_arguments_raise(kwargs, match):
    z0, v = _pair(b=1)
    with pytest.raises(ValueError, match=match):
        EulerSampler()(ConstField(v), z0, **kwargs)
    with pytest.raises(ValueError, match=match):
        EulerSampler(**kwargs)


def test_guidance_is_decided_in_one_place(monkeypatch):
    assert guidance(1.0) is None and guidance(1) is None  # v_u + 1 (v_c - v_u) = v_c: one cond pass
    assert guidance(7) == 7.0 and guidance(0.0) == 0.0  # 0 = the unconditional branch, still two passes
    for bad in (-1.0, float("nan"), True, "7"):
        with pytest.raises(ValueError, match="guidance_scale"):
            guidance(bad)
    # The sampler asks `guidance` and nothing else: overriding it flips a 7.0 sample to single cond passes.
    z0, vc = _pair(b=2)
    model = Branches(vc, torch.randn_like(vc))
    monkeypatch.setattr(sampling, "guidance", lambda s: None)
    EulerSampler(steps=2, guidance_scale=7.0)(model, z0)
    assert [x.shape[0] for x, _, _ in model.calls] == [2, 2]


def test_callback_reports_each_step():
    z0, v = _pair(b=1)
    done = []
    EulerSampler(steps=5)(ConstField(v), z0, callback=done.append)
    assert done == [1] * 5


@pytest.mark.parametrize("z0", [torch.randn(4, 5, 5), torch.ones(1, 4, 5, 5, dtype=torch.long), [1.0]])
def test_bad_z0_raises(z0):
    with pytest.raises(ValueError, match="z0"):
        EulerSampler(steps=2)(ConstField(torch.zeros(1)), z0)


def test_interpolate_latents():
    za, zb = torch.randn(4, 5, 5), torch.randn(4, 5, 5)
    out = interpolate_latents(za, zb, 3)
    assert out.shape == (5, 4, 5, 5)
    assert torch.equal(out[0], za) and torch.equal(out[-1], zb)
    torch.testing.assert_close(out[2], za + (zb - za) * 0.5)  # official z_a + (z_b - z_a) * i / (n + 1)
    batched = interpolate_latents(torch.stack([za, zb]), torch.stack([zb, za]), 1)  # frame-major
    assert batched.shape == (6, 4, 5, 5) and torch.equal(batched[1], zb) and torch.equal(batched[4], zb)
    with pytest.raises(ValueError):
        interpolate_latents(za, zb[:2], 3)


def test_latent_arithmetic_standardises_like_the_official_demo():
    a, b, c = torch.randn(4, 5, 5), torch.randn(4, 5, 5), torch.randn(4, 5, 5)
    z = latent_arithmetic(a, b, c)
    tmp = a + b - c
    torch.testing.assert_close(z, (tmp - tmp.mean()) / tmp.std())
    batched = latent_arithmetic(torch.stack([a, b]), z_sub=torch.stack([c, c]))
    torch.testing.assert_close(batched[1], ((b - c) - (b - c).mean()) / (b - c).std())
    with pytest.raises(ValueError):
        latent_arithmetic(a)


def test_latent_arithmetic_refuses_terms_that_cancel():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 1, 4, 4, generator=g)
    with pytest.raises(ValueError, match="the terms cancel out"):  # main: 0 / 0 -> nan -> all-black images
        latent_arithmetic(a, z_sub=a)
    with pytest.raises(ValueError, match=r"cancel out: .* \(sample 1\)"):  # rounding noise is no spread either
        latent_arithmetic(a, z_sub=torch.stack([torch.zeros_like(a[0]), a[1] * (1 + 1e-6)]))
    with pytest.raises(ValueError, match="cancel out"):
        latent_arithmetic(a[0], z_add=a[0], z_sub=2 * a[0])
    assert torch.isfinite(latent_arithmetic(a, z_sub=0.5 * a)).all()  # half of it is left: fine


# ---------------------------------------------------------------------------------------------------------------------
# The midpoint method
# ---------------------------------------------------------------------------------------------------------------------


class TimeField(nn.Module):
    """v = x * cos(t) (+ 0.5 for the uncond half): dz/dt = z cos t has the closed form z0 * exp(sin t) (cond only)."""

    def forward(self, x, t, indicator):
        return x * torch.cos(t).view(-1, 1, 1, 1) + 0.5 * indicator.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_midpoint_is_second_order(backend):
    z0 = _pair()[0].double()
    exact = z0 * torch.exp(torch.sin(torch.tensor(1.0, dtype=torch.float64)))
    err = {}
    with crossflow_kernels.use_backend("torch" if backend == "torch" else backend):
        for method in ("euler", "midpoint"):
            for n in (4, 8, 16):
                out = EulerSampler(steps=n, guidance_scale=1.0, method=method)(TimeField(), z0.float())
                err[method, n] = (out.double() - exact).abs().max().item()
    # Halving dt divides Euler's error by ~2 and the midpoint's by ~4; the midpoint at 4 steps (8 NFE) beats
    # Euler at 16.
    assert 1.7 < err["euler", 8] / err["euler", 16] < 2.3
    assert 3.0 < err["midpoint", 8] / err["midpoint", 16] < 4.6
    assert err["midpoint", 4] < err["euler", 16]


def test_midpoint_step_by_hand_with_guidance():
    z0, vc = _pair(b=2)
    model = TimeField()
    s, n = 3.0, 3
    x = z0.clone()
    for i in range(n):
        t, dt = torch.tensor(i / n), torch.tensor(1 / n)

        def guided(z, tt):
            b = z.shape[0]
            vc_ = model(z, tt.expand(b), torch.zeros(b, dtype=torch.long))
            vu_ = model(z, tt.expand(b), torch.ones(b, dtype=torch.long))
            return vu_ + s * (vc_ - vu_)

        mid = x + dt / 2 * guided(x, t)
        x = x + dt * guided(mid, t + dt / 2)
    calls = []

    class Counting(TimeField):
        def forward(self, x, t, indicator):
            calls.append(x.shape[0])
            return super().forward(x, t, indicator)

    sampler = EulerSampler(steps=n, guidance_scale=s, method="midpoint")
    done = []
    out = sampler(Counting(), z0, callback=done.append)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    assert calls == [4] * (2 * n) and sampler.nfe() == 2 * n and done == [1] * n  # one batched 2B forward per NFE


def test_method_arguments():
    with pytest.raises(ValueError, match="method"):
        EulerSampler(method="heun")
    with pytest.raises(ValueError, match="official_grid"):
        EulerSampler(official_grid=True, method="midpoint")
    assert EulerSampler(steps=7).nfe() == 7 and EulerSampler(steps=7, method="midpoint").nfe(3) == 6
    assert "midpoint" in repr(EulerSampler(method="midpoint"))
