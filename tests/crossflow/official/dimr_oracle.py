"""The official DiMR flow network restated, for the oracle tests beside this file (`test_dimr_official.py`).

`OMRModel` restates the official `libs/model/dimr_t2i.py` MRModel flow path and the `libs/model/sigmoid/module.py`
norms from their math, with the OFFICIAL module tree and parameter names (Sequential indices included) and the official
config vocabulary (`stage_configs` fields), so that (1) the numbers are checked against the official computation,
including its per-forward `seed_time` (with the all-equal-log-SNR shortcut), its separate w0/w1 Linears, its two
indicator scalars and its channel-last PixelShuffle, and (2) our converter is exercised on official key names. No
network, no official code import: runs in CI on CPU. Imported by name (`from dimr_oracle import ...`): pytest's default
`prepend` import mode puts this folder on `sys.path` for the tests in it.
"""

from __future__ import annotations

from types import SimpleNamespace as NS

import torch
import torch.nn as nn
import torch.nn.functional as F

from crossflow.models.dimr import DiMRConfig, DiMRStage


# ---------------------------------------------------------------------------------------------------------------------
# The oracle: official names, official math
# ---------------------------------------------------------------------------------------------------------------------


class OTDP(nn.Module):
    def __init__(self, shape, value):
        super().__init__()
        self.param0 = nn.Parameter(torch.full(shape, float(value)))
        self.param1 = nn.Parameter(torch.full(shape, float(value)))
        self.nodecay_weight = nn.Parameter(torch.zeros(shape))
        self.nodecay_bias = nn.Parameter(torch.zeros(shape))
        self.curr = None

    def forward(self):
        return self.curr


def o_seed_time(model, log_snr):
    """Official `TimeDependentParameter.seed_time`: one row when every sample has the same log-SNR."""
    if torch.all(log_snr == log_snr[0]):
        log_snr = log_snr[0][None]
    times = log_snr / 4.0
    for m in model.modules():
        if isinstance(m, OTDP):
            a = torch.addcmul(m.nodecay_bias[None], times[:, None], (m.nodecay_weight + 1)[None])
            m.curr = torch.addcmul(m.param1[None], torch.sigmoid(a), (m.param0 - m.param1)[None])


class OLayerNorm(nn.Module):  # sigmoid.module.LayerNorm
    def __init__(self, dim):
        super().__init__()
        self.dim, self.weight, self.bias = dim, OTDP((dim,), 1.0), OTDP((dim,), 0.0)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(shape[0], -1, self.dim)
        w, b = self.weight(), self.bias()
        if w.shape[0] == 1:
            x = F.layer_norm(x, (self.dim,), weight=w[0], bias=b[0], eps=1e-5)
        else:
            x = torch.addcmul(b[:, None, :], w[:, None, :], F.layer_norm(x, (self.dim,), eps=1e-5))
        return x.reshape(shape)


class ORMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.d, self.scale = d, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.scale * (x / (x.norm(2, dim=-1, keepdim=True) * self.d ** -0.5 + 1e-8))


class OTDRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.d, self.scale = d, OTDP((d,), 1.0)

    def forward(self, x):
        xn = x / (x.norm(2, dim=-1, keepdim=True) * self.d ** -0.5 + 1e-8)
        s = self.scale()
        if s.shape[0] == 1:
            return s[0] * xn
        return (s[:, None, :] if xn.dim() == 3 else s[:, None, None, :]) * xn


def o_rms_norm(x, scale, eps):
    dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)
    ms = torch.mean(x.to(dtype) ** 2, dim=-1, keepdim=True)
    return x * (scale.to(dtype) * torch.rsqrt(ms + eps)).to(x.dtype)


class OAdaRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.linear = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x, cond):
        return o_rms_norm(x, self.linear(cond)[:, None, :] + 1, 1e-6)


def o_norm(c):
    return {"LN": OLayerNorm, "RMSN": ORMSNorm, "TDRMSN": OTDRMSNorm, "ADARMSN": OAdaRMSNorm}[c.norm_type](c.dim)


def o_apply_norm(c, norm, x):
    return norm(x, x[:, 0]) if c.norm_type == "ADARMSN" else norm(x)


def o_linear(i, o, bias=True):
    lin = nn.Linear(i, o, bias=bias)
    nn.init.trunc_normal_(lin.weight, std=0.02)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


class OMLPBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c, self.norm = c, o_norm(c)
        self.w0, self.w1, self.w2 = o_linear(c.dim, c.hidden_dim), o_linear(c.dim, c.hidden_dim), o_linear(
            c.hidden_dim, c.dim)

    def forward(self, x):
        x = o_apply_norm(self.c, self.norm, x)
        return self.w2(F.gelu(self.w0(x)) * self.w1(x))


class OSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c, self.heads, self.hd = c, c.num_attention_heads, c.dim // c.num_attention_heads
        self.norm = o_norm(c)
        self.query_key_value = o_linear(c.dim, 3 * c.dim, bias=False)
        self.dense = o_linear(c.dim, c.dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.query_key_value(o_apply_norm(self.c, self.norm, x))
        q, k, v = qkv.reshape(B, N, 3 * self.heads, self.hd).permute(0, 2, 1, 3).float().chunk(3, dim=1)
        if x.dtype == torch.float64:
            q, k, v = q.double(), k.double(), v.double()  # the fp64 oracle stays fp64
        o = F.scaled_dot_product_attention(q, k, v)
        return self.dense(o.permute(0, 2, 1, 3).reshape(B, N, C).to(x.dtype))


class OTransformerBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block1, self.block2 = OSelfAttention(c), OMLPBlock(c)

    def forward(self, x):
        x = x + self.block1(x)
        return x + self.block2(x)


class Perm(nn.Module):
    def __init__(self, *p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x.permute(*self.p)


class OConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block1 = nn.Sequential(Perm(0, 3, 1, 2), nn.Conv2d(c.dim, c.dim, c.kernel_size, padding=c.kernel_size // 2,
                                                                 groups=c.dim), Perm(0, 2, 3, 1))
        self.block2 = OMLPBlock(c)

    def forward(self, x):
        x = x + self.block1(x)
        return x + self.block2(x)


class ODown(nn.Module):
    def __init__(self, r):
        super().__init__()
        self.r = r

    def forward(self, x):
        return x if self.r == 1 else F.interpolate(x, size=(x.shape[2] // self.r, x.shape[3] // self.r), mode="area")


class OPos(nn.Module):
    def __init__(self, h, w, dim):
        super().__init__()
        self.w = w
        self.position_embeddings = nn.Embedding(h * w, dim)
        nn.init.trunc_normal_(self.position_embeddings.weight, std=0.02)

    def forward(self, x):
        B, H, W, C = x.shape
        idx = torch.arange(H, device=x.device)[:, None] * self.w + torch.arange(W, device=x.device)[None, :]
        return x + self.position_embeddings(idx[None])


class OPixelShuffle(nn.Module):
    def __init__(self, din, dout, r):
        super().__init__()
        self.r, self.kernel = r, o_linear(din, dout * r * r)

    def forward(self, x):
        x = self.kernel(x)
        B, H, W, C = x.shape
        x = x.reshape(B, H, W, self.r, self.r, C // self.r ** 2).transpose(2, 3)
        return x.reshape(B, H * self.r, W * self.r, C // self.r ** 2)


class OStage(nn.Module):
    def __init__(self, channels, c, lowres_dim=None, lowres_height=None):
        super().__init__()
        self.transformer = c.block_type == "TransformerBlock"
        cls = OTransformerBlock if self.transformer else OConvNeXtBlock
        self.input_layer = nn.Sequential(ODown(c.image_input_ratio), nn.Conv2d(
            channels, c.dim, c.input_feature_ratio, stride=c.input_feature_ratio), Perm(0, 2, 3, 1),
            OPos(c.max_height, c.max_width, c.dim))
        if lowres_dim is not None:
            self.upsample = nn.Sequential(OLayerNorm(lowres_dim), OPixelShuffle(
                lowres_dim, c.dim, c.max_height // lowres_height), OLayerNorm(c.dim))
        self.blocks = nn.ModuleList([cls(c) for _ in range(c.num_blocks // 2 * 2 + 1)])
        self.skip_denses = nn.ModuleList([o_linear(2 * c.dim, c.dim) for _ in range(c.num_blocks // 2)])
        self.output_layer = nn.Sequential(OLayerNorm(c.dim), Perm(0, 3, 1, 2), nn.Conv2d(
            c.dim, channels, c.final_kernel_size, padding=c.final_kernel_size // 2))
        if self.transformer:
            self.tensor_true = nn.Parameter(torch.tensor([-1.0]))
            self.tensor_false = nn.Parameter(torch.tensor([1.0]))

    def forward(self, images, lowres_skips, null_indicator):
        x = self.input_layer(images)
        if lowres_skips is not None:
            x = x + self.upsample(lowres_skips)
        if self.transformer:
            B, H, W, C = x.shape
            x = x.reshape(B, H * W, C)
            ind = torch.where(null_indicator, self.tensor_true, self.tensor_false).view(B, 1, 1).expand(-1, -1, C)
            x = torch.cat([ind, x], dim=1)
        external, skips = [x], []
        n = len(self.blocks)
        for blk in self.blocks[: n // 2]:
            x = blk(x)
            external.append(x)
            skips.append(x)
        x = self.blocks[n // 2](x)
        external.append(x)
        for dense, blk in zip(self.skip_denses, self.blocks[n // 2 + 1:]):
            x = blk(dense(torch.cat([x, skips.pop()], dim=-1)))
            external.append(x)
        if self.transformer:
            x = x[:, 1:].reshape(B, H, W, C)
            external = [s[:, 1:].reshape(B, H, W, C) for s in external]
        return self.output_layer(x), external


class OMRModel(nn.Module):
    """The official MRModel's flow network (`stages`); forward(x, log_snr, null_indicator) -> list per stage."""

    def __init__(self, config):
        super().__init__()
        for sc in config.stage_configs:
            sc.norm_type = config.norm_type
        cs = config.stage_configs
        lowres_dims = [None] + [s.dim * (s.num_blocks // 2 * 2 + 2) for s in cs[:-1]]
        lowres_heights = [None] + [s.max_height for s in cs[:-1]]
        self.stages = nn.ModuleList([OStage(config.channels, s, d, h) for s, d, h in zip(cs, lowres_dims,
                                                                                         lowres_heights)])

    def forward(self, images, log_snr, null_indicator):
        assert log_snr.dtype == torch.float32
        o_seed_time(self, log_snr)
        outputs, lowres = [], None
        for stage in self.stages:
            out, lowres = stage(images, lowres, null_indicator)
            outputs.append(out)
            lowres = torch.cat(lowres, dim=-1)
        return outputs


# ---------------------------------------------------------------------------------------------------------------------
# Official config literals (`configs/t2i_*_dimr.py`, `model.stage_configs`) and tiny versions of each layout
# ---------------------------------------------------------------------------------------------------------------------


def t_stage(**kw):
    base = dict(block_type="TransformerBlock", dim=1024, hidden_dim=2048, num_attention_heads=16, num_blocks=65,
                max_height=16, max_width=16, image_input_ratio=1, input_feature_ratio=2, final_kernel_size=3)
    return NS(**{**base, **kw})


def c_stage(**kw):
    base = dict(block_type="ConvNeXtBlock", dim=512, hidden_dim=1024, kernel_size=7, num_blocks=33, max_height=32,
                max_width=32, image_input_ratio=1, input_feature_ratio=1, final_kernel_size=3)
    return NS(**{**base, **kw})


def official_256(norm_type="TDRMSN"):
    return NS(channels=4, norm_type=norm_type, stage_configs=[t_stage(), c_stage()])


def official_512(norm_type="TDRMSN"):
    return NS(channels=4, norm_type=norm_type, stage_configs=[
        t_stage(input_feature_ratio=4), c_stage(input_feature_ratio=2),
        c_stage(dim=256, hidden_dim=512, max_height=64, max_width=64)])


OFFICIAL = {"dimr-256-clip": official_256, "dimr-256-t5": official_256, "dimr-512-clip": official_512,
            "dimr-512-t5": official_512}
NORMS = {"TDRMSN": "tdrms", "LN": "layer", "RMSN": "rms", "ADARMSN": "adarms"}


def tiny_official(layout: str, norm_type: str = "TDRMSN"):
    """The released layouts at toy sizes (odd counts; num_blocks even on purpose: 4 -> 5 blocks as the official)."""
    if layout == "256":
        stages = [t_stage(dim=24, hidden_dim=40, num_attention_heads=3, num_blocks=4, max_height=3, max_width=3),
                  c_stage(dim=12, hidden_dim=20, kernel_size=3, num_blocks=2, max_height=6, max_width=6)]
        return NS(channels=3, norm_type=norm_type, stage_configs=stages)
    stages = [t_stage(dim=16, hidden_dim=24, num_attention_heads=2, num_blocks=3, max_height=2, max_width=2,
                      input_feature_ratio=4),
              c_stage(dim=12, hidden_dim=16, kernel_size=3, num_blocks=3, max_height=4, max_width=4,
                      input_feature_ratio=2),
              c_stage(dim=8, hidden_dim=12, kernel_size=5, num_blocks=1, max_height=8, max_width=8)]
    return NS(channels=4, norm_type=norm_type, stage_configs=stages)


def ours_from_official(oc) -> DiMRConfig:
    """Translate the official vocabulary into a DiMRConfig (the test's own mapping, independent of our presets)."""
    stages = []
    for s in oc.stage_configs:
        t = s.block_type == "TransformerBlock"
        stages.append(DiMRStage(
            "transformer" if t else "convnext", s.dim, s.hidden_dim, s.num_blocks // 2 * 2 + 1, s.max_height,
            s.input_feature_ratio, num_heads=s.num_attention_heads if t else 0,
            kernel_size=7 if t else s.kernel_size, input_ratio=s.image_input_ratio, final_kernel=s.final_kernel_size))
    size = oc.stage_configs[-1].max_height * oc.stage_configs[-1].input_feature_ratio
    return DiMRConfig(latent_channels=oc.channels, latent_size=size, stages=tuple(stages),
                      norm_type=NORMS[oc.norm_type])


def official_from_ours(cfg: DiMRConfig, norm_type: str = "TDRMSN"):
    """The official `stage_configs` vocabulary for one of our DiMRConfigs (the inverse of `ours_from_official`)."""
    stages = []
    for s in cfg.stages:
        kw = dict(dim=s.dim, hidden_dim=s.hidden, num_blocks=s.depth, max_height=s.grid, max_width=s.grid,
                  image_input_ratio=s.input_ratio, input_feature_ratio=s.patch, final_kernel_size=s.final_kernel)
        stages.append(t_stage(num_attention_heads=s.num_heads, **kw) if s.block == "transformer"
                      else c_stage(kernel_size=s.kernel_size, **kw))
    return NS(channels=cfg.latent_channels, norm_type=norm_type, stage_configs=stages)
