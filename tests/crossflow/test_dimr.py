"""DiMR flow network (`crossflow.models.dimr`) and its converter (`crossflow.convert.dimr`) against an independent oracle.

The oracle below (`OMRModel`) restates the official `libs/model/dimr_t2i.py` MRModel flow path and the
`libs/model/sigmoid/module.py` norms from their math, with the OFFICIAL module tree and parameter names (Sequential
indices included) and the official config vocabulary (`stage_configs` fields), so that (1) the numbers are checked
against the official computation, including its per-forward `seed_time` (with the all-equal-log-SNR shortcut), its
separate w0/w1 Linears, its two indicator scalars and its channel-last PixelShuffle, and (2) our converter is exercised
on official key names. No network, no official code import: runs in CI on CPU.

Reference parameter counts (flow network only, VE and SigLIP tower excluded): 950.8 M at 256 px and 985.4 M at 512 px,
from the project's reference notes, reference/crossflow.md §1.5/§7 (kept beside the repository, not in it: an analytic
count of the official code, agreeing with the paper's "0.95B"); the oracle built from the official config literals below
must also give exactly our count.
"""

from __future__ import annotations

import math
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import crossflow_kernels
from crossflow.convert.dimr import (
    convert_dimr_flow_state_dict,
    detect_official_architecture,
    load_dimr_flow,
    official_dimr_shapes,
)
from crossflow.models.dimr import DIMR_CONFIGS, DiMRConfig, DiMRFlow, DiMRStage, multiscale_flow_loss, multiscale_targets
from crossflow.sampling import EulerSampler
from crossflow_kernels.testing import assert_close_to_ref

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


def randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Make every time-dependent path and the indicator matter (at init p0 == p1 and the blend is a no-op)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("nodecay_"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif leaf in ("param0", "param1"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif leaf.startswith("tensor_") or (name.endswith("norm.linear.weight")) or leaf == "scale":
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def paired(layout: str, norm_type: str = "TDRMSN"):
    oc = tiny_official(layout, norm_type)
    cfg = ours_from_official(oc)
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(1)
    oracle = OMRModel(oc)
    randomize(oracle, gen)
    ours = load_dimr_flow(oracle.state_dict(), cfg)
    return oracle, ours, cfg


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [(x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True)]


# ---------------------------------------------------------------------------------------------------------------------
# (a) parameter counts of the released presets
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,millions", [("dimr-256-clip", 950.8), ("dimr-256-t5", 950.8),
                                           ("dimr-512-clip", 985.4), ("dimr-512-t5", 985.4)])
def test_preset_parameter_counts(name, millions):
    with torch.device("meta"):
        ours = DiMRFlow(DiMRConfig.from_name(name))
        oracle = OMRModel(OFFICIAL[name]())
    n = sum(p.numel() for p in ours.parameters())
    assert round(n / 1e6, 1) == millions
    assert n == sum(p.numel() for p in oracle.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# (b) forward (every level) matches the official math, through the converter
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,norm_type", [  # the quick loop keeps one layout per norm type (-m "not slow")
    ("256", "TDRMSN"), pytest.param("512", "TDRMSN", marks=pytest.mark.slow), ("512", "LN"), ("256", "RMSN"),
    ("256", "ADARMSN"), pytest.param("512", "ADARMSN", marks=pytest.mark.slow)])
def test_forward_matches_official(layout, norm_type):
    """Ours (fp32) vs the oracle in fp64 must be within 2x the oracle's own fp32 error vs fp64 (plus 2 fp32 ulps of
    the output scale, so that a level where PyTorch happens to be exact does not demand bit equality)."""
    oracle, ours, cfg = paired(layout, norm_type)
    oracle64 = OMRModel(tiny_official(layout, norm_type)).double()
    oracle64.load_state_dict(oracle.state_dict())
    B = 4
    x = torch.randn(B, *cfg.latent_shape)
    mixed = torch.tensor([True, False, False, True])
    cases = [  # equal t across the batch takes the official seed_time shortcut (one row of TD parameters)
        (torch.tensor([0.0, 0.3, 0.71, 1.0]), mixed), (torch.full((B,), 0.45), torch.zeros(B, dtype=torch.bool)),
        (torch.full((B,), 0.45), torch.ones(B, dtype=torch.bool)), (torch.rand(B), ~mixed),
    ]
    with crossflow_kernels.use_backend("torch"), torch.no_grad():
        for t, ind in cases:
            log_snr = 4 - t * 8
            ref64 = oracle64(x.double(), log_snr, ind)
            ref32 = oracle(x, log_snr, ind)
            got = ours(x, t, ind.long(), return_all=True)
            assert len(got) == len(ref64) == len(cfg.stages)
            for lvl, (g, r64, r32) in enumerate(zip(got, ref64, ref32)):
                assert g.shape == r64.shape
                own = (r32.double() - r64).abs().max().item()
                err = (g.double() - r64).abs().max().item()
                floor = 2 * torch.finfo(torch.float32).eps * r64.abs().max().item()
                assert err <= 2 * own + floor, (f"level {lvl}, t={t.tolist()}, indicator={ind.tolist()}: "
                                                f"error {err:.3e} vs PyTorch fp32 {own:.3e}")
            torch.testing.assert_close(ours(x, t, ind), got[-1], rtol=0, atol=0)


def test_time_and_indicator_matter():
    """Guard for the test above: with the randomised parameters, t and the indicator change every level."""
    _, ours, cfg = paired("512")
    x = torch.randn(2, *cfg.latent_shape)
    with crossflow_kernels.use_backend("torch"), torch.no_grad():
        a = ours(x, torch.tensor([0.2, 0.2]), torch.tensor([0, 0]), return_all=True)
        b = ours(x, torch.tensor([0.7, 0.7]), torch.tensor([0, 0]), return_all=True)
        c = ours(x, torch.tensor([0.2, 0.2]), torch.tensor([1, 1]), return_all=True)
    for u, v, w in zip(a, b, c):
        assert (u - v).abs().max() > 1e-3 and (u - w).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# (c) converter: every key of the four real configs, and architecture detection
# ---------------------------------------------------------------------------------------------------------------------


def _official_meta_state(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        sd = dict(OMRModel(OFFICIAL[name]()).state_dict())
        # The text side the detector reads (T5: the 4096 -> 1024 Compressor) and keys convert.py handles.
        sd["context_encoder.layers.0.attn.W_Q.weight"] = torch.empty(1024 if "t5" in name else 768, 1)
        if "t5" in name:
            sd["context_encoder.compressor.fc1.weight"] = torch.empty(1024, 4096)
        sd["open_clip.logit_scale"] = torch.empty(())
        sd["open_clip_output.fc1.weight"] = torch.empty(4096, 1024)
    return sd


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_converter_maps_every_key_of_released_configs(name):
    sd = _official_meta_state(name)
    cfg = DiMRConfig.from_name(name)
    flow_keys = {k for k in sd if k.startswith("stages.")}
    assert set(official_dimr_shapes(cfg)) == flow_keys  # no missing, no unexpected
    assert all(tuple(sd[k].shape) == s for k, s in official_dimr_shapes(cfg).items())
    out = convert_dimr_flow_state_dict({f"module.{k}": v for k, v in sd.items()}, cfg, prefix="flow.")
    with torch.device("meta"):
        ours = DiMRFlow(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in out.items()} == {f"flow.{k}": tuple(v.shape) for k, v in ours.items()}
    assert detect_official_architecture(sd) == name


def test_converter_rejects_mismatch():
    sd = _official_meta_state("dimr-256-clip")
    with pytest.raises(ValueError, match="missing keys"):
        convert_dimr_flow_state_dict(sd, DiMRConfig.from_name("dimr-512-clip"))
    bad = dict(sd)
    bad["stages.1.extra.weight"] = torch.empty(1, device="meta")
    with pytest.raises(ValueError, match=r"1 unexpected keys \['stages.1.extra.weight'\]"):
        convert_dimr_flow_state_dict(bad, DiMRConfig.from_name("dimr-256-clip"))


def test_detector_names_dit_and_refuses_others():
    with torch.device("meta"):
        dit = {"x_embedder.proj.weight": torch.empty(1280, 4, 2, 2), "t_embedder.mlp.0.weight": torch.empty(1280, 256),
               "y_embedder.embedding_table.weight": torch.empty(2, 1280)}
    assert detect_official_architecture(dit) == "dit"
    oracle, _, _ = paired("256")
    with pytest.raises(ValueError, match=r"a DiMR checkpoint \(2 stages: transformer \(width 24, patch 2, 5 blocks\)"):
        detect_official_architecture(oracle.state_dict())
    with pytest.raises(ValueError, match="not a CrossFlow checkpoint"):
        detect_official_architecture({"foo.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------------------
# (d) torch vs Triton backend on dimr-tiny, forward and every gradient
# ---------------------------------------------------------------------------------------------------------------------


def _fwd_bwd(model, backend, x, t, ind):
    model.zero_grad(set_to_none=True)
    with crossflow_kernels.use_backend(backend):
        outs = model(x, t, ind, return_all=True)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum() for o in outs)
        loss.backward()
    return [o.detach() for o in outs], {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm_type, qk_norm", [("tdrms", False), pytest.param("adarms", True, marks=pytest.mark.slow)])
def test_tiny_torch_vs_triton(device, norm_type, qk_norm):
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
# (e) no host sync in the forward
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
# Around the network: loss, sampler, checkpointing, config
# ---------------------------------------------------------------------------------------------------------------------


def test_multiscale_targets_match_official():
    """Official `even_multi_scale_targets(scale_correction=True)`: a grouped box conv of ones / r, stride r."""
    v = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    got = multiscale_targets(v, [2, 4, 8])
    for g, r in zip(got, (4, 2, 1)):
        ref = v if r == 1 else F.conv2d(v, torch.ones(4, 1, r, r, dtype=v.dtype) / r, stride=r, groups=4)
        torch.testing.assert_close(g, ref)
    preds = [torch.zeros(2, 4, s, s, dtype=v.dtype) for s in (2, 4, 8)]
    loss = multiscale_flow_loss(preds, v, (0.25, 0.5, 1.0))
    want = sum(c * t.pow(2).flatten(1).mean(1) for c, t in zip((0.25, 0.5, 1.0), got))
    torch.testing.assert_close(loss, want.float())


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


def test_config_validation_and_round_trip():
    cfg = DiMRConfig.from_name("dimr-512-clip")
    assert DiMRConfig.from_dict(__import__("json").loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="depth must be odd"):
        DiMRConfig.from_name("dimr-tiny", stages=(DiMRStage("transformer", 32, 48, 4, 2, 4, num_heads=2),))
    with pytest.raises(ValueError, match="must equal latent_size"):
        DiMRConfig.from_name("dimr-tiny", latent_size=16)
    with pytest.raises(ValueError, match="norm_type"):
        DiMRConfig.from_name("dimr-tiny", norm_type="group")
    with pytest.raises(ValueError, match="unknown DiMR preset"):
        DiMRConfig.from_name("dimr-1024")
    model = DiMRFlow(DiMRConfig.from_name("dimr-tiny"))
    with pytest.raises(ValueError, match="expected latent"):
        model(torch.randn(1, 4, 9, 9), torch.rand(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="indicator"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.zeros(1))
    assert all(".nodecay_" in n for n in model.no_weight_decay_names()) and model.no_weight_decay_names()
    assert math.isclose(sum(DIMR_CONFIGS["dimr-512-t5"].loss_coeffs), 1.75)


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
def test_fast_sampler_captures_dimr():
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


@pytest.mark.parametrize("name,millions", [("dimr-256-clip", 110.2), ("dimr-256-t5", 165.2),
                                           ("dimr-512-clip", 97.5), ("dimr-512-t5", 142.4)])
def test_official_text_side_fields_build_the_official_ve(name, millions):
    """`OFFICIAL_CHECKPOINTS[...]["crossflow_fields"]` give a CrossFlowConfig whose Text VE has the official
    `context_encoder` size (97.5-165.2 M across the four files: issue 13; 110 / 98 / 142 M in crossflow.md §1.2)."""
    from crossflow.config import CrossFlowConfig
    from crossflow.models.dimr import OFFICIAL_CHECKPOINTS
    from crossflow.models.text_ve import TextVE

    fields = OFFICIAL_CHECKPOINTS[name]["crossflow_fields"]
    cfg = CrossFlowConfig(**fields, patch_size=2)
    assert cfg.latent_size == DiMRConfig.from_name(name).latent_size
    with torch.device("meta"):
        ve = TextVE(cfg)
    assert round(sum(p.numel() for p in ve.parameters()) / 1e6, 1) == millions


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_whole_official_dimr_checkpoint_converts(name):
    """Flow + Text VE + logit scale of a released layout (meta tensors), SigLIP tower keys dropped; a VE of the wrong
    text encoder is refused."""
    from crossflow.config import CrossFlowConfig
    from crossflow.convert.dimr import convert_official_dimr_state_dict
    from crossflow.models.dimr import OFFICIAL_CHECKPOINTS
    from crossflow.models.text_ve import TextVE

    text_cfg = CrossFlowConfig(**OFFICIAL_CHECKPOINTS[name]["crossflow_fields"], patch_size=2)
    with torch.device("meta"):
        sd = {k: v for k, v in OMRModel(OFFICIAL[name]()).state_dict().items()}
        ve = TextVE(text_cfg).state_dict()
        sd.update({f"context_encoder.{k}": v for k, v in ve.items()})
        sd.update({"open_clip.logit_scale": torch.empty(()), "open_clip_output.fc1.weight": torch.empty(4096, 1024),
                   "open_clip.visual.trunk.pos_embed": torch.empty(1, 256, 1024)})
        flow = DiMRFlow(DiMRConfig.from_name(name)).state_dict()
    assert detect_official_architecture(sd) == name
    out = convert_official_dimr_state_dict(sd, DiMRConfig.from_name(name), text_cfg)
    want = {f"flow.{k}" for k in flow} | {f"text_ve.{k}" for k in ve} | {"logit_scale"}
    assert set(out) == want
    other = "dimr-256-t5" if name == "dimr-256-clip" else "dimr-256-clip"
    wrong = CrossFlowConfig(**{**OFFICIAL_CHECKPOINTS[other]["crossflow_fields"],
                               "latent_size": text_cfg.latent_size}, patch_size=2)
    with pytest.raises(ValueError, match="Text VE"):
        convert_official_dimr_state_dict(sd, DiMRConfig.from_name(name), wrong)


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
# (f) DiMR inside CrossFlow: config, training, save/load, samplers, the convert verb end to end
# ---------------------------------------------------------------------------------------------------------------------


def official_from_ours(cfg: DiMRConfig, norm_type: str = "TDRMSN"):
    """The official `stage_configs` vocabulary for one of our DiMRConfigs (the inverse of `ours_from_official`)."""
    stages = []
    for s in cfg.stages:
        kw = dict(dim=s.dim, hidden_dim=s.hidden, num_blocks=s.depth, max_height=s.grid, max_width=s.grid,
                  image_input_ratio=s.input_ratio, input_feature_ratio=s.patch, final_kernel_size=s.final_kernel)
        stages.append(t_stage(num_attention_heads=s.num_heads, **kw) if s.block == "transformer"
                      else c_stage(kernel_size=s.kernel_size, **kw))
    return NS(channels=cfg.latent_channels, norm_type=norm_type, stage_configs=stages)


def fake_official_checkpoint(preset: str, seed: int = 0):
    """A whole official-layout DiMR CrossFlow state dict for `preset`: the oracle's flow network (`stages.*`), a Text
    VE (`context_encoder.*`), the SigLIP logit scale and a projection weight (dropped by the converter)."""
    from crossflow.config import CrossFlowConfig
    from crossflow.models.text_ve import TextVE

    cfg = CrossFlowConfig.from_name(preset)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    oracle = OMRModel(official_from_ours(cfg.dimr))
    randomize(oracle, gen)
    ve = TextVE(cfg)
    sd = dict(oracle.state_dict())
    sd.update({f"context_encoder.{k}": v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
               for k, v in ve.state_dict().items()})
    sd["open_clip.logit_scale"] = torch.tensor(2.5)
    sd["open_clip_output.fc1.weight"] = torch.randn(8, 4, generator=gen)
    return cfg, oracle, sd


def test_crossflow_presets_and_config_round_trip():
    from crossflow.config import CrossFlowConfig
    from crossflow.models.dimr import OFFICIAL_CHECKPOINTS
    from crossflow.models.model import CrossFlow

    for name, info in OFFICIAL_CHECKPOINTS.items():
        cfg = CrossFlowConfig.from_name(name)
        assert cfg.backbone == "dimr" and cfg.dimr == DIMR_CONFIGS[name]
        assert all(getattr(cfg, k) == v for k, v in info["crossflow_fields"].items())
        assert CrossFlowConfig.from_json(cfg.to_json()) == cfg
    tiny = CrossFlowConfig.from_name("dimr-tiny")
    assert CrossFlowConfig.from_json(tiny.to_json()) == tiny and isinstance(CrossFlowConfig.from_json(
        tiny.to_json()).dimr, DiMRConfig)
    assert isinstance(CrossFlow(tiny).flow, DiMRFlow)
    with pytest.raises(ValueError, match="latent shape"):
        tiny.replace(latent_size=16)
    with pytest.raises(ValueError, match="needs dimr="):
        tiny.replace(dimr=None)
    with pytest.raises(ValueError, match="backbone must be one of"):
        tiny.replace(backbone="unet")


def test_crossflow_dimr_save_load_round_trip_and_weight_decay_groups(tmp_path):
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


def test_fast_sampler_on_cpu_equals_euler_on_a_dimr_crossflow():
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


@pytest.fixture
def one_thread():
    """Small CPU models on a busy machine: one intra-op thread (two threads on two loaded cores cost ~15x, see
    `crossflow.cli.SMALL_FLOW_WORK`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_cfg(out, **kw):
    from crossflow.training.train import TrainConfig

    base = dict(out=str(out), preset="dimr-tiny", batch_size=8, lr=3e-3, warmup_steps=3, ema_decay=0.9, log_every=1,
                backend="torch", quiet=True, seed=11)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_dimr_digits_training_lowers_the_loss(tmp_path, one_thread):
    """The digits data with the DiMR flow (`dimr-digits`): 30 AdamW steps lower the multi-scale flow-matching term."""
    from crossflow.training.train import train

    hist = train(_train_cfg(tmp_path, preset="dimr-digits", data="digits", data_size=256, steps=30, batch_size=8,
                            lr=1e-3, warmup_steps=5, ckpt_every=1000))
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean("fm", hist[-8:]) < 0.7 * mean("fm", hist[:8]), [round(r["fm"], 3) for r in hist]
    assert mean("loss", hist[-10:]) < mean("loss", hist[:10])


def test_dimr_resume_replays_the_uninterrupted_run_exactly(tmp_path, one_thread):
    from safetensors.torch import load_file

    from crossflow.checkpoint import list_checkpoints
    from crossflow.training.train import train

    full, split = tmp_path / "full", tmp_path / "split"
    a = train(_train_cfg(full, steps=6, ckpt_every=3))
    train(_train_cfg(split, steps=3, ckpt_every=3))
    b = train(_train_cfg(split, steps=6, ckpt_every=3, resume=True))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(a[3:]) == strip(b)
    ca, cb = load_file(str(list_checkpoints(full)[-1][1])), load_file(str(list_checkpoints(split)[-1][1]))
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)  # model, EMA and AdamW state


def test_convert_verb_detects_converts_and_samples_a_fake_official_dimr_checkpoint(tmp_path, capsys, one_thread):
    """An official-layout DiMR file (DDP prefixes, SigLIP keys) -> `crossflow convert` without --preset (detected) ->
    the converted flow network equals the official math -> `crossflow sample --checkpoint DIR` with no sampler flags
    is the official sampler (50 steps, official grid, guidance 7); a mismatching --preset is refused in one line."""
    import json

    import numpy as np
    from PIL import Image

    from crossflow import cli
    from crossflow.models.dimr import OFFICIAL_SAMPLING
    from crossflow.models.model import CrossFlow
    from crossflow.pipelines.text_to_image import CrossFlowPipeline

    cfg, oracle, sd = fake_official_checkpoint("dimr-digits")
    pth, out = tmp_path / "t2i_digits_dimr.pth", tmp_path / "ours"
    torch.save({f"module.{k}": v for k, v in sd.items()}, pth)
    cli.main(["convert", str(pth), "-o", str(out)])
    assert "dimr-digits" in capsys.readouterr().out
    model = CrossFlow.from_pretrained(out)
    assert model.config == cfg and model.logit_scale.item() == 2.5
    for k, v in model.text_ve.state_dict().items():
        assert torch.equal(v, sd[f"context_encoder.{k}"]), k
    x, t, ind = torch.randn(3, *cfg.latent_shape), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([False, True, False])
    with crossflow_kernels.use_backend("torch"), torch.no_grad():
        for o, r in zip(model.flow(x, t, ind.long(), return_all=True), oracle(x, 4 - 8 * t, ind), strict=True):
            torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "sampling.json").read_text()) == OFFICIAL_SAMPLING

    png = tmp_path / "three.png"
    cli.main(["sample", "a handwritten three", "--checkpoint", str(out), "-o", str(png), "--backend", "torch",
              "--device", "cpu", "--upscale", "1", "-q"])
    pipe = CrossFlowPipeline.from_pretrained(out, sampler=EulerSampler(**OFFICIAL_SAMPLING))
    with crossflow_kernels.use_backend("torch"):
        want = np.asarray(pipe("a handwritten three", seed=0)[0])
    assert np.array_equal(np.asarray(Image.open(png)), want)

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", str(pth), "--preset", "digits", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("crossflow: error: ") and err.count("\n") == 1 and len(err) < 700
    assert "DiMR" in err and "'dimr-digits'" in err and "--preset dimr-digits" in err and "'digits'" in err, err
    assert not (tmp_path / "x").exists()


def test_load_official_checkpoint_refuses_a_dimr_layout_no_preset_has(tmp_path):
    from crossflow.convert.dit import load_official_checkpoint

    _, _, sd = fake_official_checkpoint("dimr-tiny")
    sd = {k: v for k, v in sd.items() if not k.startswith("stages.2.")}  # a two-stage network
    torch.save(sd, tmp_path / "odd.pth")
    for cfg in (None, "dimr-tiny", "dit-h-2-512"):
        with pytest.raises(ValueError) as e:
            load_official_checkpoint(tmp_path / "odd.pth", cfg)
        msg = str(e.value)
        assert "a DiMR checkpoint (2 stages: transformer (width 32, patch 4, 3 blocks)" in msg and len(msg) < 700, msg
