"""Flow-matching math of crossflow.flow on analytic cases (the design notes outside this repository,
reference/crossflow.md §1.3, §1.7, §8)."""

import math

import pytest
import torch

from crossflow.flow import (
    contrastive_loss,
    flow_matching_loss,
    indicator_dropout,
    interpolate,
    kl_loss,
    sample_t,
    velocity_target,
)

SIGMA = 1e-5


def test_sample_t_is_logit_normal_in_open_interval():
    t = sample_t(20000, torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    # Same generator seed -> same draws: the trainer's resumability rests on this.
    assert torch.equal(t, sample_t(20000, torch.Generator().manual_seed(0)))


def test_path_endpoints_and_target_is_its_derivative():
    z0, z1 = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    zero, one = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(interpolate(z0, z1, zero, SIGMA), z0)
    torch.testing.assert_close(interpolate(z0, z1, one, SIGMA), z1 + SIGMA * z0)
    t, h = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), 1e-6
    fd = (interpolate(z0, z1, t + h, SIGMA) - interpolate(z0, z1, t - h, SIGMA)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(z0, z1, SIGMA), rtol=1e-6, atol=1e-6)


def test_target_is_constant_for_a_shifted_image():
    # z1 = z0 + c: the straight path moves every sample by c (plus the sigma_min pull on z0).
    z0, c = torch.randn(4, 4, 3, 3, dtype=torch.float64), torch.randn(1, 4, 3, 3, dtype=torch.float64)
    assert torch.equal(velocity_target(z0, z0 + c, 0.0), (z0 + c) - z0)
    torch.testing.assert_close(velocity_target(z0, z0 + c, 0.0), c.expand_as(z0))
    torch.testing.assert_close(velocity_target(z0, z0 + c, SIGMA), c + SIGMA * z0)


def test_flow_matching_loss_is_per_sample_mean_then_batch_mean():
    pred, target = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    manual = torch.stack([((p - q) ** 2).mean() for p, q in zip(pred, target)]).mean()
    torch.testing.assert_close(flow_matching_loss(pred, target), manual)
    assert flow_matching_loss(target, target).item() == 0.0
    with pytest.raises(ValueError, match="pred"):
        flow_matching_loss(pred, target[:, :1])


def test_contrastive_loss_low_when_matched_high_when_shuffled():
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(8, 4, 4, 4, generator=g)
    feat = 3.0 * z0.flatten(1)  # same direction, other norm: normalisation must ignore the scale
    scale = torch.tensor(math.log(1 / 0.07))  # open_clip init, used raw (not exponentiated)
    matched = contrastive_loss(z0, feat, scale)
    shuffled = contrastive_loss(z0, feat.roll(1, dims=0), scale)
    assert matched.item() < 0.2 * shuffled.item()  # raw scale 2.66 caps the margin: ~0.42 vs ~3.1
    # Symmetric CLIP cross-entropy with the raw scale, written out.
    a = torch.nn.functional.normalize(feat, dim=-1)
    b = torch.nn.functional.normalize(z0.flatten(1), dim=-1)
    logits = scale * a @ b.T
    lbl = torch.arange(8)
    manual = 0.5 * (torch.nn.functional.cross_entropy(logits, lbl) + torch.nn.functional.cross_entropy(logits.T, lbl))
    torch.testing.assert_close(matched, manual)
    # logit scale 0: uniform logits, loss log(B), whatever the features.
    torch.testing.assert_close(contrastive_loss(z0, feat.roll(1, 0), torch.tensor(0.0)), torch.tensor(math.log(8)))


def test_kl_kinds():
    mu, logvar = torch.randn(6, 50, dtype=torch.float64), 0.3 * torch.randn(6, 50, dtype=torch.float64)
    std = (0.5 * logvar).exp()
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, std), torch.distributions.Normal(0, 1))
    torch.testing.assert_close(kl_loss(mu, logvar, "standard").double(), ref.sum(1).mean(), rtol=1e-5, atol=1e-5)
    official = (-0.5 * (1 + logvar - (0.3 * mu) ** 6 - logvar.exp()).sum(1)).mean()
    torch.testing.assert_close(kl_loss(mu, logvar, "official").double(), official, rtol=1e-5, atol=1e-5)
    # At the prior both vanish; for |mu| = 1 the official pull is far weaker than mu^2.
    zeros = torch.zeros(2, 8)
    assert kl_loss(zeros, zeros, "standard").item() == 0.0 == kl_loss(zeros, zeros, "official").item()
    ones = torch.ones(2, 8)
    assert kl_loss(ones, zeros, "official").item() < 1e-2 * kl_loss(ones, zeros, "standard").item()
    with pytest.raises(ValueError, match="kind"):
        kl_loss(mu, logvar, "paper")


def _seed_with_nulls(b: int, p: float, count: int) -> int:
    for seed in range(10_000):
        if int((torch.rand(b, generator=torch.Generator().manual_seed(seed)) < p).sum()) == count:
            return seed
    raise AssertionError("no seed found")


def test_indicator_dropout_rolls_only_inside_the_null_subset():
    b, p = 10, 0.4
    z1 = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, 2, 2).clone()
    before = z1.clone()
    seed = _seed_with_nulls(b, p, 4)
    null = torch.rand(b, generator=torch.Generator().manual_seed(seed)) < p
    ind, tgt = indicator_dropout(z1, p, torch.Generator().manual_seed(seed))
    assert ind.dtype == torch.long and torch.equal(ind.bool(), null)
    idx = null.nonzero().squeeze(1)
    ids = tgt[:, 0, 0, 0].long()
    assert torch.equal(ids[~null], torch.arange(b)[~null])  # cond samples keep their own image
    assert torch.equal(ids[idx], torch.cat([idx[1:], idx[:1]]))  # official cat(t[1:], t[:1]) inside the subset
    assert torch.equal(z1, before)  # the caller's targets are not modified


@pytest.mark.parametrize("b,p,count", [(10, 0.2, 1), (10, 0.0, 0), (1, 1.0, 1)])
def test_indicator_dropout_never_applies_to_a_single_sample(b, p, count):
    z1 = torch.randn(b, 2, 2, 2)
    seed = _seed_with_nulls(b, p, count)
    ind, tgt = indicator_dropout(z1, p, torch.Generator().manual_seed(seed))
    assert ind.sum().item() == 0 and torch.equal(tgt, z1)


def test_indicator_dropout_all_null_rolls_the_whole_batch():
    z1 = torch.randn(5, 1, 2, 2)
    ind, tgt = indicator_dropout(z1, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(ind, torch.ones(5, dtype=torch.long)) and torch.equal(tgt, z1.roll(-1, dims=0))
    with pytest.raises(ValueError, match="p must be"):
        indicator_dropout(z1, 1.5)


# ---------------------------------------------------------------------------------------------------------------------
# The full training loss (CrossFlow.forward) on the real tiny model, default kernels backend
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny():
    from crossflow.config import CrossFlowConfig
    from crossflow.models.model import CrossFlow

    cfg = CrossFlowConfig.from_name("tiny")
    return cfg, CrossFlow(cfg)


def _batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, cfg.text_len, cfg.text_dim, generator=g)
    mask = torch.ones(b, cfg.text_len, dtype=torch.bool)
    mask[0, cfg.text_len // 2:] = False
    return emb, mask, torch.randn(b, *cfg.latent_shape, generator=g)


def test_crossflow_loss_components_and_determinism(tiny):
    cfg, model = tiny
    emb, mask, z1 = _batch(cfg)
    loss, parts = model(emb, mask, z1, torch.Generator().manual_seed(3))
    assert loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), parts["fm"] + parts["clip"] + cfg.kl_weight * parts["kl"])
    model.eval()  # no dropout: the same generator seed must give the same loss
    a, _ = model(emb, mask, z1, torch.Generator().manual_seed(3))
    b, _ = model.loss(emb, mask, z1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_flow_loss_trains_the_text_ve_through_z0(tiny):
    # Switch the CLIP and KL terms off (scale 0 -> constant CE; weight 0): any VE gradient then comes through z0.
    from crossflow.models.model import CrossFlow

    cfg = tiny[0].replace(kl_weight=0.0)
    model = CrossFlow(cfg)
    with torch.no_grad():
        model.logit_scale.zero_()
    emb, mask, z1 = _batch(cfg)
    loss, _ = model(emb, mask, z1, torch.Generator().manual_seed(0))
    loss.backward()
    ve_grads = [p.grad for p in model.text_ve.parameters() if p.grad is not None]
    assert ve_grads and sum(g.abs().sum().item() for g in ve_grads) > 0
