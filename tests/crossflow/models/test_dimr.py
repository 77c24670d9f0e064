"""The DiMR flow network (`crossflow.models.dimr`) on `dimr-tiny`: torch vs Triton on every gradient, no host sync in
the forward, the sampler and gradient checkpointing, training steps with the official weight-decay groups, QKNorm, bf16
autocast, and DiMR inside CrossFlow (save/load, FastSampler). Against the official code:
`tests/crossflow/official/test_dimr_official.py`."""

from __future__ import annotations

import math

import pytest
import torch

import crossflow_kernels
from crossflow.convert.dimr import official_dimr_shapes
from crossflow.models.dimr import DiMRConfig, DiMRFlow, multiscale_flow_loss
from crossflow.sampling import EulerSampler
from crossflow_kernels.testing import assert_close_to_ref


# ---------------------------------------------------------------------------------------------------------------------
# (a) torch vs Triton backend on dimr-tiny, forward and every gradient
# ---------------------------------------------------------------------------------------------------------------------


def _fwd_bwd(model, backend, x, t, ind):
    model.zero_grad(set_to_none=True)
    with crossflow_kernels.use_backend(backend):
        outs = model(x, t, ind, return_all=True)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum() for o in outs)
        loss.backward()
    return [o.detach() for o in outs], {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm_type, qk_norm", [("tdrms", False), pytest.param("adarms", True, marks=pytest.mark.slow)])
def test_tiny_torch_vs_triton(device, norm_type, qk_norm, randomize):
    """Every kernel the released layout uses: rms_norm (TDRMSNorm), rms adaLN + fused residual (TDRMSNorm after a
    residual add), layer adaLN (TD-LayerNorm), GEGLU, attention with the indicator token (ragged T = 1 + 2 * 2); and
    the opt-in norms: AdaRMSNorm on tokens and on ConvNeXt maps (rms_norm with a (B, 1, W, D) weight), QKNorm (q and
    k in one rms_norm call on the fused qkv view)."""
    cfg = DiMRConfig.from_name("dimr-tiny", norm_type=norm_type, qk_norm=qk_norm)
    model = DiMRFlow(cfg).to(device)
    randomize(model, torch.Generator().manual_seed(3))
    B = 2
    x = torch.randn(B, *cfg.latent_shape, device=device)
    t, ind = torch.tensor([0.3, 0.8], device=device), torch.tensor([0, 1], device=device)
    ref_out, ref_grads = _fwd_bwd(model, "torch", x, t, ind)
    out, grads = _fwd_bwd(model, "triton", x, t, ind)
    for i, (o, r) in enumerate(zip(out, ref_out, strict=True)):
        assert_close_to_ref(o, r, name=f"level {i}", atol=1e-4, rtol=1e-4)
    for n, g in ref_grads.items():
        assert g.abs().sum() > 0, f"{n}: zero gradient, the comparison would not see a bug"
        assert_close_to_ref(grads[n], g, name=f"grad {n}", atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# (b) no host sync in the forward
# ---------------------------------------------------------------------------------------------------------------------


def test_forward_has_no_host_sync(monkeypatch):
    """fullgraph compilation fails on any `.item()`, `.tolist()` or Python branch on a tensor value; the mock catches
    them in eager mode too."""
    cfg = DiMRConfig.from_name("dimr-tiny")
    model = DiMRFlow(cfg)
    x, t, ind = torch.randn(3, *cfg.latent_shape), torch.rand(3), torch.tensor([0, 1, 1])
    with crossflow_kernels.use_backend("torch"), torch.no_grad():
        eager = model(x, t, ind, return_all=True)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x, t, ind, return_all=True)

        def sync(*a, **k):
            raise AssertionError("host sync in the DiMR forward")

        for name in ("item", "tolist", "__bool__"):
            monkeypatch.setattr(torch.Tensor, name, sync)
        mocked = model(x, t, ind)
        monkeypatch.undo()
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(mocked, eager[-1])


# ---------------------------------------------------------------------------------------------------------------------
# (c) around the network: sampler, checkpointing, training steps, options
# ---------------------------------------------------------------------------------------------------------------------


def test_euler_sampler_runs_dimr_and_checkpointing_is_exact():
    cfg = DiMRConfig.from_name("dimr-tiny")
    model = DiMRFlow(cfg)
    z0 = torch.randn(2, *cfg.latent_shape)
    with crossflow_kernels.use_backend("torch"):
        z1 = EulerSampler(steps=3, guidance_scale=3.0)(model, z0)
        assert z1.shape == z0.shape and torch.isfinite(z1).all() and not torch.equal(z1, z0)
        x, t, ind = torch.randn(2, *cfg.latent_shape), torch.rand(2), torch.tensor([0, 1])
        grads = []
        for ckpt in (False, True):
            model.zero_grad(set_to_none=True)
            model.gradient_checkpointing = ckpt
            sum(o.square().sum() for o in model(x, t, ind, return_all=True)).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n])


def test_tiny_trains_with_official_weight_decay_groups():
    """A few AdamW steps on one batch lower the multi-scale loss, with the official groups: wd 0.03 except nodecay_*."""
    cfg = DiMRConfig.from_name("dimr-tiny")
    model = DiMRFlow(cfg)
    nodecay = set(model.no_weight_decay_names())
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in params.items() if n not in nodecay]},
                             {"params": [params[n] for n in sorted(nodecay)], "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.9), weight_decay=0.03)
    x, v = torch.randn(4, *cfg.latent_shape), torch.randn(4, *cfg.latent_shape)
    t, ind = torch.rand(4), torch.tensor([0, 1, 0, 0])
    losses = []
    with crossflow_kernels.use_backend("torch"):
        for _ in range(8):
            loss = multiscale_flow_loss(model(x, t, ind, return_all=True), v, cfg.loss_coeffs).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.gpu
def test_fast_sampler_captures_dimr(randomize):
    """CUDA-graph capture of the whole CFG Euler loop over a DiMR network (time-dependent parameters included)
    reproduces the eager sampler."""
    from crossflow.fast_sampler import FastSampler

    cfg = DiMRConfig.from_name("dimr-tiny")
    model = DiMRFlow(cfg).cuda().eval()
    randomize(model, torch.Generator().manual_seed(5))
    z0 = torch.randn(3, *cfg.latent_shape, device="cuda")
    fast = FastSampler(steps=6, guidance_scale=4.0, official_grid=True)
    got = fast(model, z0)
    again = fast(model, z0)
    assert fast.captures == 1
    want = EulerSampler(steps=6, guidance_scale=4.0, official_grid=True)(model, z0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


def test_qk_norm_option():
    """Our opt-in QKNorm (official `QKNorm` math: rms-normalised heads times exp(s / 2) / Dh^(1/4), s clamped in place
    at log 100, gradient through): runs forward/backward with checkpointing, clamps, and is refused by the converter."""
    cfg = DiMRConfig.from_name("dimr-tiny", qk_norm=True)
    model = DiMRFlow(cfg)
    attn = model.stages[0].blocks[0].attn
    with torch.no_grad():
        attn.qk_log_scale[0] = 10.0
    model.gradient_checkpointing = True
    x, t, ind = torch.randn(2, *cfg.latent_shape), torch.rand(2), torch.tensor([0, 1])
    with crossflow_kernels.use_backend("torch"):
        model(x, t, ind).square().sum().backward()
    assert attn.qk_log_scale[0].item() == pytest.approx(math.log(100.0))
    assert attn.qk_log_scale.grad.abs().min() > 0
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    s = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    gain = torch.exp(0.5 * s - 0.25 * math.log(8))[:, None, None]
    want = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * gain
    from crossflow.models.dimr import qk_norm_ref

    torch.testing.assert_close(qk_norm_ref(q, s), want)
    with pytest.raises(ValueError, match="qk_norm"):
        official_dimr_shapes(cfg)


def test_bf16_autocast_forward_backward():
    """dtype plumbing under bf16 autocast (the GPU training mode): norm vectors follow the activations' dtype."""
    cfg = DiMRConfig.from_name("dimr-tiny")
    model = DiMRFlow(cfg)
    x, t, ind = torch.randn(2, *cfg.latent_shape), torch.rand(2), torch.tensor([0, 1])
    with crossflow_kernels.use_backend("torch"):
        ref = model(x, t, ind, return_all=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, ind, return_all=True)
            sum(o.float().square().sum() for o in out).backward()
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == torch.bfloat16
        assert (o.float() - r).abs().max() <= 0.05 * r.abs().max()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# (d) DiMR inside CrossFlow: save/load, samplers
# ---------------------------------------------------------------------------------------------------------------------


def test_crossflow_dimr_save_load_round_trip_and_weight_decay_groups(tmp_path, randomize):
    from crossflow.config import CrossFlowConfig
    from crossflow.models.model import CrossFlow
    from crossflow.training.train import param_groups

    cfg = CrossFlowConfig.from_name("dimr-tiny")
    model = CrossFlow(cfg)
    randomize(model.flow, torch.Generator().manual_seed(2))
    model.save_pretrained(tmp_path / "m")
    back = CrossFlow.from_pretrained(tmp_path / "m")
    assert back.config == cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t, ind = torch.randn(2, *cfg.latent_shape), torch.rand(2), torch.tensor([0, 1])
    with crossflow_kernels.use_backend("torch"):
        torch.testing.assert_close(back.velocity(x, t, ind), model.velocity(x, t, ind), atol=0, rtol=0)
    decay, plain = param_groups(model, 0.03)
    nodecay = {id(model.flow.get_parameter(n)) for n in model.flow.no_weight_decay_names()}
    assert nodecay and nodecay <= {id(p) for p in plain["params"]}
    assert not nodecay & {id(p) for p in decay["params"]}


def test_fast_sampler_on_cpu_equals_euler_on_a_dimr_crossflow(randomize):
    """On the CPU FastSampler runs the same ops eagerly: bit-equal to EulerSampler on a DiMR model (the GPU capture
    test is `test_fast_sampler_captures_dimr`)."""
    from crossflow.config import CrossFlowConfig
    from crossflow.fast_sampler import FastSampler
    from crossflow.models.model import CrossFlow

    model = CrossFlow(CrossFlowConfig.from_name("dimr-tiny")).eval()
    randomize(model.flow, torch.Generator().manual_seed(4))
    z0 = torch.randn(3, *model.config.latent_shape)
    with crossflow_kernels.use_backend("torch"), torch.no_grad():
        got = FastSampler(steps=5, guidance_scale=4.0, official_grid=True)(model.flow, z0)
        want = EulerSampler(steps=5, guidance_scale=4.0, official_grid=True)(model.flow, z0)
    assert not torch.equal(got, z0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
