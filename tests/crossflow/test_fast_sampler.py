"""FastSampler: same results as EulerSampler (CPU: eager; GPU: CUDA-graph replay), caching rules, capture errors."""

import pytest
import torch

import crossflow_kernels
from crossflow.config import CrossFlowConfig
from crossflow.fast_sampler import FastSampler
from crossflow.models.model import FlowTransformer
from crossflow.sampling import EulerSampler

ON_GPU = torch.cuda.is_available()


class Affine(torch.nn.Module):
    """A tiny velocity field with every input mattering: v = conv(x) * (1 + t) + indicator."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 1)

    def forward(self, x, t, indicator):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1)) + indicator.view(-1, 1, 1, 1).to(x.dtype)


@pytest.fixture
def tiny_flow(perturb):
    """`tiny_flow(device)` -> (cfg, a tiny FlowTransformer moved off adaLN-Zero, so the flow is not the zero field)."""

    def make(device="cpu"):
        torch.manual_seed(0)
        cfg = CrossFlowConfig.from_name("tiny")
        return cfg, perturb(FlowTransformer(cfg), std=0.02, everywhere=True).to(device).eval()

    return make


@pytest.mark.parametrize("guidance", [1.0, 7.0])
@pytest.mark.parametrize("official_grid,method", [(False, "euler"), (True, "euler"), (False, "midpoint")])
def test_fast_matches_euler_on_cpu_tiny(tiny_flow, guidance, official_grid, method, torch_backend):
    # The samplers' step grids, guidance and updates compared on one backend: torch, as on a GPU machine's CPU tensors
    # (the model's Triton path is test_parity.py's; the GPU tests below run FastSampler on Triton).
    cfg, model = tiny_flow()
    z0 = torch.randn(2, *cfg.latent_shape)
    kw = dict(steps=4, guidance_scale=guidance, official_grid=official_grid, method=method)
    ref = EulerSampler(**kw)(model, z0)
    got = FastSampler(**kw)(model, z0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if method == "midpoint":  # a different method, not a relabelled Euler
        assert not torch.allclose(got, EulerSampler(steps=4, guidance_scale=guidance)(model, z0), atol=1e-4)


def test_fast_sampler_call_overrides_and_no_mutation():
    model, z0 = Affine(), torch.randn(3, 4, 5, 5)
    keep = z0.clone()
    fs, es = FastSampler(steps=3), EulerSampler(steps=3)
    torch.testing.assert_close(fs(model, z0, steps=5, guidance_scale=2.0), es(model, z0, steps=5, guidance_scale=2.0))
    assert torch.equal(z0, keep)


def test_fast_sampler_asks_sampling_guidance_and_reports_steps(monkeypatch):
    """Guidance on/off is decided by `crossflow.sampling.guidance` alone, in FastSampler too; the progress callback
    sees every step (eagerly one by one; after a replay all at once)."""
    from crossflow import sampling

    calls = []

    class Recorder(Affine):
        def forward(self, x, t, indicator):
            calls.append(x.shape[0])
            return super().forward(x, t, indicator)

    z0, done = torch.randn(3, 4, 5, 5), []
    FastSampler(steps=2, guidance_scale=7.0)(Recorder(), z0, callback=done.append)
    assert calls == [6, 6] and sum(done) == 2
    calls.clear()
    monkeypatch.setattr(sampling, "guidance", lambda s: None)
    FastSampler(steps=2, guidance_scale=7.0)(Recorder(), z0)
    assert calls == [3, 3]


def test_fast_sampler_bad_arguments():
    with pytest.raises(ValueError, match="max_graphs"):
        FastSampler(max_graphs=0)
    with pytest.raises(ValueError, match="steps"):
        FastSampler(steps=0)
    with pytest.raises(ValueError, match="4-D"):
        FastSampler(steps=2)(Affine(), torch.randn(4, 5, 5))


# ---------------------------------------------------------------------------------------------------------------------
# GPU: CUDA-graph capture
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_graph_replay_equals_eager_and_caches(tiny_flow, dtype):
    cfg, model = tiny_flow("cuda")
    model = model.to(dtype)
    fs = FastSampler(steps=6, guidance_scale=5.0)
    es = EulerSampler(steps=6, guidance_scale=5.0)
    z0 = torch.randn(2, *cfg.latent_shape, device="cuda", dtype=dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(fs(model, z0), es(model, z0), **tol)
    assert fs.captures == 1
    # Same key: replay, no re-capture; new prompts (z0) and a new guidance scale are read from device memory.
    z1 = torch.randn_like(z0)
    torch.testing.assert_close(fs(model, z1, guidance_scale=2.5), es(model, z1, guidance_scale=2.5), **tol)
    assert fs.captures == 1
    # A new batch size is a new key: a second graph.
    z2 = torch.randn(3, *cfg.latent_shape, device="cuda", dtype=dtype)
    torch.testing.assert_close(fs(model, z2), es(model, z2), **tol)
    assert fs.captures == 2
    # Guidance off is its own graph (one pass per step).
    torch.testing.assert_close(fs(model, z0, guidance_scale=1.0), es(model, z0, guidance_scale=1.0), **tol)
    assert fs.captures == 3


@pytest.mark.gpu
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_graph_replay_of_the_midpoint_method(tiny_flow, guidance):
    cfg, model = tiny_flow("cuda")
    fs = FastSampler(steps=4, guidance_scale=guidance, method="midpoint")
    es = EulerSampler(steps=4, guidance_scale=guidance, method="midpoint")
    for seed in (0, 1):  # capture, then replay with new latents
        z0 = torch.randn(2, *cfg.latent_shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        torch.testing.assert_close(fs(model, z0), es(model, z0), atol=1e-4, rtol=1e-4)
    assert fs.captures == 1


@pytest.mark.gpu
def test_graph_cache_is_bounded_and_reallocation_recaptures():
    model = Affine().cuda()
    fs = FastSampler(steps=3, max_graphs=2)
    for b in (1, 2, 3):
        fs(model, torch.randn(b, 4, 8, 8, device="cuda"))
    assert len(fs._graphs) == 2 and fs.captures == 3
    z0 = torch.randn(3, 4, 8, 8, device="cuda")
    fs(model, z0)
    assert fs.captures == 3
    model.conv.weight.data = model.conv.weight.data.clone()  # re-allocated parameter: the old graph is stale
    torch.testing.assert_close(fs(model, z0), EulerSampler(steps=3)(model, z0))
    assert fs.captures == 4


@pytest.mark.gpu
def test_uncapturable_model_raises_with_cause_and_fix():
    class Syncing(Affine):
        def forward(self, x, t, indicator):
            if x.abs().max().item() > 1e9:  # a host sync: illegal inside capture
                return x
            return super().forward(x, t, indicator)

    with pytest.raises(RuntimeError, match="could not be captured.*use_cuda_graph=False"):
        FastSampler(steps=2)(Syncing().cuda(), torch.randn(1, 4, 8, 8, device="cuda"))


@pytest.mark.gpu
def test_model_with_host_state_is_caught_by_the_replay_check():
    class Counter(Affine):
        calls = 0

        def forward(self, x, t, indicator):
            Counter.calls += 1  # the graph freezes this value: replay diverges from eager
            return super().forward(x, t, indicator) * Counter.calls

    with pytest.raises(RuntimeError, match="differs from eager"):
        FastSampler(steps=3)(Counter().cuda(), torch.randn(1, 4, 8, 8, device="cuda"))


@pytest.mark.gpu
def test_eager_mode_on_gpu_matches(tiny_flow):
    cfg, model = tiny_flow("cuda")
    z0 = torch.randn(2, *cfg.latent_shape, device="cuda")
    with crossflow_kernels.use_backend("triton"):
        got = FastSampler(steps=4, use_cuda_graph=False)(model, z0)
    torch.testing.assert_close(got, EulerSampler(steps=4)(model, z0), atol=1e-4, rtol=1e-4)
