"""FlowTransformer / TextVE / CrossFlow / autoencoders on the `tiny` preset (torch backend; the Triton path is checked
against it in test_parity.py)."""

import math

import pytest
import torch

from crossflow.encoders.autoencoder import IdentityAutoencoder, VAEAutoencoder, build_autoencoder
from crossflow.config import CrossFlowConfig
from crossflow.models.model import CrossFlow, FlowTransformer
from crossflow.models.text_ve import TextVE

TINY = CrossFlowConfig.from_name("tiny")


pytestmark = pytest.mark.usefixtures("torch_backend")


def inputs(cfg=TINY, B=3):
    x = torch.randn(B, *cfg.latent_shape)
    t = torch.rand(B)
    ind = torch.tensor([0, 1, 0][:B])
    return x, t, ind


def test_flow_output_is_zero_at_init_and_has_latent_shape():
    x, t, ind = inputs()
    v = FlowTransformer(TINY)(x, t, ind)
    assert v.shape == x.shape
    assert torch.equal(v, torch.zeros_like(v))


def test_every_block_is_identity_at_init():
    flow = FlowTransformer(TINY)
    seen = []

    def hook(module, args, out):
        x_in, x_out = args[0], out[0]
        seen.append(torch.equal(x_in, x_out))

    for b in flow.blocks:
        b.register_forward_hook(hook)
    flow(*inputs())
    assert seen == [True] * TINY.depth


def test_wrong_shapes_raise(perturb):
    flow = FlowTransformer(TINY)
    x, t, ind = inputs()
    with pytest.raises(ValueError, match=r"expected latent \(B, C, H, W\) = \(B, 4, 8, 8\), got \(3, 4, 8, 6\)"):
        flow(x[..., :6], t, ind)
    with pytest.raises(ValueError, match="expected t of shape"):
        flow(x, t[:2], ind)
    with pytest.raises(ValueError, match="indicator"):
        flow(x, t, ind.float())
    # a 0-d t broadcasts over the batch
    perturb(flow)
    torch.testing.assert_close(flow(x, t[0], ind), flow(x, t[0].expand(3), ind))


def test_indicator_and_time_condition_the_output(perturb):
    flow = perturb(FlowTransformer(TINY)).eval()
    x, t, _ = inputs()
    v_c = flow(x, t, torch.zeros(3, dtype=torch.long))
    v_u = flow(x, t, torch.ones(3, dtype=torch.long))
    assert (v_c - v_u).abs().max() > 1e-3
    assert torch.equal(v_u, flow(x, t, torch.ones(3, dtype=torch.bool)))
    assert (flow(x, t * 0.5, torch.zeros(3, dtype=torch.long)) - v_c).abs().max() > 1e-4


def test_pos_embed_is_a_fixed_unsaved_buffer():
    flow = FlowTransformer(TINY)
    assert "pos_embed" not in dict(flow.named_parameters())
    assert "pos_embed" not in flow.state_dict()
    assert flow.pos_embed.shape == (1, TINY.num_tokens, TINY.hidden_size)


def test_gradient_checkpointing_matches(perturb):
    flow = perturb(FlowTransformer(TINY))
    x, t, ind = inputs()
    flow(x, t, ind).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in flow.named_parameters()}
    flow.zero_grad()
    flow.gradient_checkpointing = True
    flow(x, t, ind).square().sum().backward()
    for n, p in flow.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_half_precision_forward(perturb):
    flow = perturb(FlowTransformer(TINY)).to(torch.bfloat16)
    x, t, ind = inputs()
    v = flow(x.bfloat16(), t, ind)
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all()


def test_text_ve_shapes_scale_and_mask():
    ve = TextVE(TINY).eval()
    B, L = 2, TINY.text_len
    emb = torch.randn(B, L, TINY.text_dim)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 4:] = False
    mu, logvar = ve(emb, mask)
    assert mu.shape == logvar.shape == (B, TINY.latent_numel)
    # int masks (as tokenizers return) are accepted
    torch.testing.assert_close(ve(emb, mask.long())[0], mu)
    # text_scale multiplies the embeddings, nowhere else
    ve10 = TextVE(TINY.replace(text_scale=10.0)).eval()
    ve10.load_state_dict(ve.state_dict())
    torch.testing.assert_close(ve10(emb, mask)[0], ve(emb * 10, mask)[0])
    # valid tokens never attend to padding: their features ignore what sits in padded slots
    feats = []
    ve.reduction_layers[-1].register_forward_hook(lambda m, a, out: feats.append(out))
    emb2 = emb.clone()
    emb2[0, 4:] = torch.randn(L - 4, TINY.text_dim)
    ve(emb, mask), ve(emb2, mask)
    torch.testing.assert_close(feats[0][0, :4], feats[1][0, :4])
    torch.testing.assert_close(feats[0][1], feats[1][1])
    with pytest.raises(ValueError, match=r"expected emb \(B, text_len, text_dim\) = \(B, 7, 32\)"):
        ve(emb[:, :5], mask)
    with pytest.raises(ValueError, match="expected mask"):
        ve(emb, mask[:, :5])


def test_text_ve_passes_key_lengths_for_prefix_masks_and_the_mask_otherwise(monkeypatch):
    import crossflow_kernels

    from crossflow.models import text_ve

    ve = TextVE(TINY).eval()
    B, L = 3, TINY.text_len
    emb = torch.randn(B, L, TINY.text_dim)
    prefix = torch.arange(L) < torch.tensor([[4], [L], [0]])  # ragged, full, empty
    holes = prefix.clone()
    holes[1, 2] = False  # not a prefix: a pad inside the text
    seen, attention = [], crossflow_kernels.attention

    def spy(q, k, v, **kw):
        seen.append(sorted(kw))
        return attention(q, k, v, **kw)

    monkeypatch.setattr(text_ve.crossflow_kernels, "attention", spy)
    with_lengths = ve(emb, prefix)
    assert seen and all(s == ["key_lengths"] for s in seen)
    seen.clear()
    ve(emb, holes)
    assert seen and all(s == ["key_padding_mask"] for s in seen)
    assert text_ve.key_arguments(None) == {}
    # the lengths give the mask's answer (the kernels' own equality is tests/crossflow_kernels' business)
    monkeypatch.setattr(text_ve, "key_arguments", lambda m: {"key_padding_mask": m})
    for a, b in zip(with_lengths, ve(emb, prefix)):
        torch.testing.assert_close(a, b)


def test_text_ve_compressor_and_adaptor_variant():
    cfg = TINY.replace(text_dim=48, ve_compress_dim=32, ve_adaptor=True, ve_adaptor_grid=8)
    ve = TextVE(cfg)
    assert ve.compressor is not None and hasattr(ve, "adaptor") and not hasattr(ve, "linear")
    mu, logvar = ve(torch.randn(2, cfg.text_len, 48), torch.ones(2, cfg.text_len, dtype=torch.bool))
    assert mu.shape == logvar.shape == (2, cfg.latent_numel)


def test_crossflow_parts(perturb):
    model = CrossFlow(TINY).eval()  # eval: VE dropout off, so z0's only randomness is the generator's noise
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    B = 3
    emb, mask = torch.randn(B, TINY.text_len, TINY.text_dim), torch.ones(B, TINY.text_len, dtype=torch.bool)
    z0, mu, logvar = model.encode_text(emb, mask, generator=torch.Generator().manual_seed(1))
    assert z0.shape == (B, *TINY.latent_shape) and mu.shape == logvar.shape == (B, TINY.latent_numel)
    z0b, _, _ = model.encode_text(emb, mask, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z0, z0b)
    eps = (z0.flatten(1) - mu) / torch.exp(0.5 * logvar)
    torch.testing.assert_close(eps, torch.randn(B, TINY.latent_numel, generator=torch.Generator().manual_seed(1)))
    assert model.image_encoder(z0).shape == (B, TINY.latent_numel)
    v = model.velocity(z0, torch.rand(B), torch.zeros(B, dtype=torch.long))
    assert v.shape == z0.shape
    # the flow loss reaches the VE through z0 (nothing detached)
    model.train()
    z0, _, _ = model.encode_text(emb, mask)
    perturb(model.flow)(z0, torch.rand(B), torch.zeros(B, dtype=torch.long)).square().mean().backward()
    assert model.text_ve.layers[0].attn.W_Q.weight.grad.abs().sum() > 0


def test_identity_autoencoder():
    ae = build_autoencoder(CrossFlowConfig.from_name("digits"))
    assert isinstance(ae, IdentityAutoencoder)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(ae.decode(ae.encode(x)), x)


def test_vae_autoencoder_wraps_a_tiny_random_autoencoderkl():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=16,
    )
    ae = VAEAutoencoder(vae)  # CrossFlow's scale by default
    assert ae.scale == pytest.approx(0.23010) and ae.downsample == 2 and not ae.training
    assert not any(p.requires_grad for p in ae.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = ae.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8)
    post = vae.encode(x).latent_dist
    torch.testing.assert_close(z, 0.23010 * post.sample(generator=torch.Generator().manual_seed(0)))
    img = ae.decode(z)
    assert img.shape == x.shape
    torch.testing.assert_close(img, vae.decode(z / 0.23010).sample)
    with pytest.raises(ValueError, match="expected latent"):
        ae.decode(z[:, :3])
    with pytest.raises(ValueError, match="multiples of 2"):
        ae.encode(x[..., :15, :15])
