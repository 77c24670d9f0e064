"""The official-checkpoint converter, checked against INDEPENDENT reference forwards written here over the official
layout (`libs/model/dit_t2i.py` on timm layers; `libs/model/trans_autoencoder.py`), not against our modules."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossflow.config import CrossFlowConfig
from crossflow.convert.dit import (
    convert_official_state_dict,
    load_official_checkpoint,
    official_flow_shapes,
    official_ve_shapes,
)
from crossflow.models.model import CrossFlow

TINY = CrossFlowConfig.from_name("tiny")
T5_LIKE = TINY.replace(text_dim=48, ve_compress_dim=32, ve_adaptor=True, ve_adaptor_grid=8, text_scale=10.0)
TOL = dict(atol=2e-5, rtol=2e-5)  # fp32, same math in a different operation order


pytestmark = pytest.mark.usefixtures("torch_backend")


# ------------------------------------------------------------------------------------------------------------------
# The official layout, written from the official code
# ------------------------------------------------------------------------------------------------------------------


def mae_pos_embed(dim, grid):
    """MAE / DiT `get_2d_sincos_pos_embed` (numpy)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), 0)
    g = g.reshape(2, 1, grid, grid)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


def official_state_dict(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else 1 / math.sqrt(shape[-1] if len(shape) > 1 else 8)
        return torch.randn(*shape, generator=g) * scale

    def linear(name, o, i):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rnd(o, i), rnd(o, scale=0.1)

    def layer_norm(name, shape, g_b=("weight", "bias")):
        sd[f"{name}.{g_b[0]}"] = 1 + rnd(*shape, scale=0.1)
        sd[f"{name}.{g_b[1]}"] = rnd(*shape, scale=0.1)

    # ---- DiT (dit_t2i.DiT)
    D, C, p, M = cfg.hidden_size, cfg.latent_channels, cfg.patch_size, int(cfg.hidden_size * cfg.mlp_ratio)
    sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"] = rnd(D, C, p, p, scale=0.3), rnd(D, scale=0.1)
    linear("t_embedder.mlp.0", D, 256)
    linear("t_embedder.mlp.2", D, D)
    sd["y_embedder.embedding_table.weight"] = rnd(2, D, scale=1.0)
    sd["pos_embed"] = torch.from_numpy(mae_pos_embed(D, cfg.latent_size // p)).float()[None]
    for i in range(cfg.depth):
        linear(f"blocks.{i}.attn.qkv", 3 * D, D)
        linear(f"blocks.{i}.attn.proj", D, D)
        linear(f"blocks.{i}.mlp.fc1", M, D)
        linear(f"blocks.{i}.mlp.fc2", D, M)
        linear(f"blocks.{i}.adaLN_modulation.1", 6 * D, D)
    linear("final_layer.linear", p * p * C, D)
    linear("final_layer.adaLN_modulation.1", 2 * D, D)
    # ---- Text VE (trans_autoencoder.TransEncoder, last_norm=False) under `context_encoder.`
    P, d = "context_encoder.", cfg.text_dim
    if cfg.ve_compress_dim:
        linear(P + "compressor.fc1", cfg.ve_compress_dim, d)
        layer_norm(P + "compressor.ln_fc1", (cfg.ve_compress_dim,))
        d = cfg.ve_compress_dim
        linear(P + "compressor.fc2", d, d)

    def encoder_layer(name, d, reduce):
        for w in ("W_Q", "W_K", "W_V", "W_O"):
            linear(f"{name}.attn.{w}", d, d)
        linear(f"{name}.feed_forward.ffn_1", cfg.ve_ff, d)
        linear(f"{name}.feed_forward.ffn_2", d, cfg.ve_ff)
        layer_norm(f"{name}.norm1", (d,), ("g", "b"))
        layer_norm(f"{name}.norm2", (d,), ("g", "b"))
        if reduce:
            linear(f"{name}.reduction", d // 2, d)

    for i in range(cfg.ve_layers):
        encoder_layer(f"{P}layers.{i}", d, False)
    for i in range(cfg.ve_reductions):
        encoder_layer(f"{P}reduction_layers.{i}", d, True)
        d //= 2
    flat, out = cfg.text_len * d, 2 * C * cfg.latent_size**2
    if cfg.ve_adaptor:
        n = cfg.ve_adaptor_grid
        linear(P + "adaptor.fc1", n * n, flat)
        layer_norm(P + "adaptor.ln_fc1", (n * n,))
        linear(P + "adaptor.fc2", n * n, n * n)
        layer_norm(P + "adaptor.ln_fc2", (n * n,))
        for name, o, i in (("conv1", 32, 1), ("conv2", 64, 32), ("conv3", out // (n * n), 64)):
            sd[f"{P}adaptor.{name}.weight"] = rnd(o, i, 3, 3, scale=1 / math.sqrt(9 * i))
            sd[f"{P}adaptor.{name}.bias"] = rnd(o, scale=0.1)
        layer_norm(P + "adaptor.ln_conv1", (32, n, n))
        layer_norm(P + "adaptor.ln_conv2", (64, n, n))
    else:
        linear(P + "linear", out, flat)
    # ---- the SigLIP image tower + projection (dropped by the converter) and its logit scale (kept)
    sd["open_clip.visual.trunk.patch_embed.proj.weight"] = rnd(8, 3, 4, 4)
    sd["open_clip_output.fc1.weight"] = rnd(16, 8)
    sd["open_clip.logit_scale"] = torch.tensor(2.5)
    return sd


def reference_dit(sd, cfg, x, t, y):
    """Official DiT forward (timm Attention/Mlp, LayerNorm(affine=False, eps=1e-6), modulate, unpatchify)."""
    D, H, p, C = cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.latent_channels

    def lin(z, name):
        return F.linear(z, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def modulate(z, shift, scale):
        return F.layer_norm(z, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_emb = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = t_emb + sd["y_embedder.embedding_table.weight"][y.int()]
    B, N = h.shape[:2]
    for i in range(cfg.depth):
        sm, cm, gm, sf, cf, gf = lin(F.silu(c), f"blocks.{i}.adaLN_modulation.1").chunk(6, dim=1)
        qkv = lin(modulate(h, sm, cm), f"blocks.{i}.attn.qkv").reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1) * (D // H) ** -0.5, dim=-1) @ v
        h = h + gm[:, None] * lin(a.transpose(1, 2).reshape(B, N, D), f"blocks.{i}.attn.proj")
        m = lin(F.gelu(lin(modulate(h, sf, cf), f"blocks.{i}.mlp.fc1"), approximate="tanh"), f"blocks.{i}.mlp.fc2")
        h = h + gf[:, None] * m
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(modulate(h, shift, scale), "final_layer.linear")
    G = cfg.latent_size // p
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, G, G, p, p, C))
    return out.reshape(B, C, G * p, G * p)


def reference_ve(sd, cfg, emb, mask):
    """Official TransEncoder forward (eval mode): custom LayerNorm, -1e9 masking, post-LN, reductions, head."""
    P = "context_encoder."

    def lin(z, name):
        return F.linear(z, sd[f"{P}{name}.weight"], sd[f"{P}{name}.bias"])

    def ln(z, name):
        mean, std = z.mean(-1, keepdim=True), z.std(-1, keepdim=True)
        return sd[f"{P}{name}.g"] * (z - mean) / (std + 1e-5) + sd[f"{P}{name}.b"]

    def mha(z, name):
        B, d = z.shape[0], z.shape[-1]
        heads, dk = cfg.ve_heads, d // cfg.ve_heads
        q, k, v = (lin(z, f"{name}.{w}").view(B, -1, heads, dk).transpose(1, 2) for w in ("W_Q", "W_K", "W_V"))
        s = (q @ k.transpose(-2, -1) / math.sqrt(dk)).masked_fill(mask[:, None, None, :] == 0, -1e9)
        o = (torch.softmax(s, -1) @ v).transpose(1, 2).contiguous().view(B, -1, d)
        return lin(o, f"{name}.W_O")

    def layer(z, name):
        t = ln(z + mha(z, f"{name}.attn"), f"{name}.norm1")
        f = lin(torch.relu(lin(t, f"{name}.feed_forward.ffn_1")), f"{name}.feed_forward.ffn_2")
        return ln(t + f, f"{name}.norm2")

    x = emb * cfg.text_scale
    if cfg.ve_compress_dim:
        n = cfg.ve_compress_dim
        x = lin(torch.relu(F.layer_norm(lin(x, "compressor.fc1"), (n,), sd[f"{P}compressor.ln_fc1.weight"],
                                        sd[f"{P}compressor.ln_fc1.bias"])), "compressor.fc2")
    for i in range(cfg.ve_layers):
        x = layer(x, f"layers.{i}")
    for i in range(cfg.ve_reductions):
        x = lin(layer(x, f"reduction_layers.{i}"), f"reduction_layers.{i}.reduction")
    x = x.reshape(x.shape[0], -1)
    if cfg.ve_adaptor:
        n = cfg.ve_adaptor_grid

        def aln(z, name):
            return F.layer_norm(z, sd[f"{P}adaptor.{name}.weight"].shape, sd[f"{P}adaptor.{name}.weight"],
                                sd[f"{P}adaptor.{name}.bias"])

        def conv(z, name):
            return F.conv2d(z, sd[f"{P}adaptor.{name}.weight"], sd[f"{P}adaptor.{name}.bias"], padding=1)

        x = torch.relu(aln(lin(x, "adaptor.fc1"), "ln_fc1"))
        x = torch.relu(aln(lin(x, "adaptor.fc2"), "ln_fc2")).view(-1, 1, n, n)
        x = torch.relu(aln(conv(x, "conv1"), "ln_conv1"))
        x = torch.relu(aln(conv(x, "conv2"), "ln_conv2"))
        out = conv(x, "conv3").reshape(x.shape[0], -1)
    else:
        out = lin(x, "linear")
    return out.chunk(2, dim=-1)


# ------------------------------------------------------------------------------------------------------------------


def _inputs(cfg, B=3):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, *cfg.latent_shape, generator=g)
    t = torch.tensor([0.0, 0.37, 1.0][:B])
    y = torch.tensor([0, 1, 1][:B])
    emb = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    mask = torch.ones(B, cfg.text_len, dtype=torch.long)
    mask[0, 2:] = 0
    mask[1, 5:] = 0
    return x, t, y, emb, mask


def _check_against_reference(model, sd, cfg):
    model.eval()
    x, t, y, emb, mask = _inputs(cfg)
    torch.testing.assert_close(model.velocity(x, t, y), reference_dit(sd, cfg, x, t, y), **TOL)
    mu, logvar = model.text_ve(emb, mask.bool())
    ref_mu, ref_logvar = reference_ve(sd, cfg, emb, mask)
    torch.testing.assert_close(mu, ref_mu, **TOL)
    torch.testing.assert_close(logvar, ref_logvar, **TOL)
    assert model.logit_scale.item() == pytest.approx(2.5)


@pytest.mark.parametrize("cfg", [TINY, T5_LIKE], ids=["clip-like", "t5-like-compressor-adaptor"])
def test_converted_model_matches_the_official_forward(cfg):
    sd = official_state_dict(cfg)
    conv = convert_official_state_dict(sd, cfg)
    model = CrossFlow(cfg)
    own = set(model.state_dict())
    assert set(conv) == {k for k in own if not k.startswith("image_encoder.")}
    missing, unexpected = model.load_state_dict(conv, strict=False)
    assert unexpected == [] and all(k.startswith("image_encoder.") for k in missing)
    _check_against_reference(model, sd, cfg)


def test_pth_round_trip_through_load_official_checkpoint(tmp_path):
    sd = official_state_dict(TINY, seed=3)
    path = tmp_path / "t2i_tiny_dit.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)  # as saved from a DDP-wrapped model
    _check_against_reference(load_official_checkpoint(path, TINY), sd, TINY)
    # a training run's `<step>.ckpt` directory: nnet_ema.pth is preferred over nnet.pth
    run = tmp_path / "1000.ckpt"
    run.mkdir()
    torch.save(sd, run / "nnet_ema.pth")
    torch.save(official_state_dict(TINY, seed=4), run / "nnet.pth")
    _check_against_reference(load_official_checkpoint(run, TINY), sd, TINY)


def test_bad_official_state_dicts_raise_listing_keys():
    sd = official_state_dict(TINY)
    bad = dict(sd)
    del bad["blocks.1.mlp.fc2.bias"]
    bad["blocks.1.mlp.fc3.weight"] = torch.zeros(1)
    bad["x_embedder.proj.bias"] = torch.zeros(5)
    with pytest.raises(ValueError) as e:
        convert_official_state_dict(bad, TINY)
    msg = str(e.value)
    assert "1 of " in msg and "expected keys missing, e.g. ['blocks.1.mlp.fc2.bias']" in msg
    assert "1 unexpected keys, e.g. ['blocks.1.mlp.fc3.weight']" in msg
    assert "x_embedder.proj.bias: got (5,), expected (64,)" in msg
    assert "it looks like a DiT" in msg
    with pytest.raises(ValueError, match="expected keys missing.*blocks.2"):
        convert_official_state_dict(sd, TINY.replace(depth=3))
    with pytest.raises(ValueError, match="pos_embed .* differs"):
        convert_official_state_dict({**sd, "pos_embed": sd["pos_embed"].flip(1)}, TINY)


def test_foreign_state_dict_is_refused_in_a_few_lines():
    # A diffusers-UNet-like state dict of ~2,000 tensors: the message says how many keys mismatch, shows a few, and
    # what the checkpoint is instead (on main it listed every key: tens of thousands of characters).
    sd = {f"down_blocks.{i}.resnets.{j}.conv{c}.{w}": torch.zeros(1)
          for i in range(20) for j in range(25) for c in (1, 2) for w in ("weight", "bias")}
    sd.update({f"mid_block.attentions.0.proj_{n}.weight": torch.zeros(1) for n in ("in", "out")})
    with pytest.raises(ValueError) as e:
        convert_official_state_dict(sd, TINY)
    msg = str(e.value)
    n_expected = len(official_flow_shapes(TINY)) + len(official_ve_shapes(TINY))
    assert len(msg) < 1200, msg
    assert f"{n_expected} of {n_expected} expected keys missing" in msg and f"{len(sd)} unexpected keys" in msg
    assert "down_blocks.* (2000)" in msg and "mid_block.* (2)" in msg and "a diffusers UNet" in msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_official_checkpoint_converts(dtype):
    # The stored pos_embed is the fp32 table rounded to the checkpoint's dtype: up to half an ulp off (4.9e-4 in
    # fp16 near 1). It must still pass the table check, and a wrong table must still fail it.
    sd = {k: v.to(dtype) for k, v in official_state_dict(TINY).items()}
    conv = convert_official_state_dict(sd, TINY)
    assert conv["flow.x_embedder.proj.weight"].dtype == dtype
    assert torch.equal(conv["flow.x_embedder.proj.weight"], sd["x_embedder.proj.weight"])
    with pytest.raises(ValueError, match="pos_embed .* differs"):
        convert_official_state_dict({**sd, "pos_embed": sd["pos_embed"].flip(1)}, TINY)


class _NotATensor:
    pass


def test_pickles_with_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "payload": _NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_official_checkpoint(path, TINY)
    torch.save({"step": 3}, path)
    with pytest.raises(ValueError, match="expected a state dict of tensors"):
        load_official_checkpoint(path, TINY)
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "missing.pth", TINY)


def test_cli_convert_writes_a_loadable_checkpoint(tmp_path, capsys):
    from crossflow import cli
    from crossflow.models.model import CrossFlow

    sd = official_state_dict(TINY, seed=5)
    torch.save(sd, tmp_path / "official.pth")
    cli.main(["convert", str(tmp_path / "official.pth"), "--preset", "tiny", "-o", str(tmp_path / "ours")])
    _check_against_reference(CrossFlow.from_pretrained(tmp_path / "ours"), sd, TINY)
    for argv, match in (
        (["convert", str(tmp_path / "official.pth"), "--preset", "nope", "-o", str(tmp_path / "x")],
         "unknown preset|choose one of"),
        (["convert", str(tmp_path / "missing.pth"), "--preset", "tiny", "-o", str(tmp_path / "x")], "no such file"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("crossflow: error: ") and err.count("\n") == 1
        assert re.search(match, err), err


def test_cli_convert_detects_the_preset_and_refuses_a_mismatch(tmp_path, capsys):
    """Without --preset the layout is detected (every name and shape matches `tiny`) and the official sampler is
    recorded; a DiMR --preset for a DiT file is refused in one line naming what the file holds."""
    from crossflow import cli
    from crossflow.models.model import CrossFlow
    from crossflow.checkpoint import read_sampling, sampler_settings

    sd = official_state_dict(TINY, seed=6)
    torch.save(sd, tmp_path / "official.pth")
    cli.main(["convert", str(tmp_path / "official.pth"), "-o", str(tmp_path / "ours")])
    assert "(tiny, from" in capsys.readouterr().out
    _check_against_reference(CrossFlow.from_pretrained(tmp_path / "ours"), sd, TINY)
    assert sampler_settings(read_sampling(tmp_path / "ours")) == {"steps": 50, "guidance_scale": 7.0,
                                                                  "official_grid": True}
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", str(tmp_path / "official.pth"), "--preset", "dimr-tiny", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("crossflow: error: ") and err.count("\n") == 1 and len(err) < 700
    assert "the 'tiny' layout: a DiT flow network" in err and "preset 'dimr-tiny' is a DiMR" in err, err
    assert "use --preset tiny" in err and not (tmp_path / "x").exists()


def _flip_a_tensor_byte(path):
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 64)
    data = bytearray(path.read_bytes())
    local_extra = int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + len(info.filename.encode()) + local_extra  # after the local header
    data[start + 17] ^= 0x10
    path.write_bytes(bytes(data))


def test_cli_convert_refuses_a_pth_whose_crc_fails(tmp_path, cli_fails):
    path = tmp_path / "official.pth"
    torch.save(official_state_dict(TINY, seed=5), path)
    _flip_a_tensor_byte(path)
    torch.load(path, weights_only=True)  # torch's own reader does not notice (main converted it, exit 0)
    err = cli_fails(["convert", str(path), "-o", str(tmp_path / "ours")], 1)
    assert "damaged PyTorch checkpoint (Bad CRC-32 for file" in err and not (tmp_path / "ours").exists()


def test_cli_convert_says_what_a_file_is_instead(tmp_path, cli_fails):
    from PIL import Image

    from crossflow.models.model import CrossFlow

    Image.new("L", (4, 4)).save(tmp_path / "digit.png")
    (tmp_path / "empty.pth").write_bytes(b"")
    CrossFlow(TINY).save_pretrained(tmp_path / "ours")
    for src, match in ((tmp_path / "digit.png", "is not a PyTorch checkpoint: it is a PNG image"),  # main: weights_only
                       (tmp_path / "empty.pth", "is empty (0 bytes)"),
                       (tmp_path / "ours", "is already a CrossFlow checkpoint (ours"),
                       (tmp_path / "ours" / "model.safetensors", "is already a CrossFlow checkpoint file")):
        err = cli_fails(["convert", str(src), "-o", str(tmp_path / "out")], 1)
        assert match in err and "weights_only=False" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, match", [
    ("rename", ["tensor blocks.0.attn.qkv.weight (192, 64) is missing",
                "tensor blocks.0.attn.qkv.weightx (192, 64) is not in its layout"]),
    ("shape", ["tensor x_embedder.proj.bias has shape (5,), expected (64,)"]),
    ("extra", ["tensor blocks.0.extra (3,) is not in its layout"]),
])
@pytest.mark.parametrize("preset", [[], ["--preset", "tiny"]], ids=["detected", "given"])
def test_cli_convert_names_the_tensor_a_near_miss_differs_in(tmp_path, cli_fails, damage, match, preset):
    sd = official_state_dict(TINY, seed=5)
    if damage == "rename":
        sd["blocks.0.attn.qkv.weightx"] = sd.pop("blocks.0.attn.qkv.weight")
    elif damage == "shape":
        sd["x_embedder.proj.bias"] = torch.zeros(5)
    else:
        sd["blocks.0.extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "official.pth")
    err = cli_fails(["convert", str(tmp_path / "official.pth"), *preset, "-o", str(tmp_path / "ours")], 1)
    assert "the layout of preset 'tiny' except for" in err and all(m in err for m in match), err  # main: "not a
    # checkpoint of any preset"


def test_cli_convert_output_must_be_a_directory(tmp_path, cli_fails):
    torch.save(official_state_dict(TINY, seed=5), tmp_path / "official.pth")
    (tmp_path / "file").write_text("x")
    argv = ["convert", str(tmp_path / "official.pth"), "-o", str(tmp_path / "file")]
    assert "must be a directory" in cli_fails(argv, 2)
