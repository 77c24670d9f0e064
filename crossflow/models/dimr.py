"""DiMR, the multi-resolution flow network of the released CrossFlow checkpoints (official `libs/model/dimr_t2i.py`,
`MRModel`; time-dependent norms from `libs/model/sigmoid/module.py`).

Call it like our DiT `FlowTransformer`: `flow(x (B, C, H, W), t (B,) in [0, 1], indicator (B,) 0 = cond / 1 = uncond)
-> v (B, C, H, W)`, the finest prediction. `flow(x, t, indicator, return_all=True)` returns one prediction per stage,
coarse to fine, for the multi-scale training loss (`multiscale_targets`, `multiscale_flow_loss`).

Structure (coarse to fine; every stage reads the full latent x):
    stage s: x -> [area-downsample by input_ratio] -> Conv2d(C -> dim, k = s = patch) -> channel-last
             -> + learned absolute positions (grid*grid, dim)
             -> + PixelShuffle-upsampled skips of stage s-1 (TD-LayerNorm -> Linear -> shuffle -> TD-LayerNorm)
             -> [transformer stages: prepend the cfg-indicator token, a learned scalar per branch, broadcast over dim]
             -> U-ViT block stack: depth (odd) blocks, the second half's inputs are Linear(2 dim -> dim)(cat[x, skip])
             -> TD-LayerNorm -> Conv2d(dim -> C, k = final_kernel) = this stage's prediction
    stage s hands stage s+1 the concatenation of its input tokens and every block output ((depth + 1) * dim channels).

Time enters ONLY through time-dependent parameters (no timestep embedding): every TD norm's scale (and TD-LayerNorm's
bias) is p(t) = p1 + sigmoid(tau * (w + 1) + b) * (p0 - p1), tau = log_snr / 4, log_snr = 4 - 8 t in fp32, as the
official solver computes it. The official code "seeds" these once per forward by writing module state
(`TimeDependentParameter.seed_time`, which also branches on `torch.all(log_snr == log_snr[0])`, a host sync); here tau
is passed down the forward and every parameter is evaluated per sample: same values, no host sync, no hidden state, so
`torch.compile(fullgraph=True)` and CUDA-graph capture work.

Norms (`DiMRConfig.norm_type`, the official `norm_type`; the released checkpoints all use "tdrms"):
  * "tdrms"  TDRMSNorm x / (rms(x) + 1e-8) * s(t)          -> `crossflow_kernels.rms_norm(x, s(t) (B, 1, D))` with eps
             1e-16 under the root: 1/sqrt(ms + 1e-16) vs 1/(rms + 1e-8) differ by 1e-8/rms relative, below fp32
             resolution for any activation with rms >~ 0.1 (the tests bound it). Where a residual add precedes it
             (every block's MLP norm) the add is fused in: `crossflow_kernels.gated_residual_adaln(norm="rms")`, gate 1,
             shift 0, scale s(t) - 1 (exact up to the rounding of s - 1; rms_norm has no residual input).
  * "rms"    plain RMSNorm with a learned scale              -> the same kernels, weight (D,).
  * "layer"  TD-LayerNorm F.layer_norm(x, eps 1e-5) * w(t) + b(t) -> `crossflow_kernels.adaln_modulate(norm="layer")`
             (shift b(t), scale w(t) - 1); also the stages' upsample and output norms.
  * "adarms" AdaRMSNorm rms_norm(x, 1 + Linear(x[:, 0]), 1e-6) -> `crossflow_kernels.rms_norm`: conditioned on the first
             token (the indicator token in a transformer stage; weight (B, 1, D)); in a ConvNeXt stage (B, H, W, D) the
             official conditions on the first *row*: weight (B, 1, W, D), broadcast over rows in the kernel.
  * `qk_norm=True` adds QKNorm (per-head learned log-scale clamped at log 100, rms-normalised q and k, `qk_norm_ref`)
    -> one `crossflow_kernels.rms_norm` call on the q/k slice of the fused qkv projection with a (2, H, 1) per-head
    weight (q and k in one launch, no copy). The official
    enables it only together with Axial RoPE (`pe_type='Axial_RoPE'`), which no released config uses and which cannot
    run with the indicator token (its position table has one row fewer than the sequence), so RoPE is not implemented
    and QKNorm is our opt-in, not convertible from any release.

Deviations from the official module, none changing the math in fp32:
  * the GEGLU MLP's two input Linears (w0, w1) are one Linear of twice the width (`fc_in`, rows [w0; w1]): one GEMM;
  * the two indicator scalars are one (2,) parameter `indicator_values` = [cond (tensor_false), uncond (tensor_true)];
  * attention runs in the activations' dtype through `crossflow_kernels.attention` (fp32 softmax statistics); the
    official casts q, k, v to fp32 first, so under bf16 autocast ours rounds q, k, v to bf16;
  * the coarse stages' output heads are skipped unless `return_all=True` (the sampler needs only the finest).
Converting an official state dict: `crossflow.convert.dimr`.

The MLP (transformer and ConvNeXt blocks): fc_in and fc_out stay cuBLAS GEMMs; the GELU(a) * b between them, the
memory-bound step, is `crossflow_kernels.geglu` (one pass instead of eager's two and an intermediate).

Future kernels (torch references here, to move into `crossflow_kernels/` with their Triton twins when a benchmark says
they pay):
  * the time-dependent parameter blend (`time_dependent_ref`, (B, D) work in ~5 tiny launches per TD parameter, ~170
    per forward at 256 px; gone under CUDA-graph capture / torch.compile). Folding it into the norm kernel would
    recompute the sigmoid per row and read 4 parameter vectors per row tile; one launch per parameter is the better
    target. Batching across blocks (one stacked evaluation per stage) would read every block's parameters outside its
    forward, which per-block FSDP sharding and activation checkpointing forbid;
  * QKNorm fused into the attention prologue (today one extra read + write of q and k; opt-in, no release uses it);
  * GEGLU as the epilogue of the fc_in GEMM (a Triton GEMM would have to beat cuBLAS first);
  * the 67584-wide TD-LayerNorm of the skip concat (`layer_norm_td_ref`; too wide for the one-row-per-program adaLN
    kernel), ideally fused with the concat (per-skip statistics, no (B, 256, 67584) copy).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import crossflow_kernels
from crossflow.dimr_config import (  # noqa: F401 (re-exported: the config lives torch-free)
    BLOCK_TYPES,
    DIMR_CONFIGS,
    NORM_TYPES,
    OFFICIAL_CHECKPOINTS,
    OFFICIAL_SAMPLING,
    DiMRConfig,
    DiMRStage,
)
from crossflow.models.layers import check_flow_inputs

RMS_EPS = 1e-16  # the official TDRMSNorm/RMSNorm add 1e-8 to the rms; ours adds its square under the root
LN_EPS = 1e-5  # the official time-dependent LayerNorm
ADARMS_EPS = 1e-6
QK_EPS = 1e-6
QK_MAX_LOG_SCALE = math.log(100.0)
WIDE_ROW = 16384  # rows wider than this (the skip concat, 67584) use torch: the adaLN kernel holds a row per program


#################################################################################
#                  Torch references of the DiMR-specific math                   #
#################################################################################


def time_dependent_ref(
    p0: torch.Tensor, p1: torch.Tensor, w: torch.Tensor, b: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """p1 + sigmoid(tau * (w + 1) + b) * (p0 - p1), per sample: params (*S), tau (B,) -> (B, *S).

    The official `tdp_torch` with weight `nodecay_weight + 1` (`TimeDependentParameter.seed_time`)."""
    tau = tau.reshape(-1, *([1] * p0.dim()))
    s = torch.sigmoid(tau * (w + 1) + b)
    return p1 + s * (p0 - p1)


def qk_norm_ref(x: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """QKNorm on q or k (B, H, N, Dh): rms-normalise each head vector, times exp(log_scale / 2) / Dh^(1/4). log_scale
    (H,) is the learned parameter, which the caller keeps clamped at log 100 in place (as the official `proj_`), so the
    gradient is never cut by the clamp. The model runs it as `crossflow_kernels.rms_norm` on q and k together."""
    s = torch.exp(0.5 * log_scale - 0.25 * math.log(x.shape[-1]))
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + QK_EPS) * s[:, None, None]).to(x.dtype)


def layer_norm_td_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """LayerNorm(x) * weight + bias with per-sample weight, bias (B, D); x (B, ..., D)."""
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    y = F.layer_norm(x, x.shape[-1:], eps=eps)
    return torch.addcmul(bias.reshape(view).to(y.dtype), weight.reshape(view).to(y.dtype), y)


#################################################################################
#                                     Norms                                     #
#################################################################################


class TimeDependentParameter(nn.Module):
    """A parameter blended between `param0` and `param1` by a learned sigmoid of tau (official names; the `nodecay_*`
    pair is trained without weight decay, as `utils.trainable_parameters` does)."""

    def __init__(self, shape: tuple[int, ...], init: float):
        super().__init__()
        self.param0 = nn.Parameter(torch.full(shape, float(init)))
        self.param1 = nn.Parameter(torch.full(shape, float(init)))
        self.nodecay_weight = nn.Parameter(torch.zeros(shape))
        self.nodecay_bias = nn.Parameter(torch.zeros(shape))

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        return time_dependent_ref(self.param0, self.param1, self.nodecay_weight, self.nodecay_bias, tau)  # (B, *S)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])  # (B, ..., D) -> (B, N, D) for the row kernels


class Norm(nn.Module):
    """One of the block norms (`norm_type`), on (B, N, D) tokens or (B, H, W, D) maps; `tau` (B,) fp32.

    `forward(x, tau)` = norm(x); `residual(x, y, tau)` = (x + y, norm(x + y)), fused into one kernel where the norm's
    parameters do not depend on x + y (all but "adarms")."""

    def __init__(self, kind: str, dim: int):
        super().__init__()
        self.kind = kind
        if kind == "tdrms":
            self.scale = TimeDependentParameter((dim,), 1.0)
        elif kind == "rms":
            self.scale = nn.Parameter(torch.ones(dim))
        elif kind == "layer":
            self.weight = TimeDependentParameter((dim,), 1.0)
            self.bias = TimeDependentParameter((dim,), 0.0)
        elif kind == "adarms":
            self.linear = nn.Linear(dim, dim, bias=False)  # zero-init: starts as a plain RMSNorm
        else:
            raise ValueError(f"unknown norm_type {kind!r}; choose one of {NORM_TYPES}")

    def modulation(self, x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, str]:
        """(shift, scale - 1, eps, norm) for `crossflow_kernels.adaln_modulate` / `gated_residual_adaln`, (B, D)
        each."""
        B, D = x.shape[0], x.shape[-1]
        if self.kind == "layer":
            w, b = self.weight(tau), self.bias(tau)
            return b.to(x.dtype), (w - 1).to(x.dtype), LN_EPS, "layer"
        if self.kind == "tdrms":
            s = self.scale(tau) - 1
        else:  # "rms": the same scale for every sample
            s = (self.scale - 1).expand(B, D)
        s = s.to(x.dtype)
        return torch.zeros_like(s), s, RMS_EPS, "rms"

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            shift, scale, eps, norm = self.modulation(x, tau)
            return crossflow_kernels.adaln_modulate(_rows(x), shift, scale, eps, norm).view(x.shape)
        if self.kind == "adarms":
            # (B, D) from the first token, or (B, W, D) from the first row of a map: broadcast over tokens / rows
            weight, eps = (self.linear(x[:, 0]) + 1).unsqueeze(1), ADARMS_EPS
        elif self.kind == "tdrms":
            weight, eps = self.scale(tau).view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1]), RMS_EPS
        else:  # "rms"
            weight, eps = self.scale, RMS_EPS
        return crossflow_kernels.rms_norm(x, weight.to(x.dtype), eps)

    def residual(self, x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "adarms":
            r = x + y
            return r, self(r, tau)
        shift, scale, eps, norm = self.modulation(x, tau)
        r, h = crossflow_kernels.gated_residual_adaln(_rows(x), _rows(y), torch.ones_like(scale), shift, scale, eps,
                                                      norm)
        return r.view(x.shape), h.view(x.shape)


class TDLayerNorm(nn.Module):
    """The official time-dependent LayerNorm (`sigmoid.module.LayerNorm`) of the upsample and output paths."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = TimeDependentParameter((dim,), 1.0)
        self.bias = TimeDependentParameter((dim,), 0.0)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        w, b = self.weight(tau), self.bias(tau)  # (B, D)
        if x.shape[-1] > WIDE_ROW:
            return layer_norm_td_ref(x, w, b)
        return crossflow_kernels.adaln_modulate(_rows(x), b.to(x.dtype), (w - 1).to(x.dtype), LN_EPS,
                                                "layer").view(x.shape)


#################################################################################
#                                     Blocks                                    #
#################################################################################


class GEGLU(nn.Module):
    """fc_out(GELU(w0 h) * (w1 h)); `fc_in` holds [w0; w1]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(dim, 2 * hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc_out(crossflow_kernels.geglu(self.fc_in(h)))


class SelfAttention(nn.Module):
    """qkv Linear without bias, heads of `dim / num_heads`, scale 1/sqrt(Dh), output Linear with bias."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.qk_log_scale = nn.Parameter(torch.full((num_heads,), math.log(10.0))) if qk_norm else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, N, D = h.shape
        H, Dh = self.num_heads, D // self.num_heads
        qkv = self.qkv(h).view(B, N, 3, H, Dh)
        if self.qk_log_scale is not None:
            with torch.no_grad():  # the official projection: keep the stored value at the clamp (no host sync)
                self.qk_log_scale.clamp_(max=QK_MAX_LOG_SCALE)
            # q and k normalised in one call on the fused projection's view, one gain per head (qk_norm_ref's math)
            gain = torch.exp(0.5 * self.qk_log_scale - 0.25 * math.log(Dh)).to(qkv.dtype)
            qk = crossflow_kernels.rms_norm(qkv[:, :, :2], gain.view(1, H, 1).expand(2, H, 1),
                                            QK_EPS)  # (B, N, 2, H, Dh)
            q, k = qk.transpose(1, 3).unbind(2)  # (B, H, N, Dh) each
            v = qkv[:, :, 2].transpose(1, 2)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = crossflow_kernels.attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class TransformerBlock(nn.Module):
    """x += attn(norm(x)); x += mlp(norm(x)) (pre-norm, no gates). The first residual is fused into the MLP's norm."""

    def __init__(self, s: DiMRStage, norm_type: str, qk_norm: bool):
        super().__init__()
        self.attn_norm = Norm(norm_type, s.dim)
        self.attn = SelfAttention(s.dim, s.num_heads, qk_norm)
        self.mlp_norm = Norm(norm_type, s.dim)
        self.mlp = GEGLU(s.dim, s.hidden)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        x, h = self.mlp_norm.residual(x, self.attn(self.attn_norm(x, tau)).to(x.dtype), tau)
        return x + self.mlp(h).to(x.dtype)


class ConvNeXtBlock(nn.Module):
    """x += dwconv(x) (no norm before it); x += mlp(norm(x)). Activations channel-last (B, H, W, D)."""

    def __init__(self, s: DiMRStage, norm_type: str):
        super().__init__()
        self.dwconv = nn.Conv2d(s.dim, s.dim, s.kernel_size, padding=s.kernel_size // 2, groups=s.dim)
        self.mlp_norm = Norm(norm_type, s.dim)
        self.mlp = GEGLU(s.dim, s.hidden)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        c = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # a channels-last conv on GPU, no copy
        x, h = self.mlp_norm.residual(x, c.to(x.dtype), tau)
        return x + self.mlp(h).to(x.dtype)


#################################################################################
#                                  Stage, model                                 #
#################################################################################


def _area_downsample(x: torch.Tensor, r: int) -> torch.Tensor:
    return x if r == 1 else F.interpolate(x, size=(x.shape[-2] // r, x.shape[-1] // r), mode="area")


class Stage(nn.Module):
    def __init__(self, cfg: DiMRConfig, s: DiMRStage, lowres: DiMRStage | None):
        super().__init__()
        self.spec, self.gradient_checkpointing = s, False
        D, C = s.dim, cfg.latent_channels
        self.embed = nn.Conv2d(C, D, s.patch, stride=s.patch)
        self.pos_embed = nn.Parameter(torch.zeros(s.grid * s.grid, D))
        self.up_ratio = s.grid // lowres.grid if lowres is not None else 0
        if lowres is not None:
            self.up_norm_in = TDLayerNorm(lowres.skip_dim)
            self.up_proj = nn.Linear(lowres.skip_dim, D * self.up_ratio**2)
            self.up_norm_out = TDLayerNorm(D)
        if s.block == "transformer":
            self.blocks = nn.ModuleList([TransformerBlock(s, cfg.norm_type, cfg.qk_norm) for _ in range(s.depth)])
            # [cond, uncond] = the official (tensor_false, tensor_true), prepended as a broadcast token
            self.indicator_values = nn.Parameter(torch.tensor([1.0, -1.0]))
        else:
            self.blocks = nn.ModuleList([ConvNeXtBlock(s, cfg.norm_type) for _ in range(s.depth)])
            self.indicator_values = None
        self.skip_proj = nn.ModuleList([nn.Linear(2 * D, D) for _ in range(s.depth // 2)])
        self.out_norm = TDLayerNorm(D)
        self.out_conv = nn.Conv2d(D, C, s.final_kernel, padding=s.final_kernel // 2)

    def _block(self, i: int, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.blocks[i], x, tau, use_reentrant=False)
        return self.blocks[i](x, tau)

    def forward(
        self, latent: torch.Tensor, lowres: torch.Tensor | None, tau: torch.Tensor, indicator: torch.Tensor,
        want_output: bool, want_skips: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """latent (B, C, H, W), lowres (B, g', g', skip_dim') or None -> (prediction (B, C, g, g) | None,
        skips (B, g, g, skip_dim) | None)."""
        s = self.spec
        x = self.embed(_area_downsample(latent, s.input_ratio)).permute(0, 2, 3, 1)  # (B, g, g, D)
        B, G, _, D = x.shape
        x = x + self.pos_embed.view(G, G, D).to(x.dtype)
        if lowres is not None:
            u = self.up_proj(self.up_norm_in(lowres, tau))  # (B, g', g', r*r*D), channels (i, j, c)
            r, g = self.up_ratio, lowres.shape[1]
            u = u.view(B, g, g, r, r, D).transpose(2, 3).reshape(B, G, G, D)  # PixelShuffle, channel-last layout
            x = x + self.up_norm_out(u, tau).to(x.dtype)
        token = s.block == "transformer"
        if token:
            ind = torch.where(indicator.bool(), self.indicator_values[1], self.indicator_values[0]).to(x.dtype)
            x = torch.cat([ind.view(B, 1, 1).expand(B, 1, D), x.reshape(B, G * G, D)], dim=1)  # (B, 1 + g*g, D)
        external = [x]
        half = s.depth // 2
        skips = []
        for i in range(s.depth):
            if i > half:
                x = self.skip_proj[i - half - 1](torch.cat([x, skips.pop()], dim=-1))
            with crossflow_kernels.nvtx_range(f"crossflow/dimr{s.grid}/block{i}"):
                x = self._block(i, x, tau)
            if i < half:
                skips.append(x)
            external.append(x)
        out = None
        if want_output:
            y = x[:, 1:].reshape(B, G, G, D) if token else x
            out = self.out_conv(self.out_norm(y, tau).permute(0, 3, 1, 2))  # (B, C, g, g)
        cat = None
        if want_skips:
            if token:  # drop the indicator token while concatenating: one copy of the wide tensor
                cat = torch.cat([e[:, 1:] for e in external], dim=-1).view(B, G, G, -1)
            else:
                cat = torch.cat(external, dim=-1)  # (B, g, g, (depth + 1) * D)
        return out, cat


class DiMRFlow(nn.Module):
    """`forward(x (B, C, H, W), t (B,) or 0-d in [0, 1], indicator (B,) long/bool, return_all=False)` -> the finest
    velocity (B, C, H, W), or with `return_all` the list of per-stage velocities, coarse to fine.

    Set `gradient_checkpointing = True` to recompute every block in the backward pass (the official trains so)."""

    def __init__(self, cfg: DiMRConfig):
        super().__init__()
        if not isinstance(cfg, DiMRConfig):
            raise ValueError(f"DiMRFlow expects a DiMRConfig, got {type(cfg).__name__}")
        self.config = cfg
        prev = [None, *cfg.stages[:-1]]
        self.stages = nn.ModuleList([Stage(cfg, s, p) for s, p in zip(cfg.stages, prev)])
        self.initialize_weights()

    @property
    def gradient_checkpointing(self) -> bool:
        return all(s.gradient_checkpointing for s in self.stages)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        for s in self.stages:
            s.gradient_checkpointing = bool(on)

    def init_buffers(self) -> None:
        """No non-persistent buffers (API parity with `FlowTransformer` for loaders that build on meta)."""

    def initialize_weights(self) -> None:
        """The official init: Linear weights and positions trunc-normal(0.02) with zero biases, convs PyTorch's
        default, TD params at their constants (done in the constructors), AdaRMSNorm's Linear zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Norm) and m.kind == "adarms":
                nn.init.zeros_(m.linear.weight)
        for s in self.stages:
            nn.init.trunc_normal_(s.pos_embed, std=0.02)

    def no_weight_decay_names(self) -> list[str]:
        """Parameters the official optimizer exempts from weight decay (`nodecay_*` of the TD parameters)."""
        return [n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1].startswith("nodecay_")]

    def _check(self, x: torch.Tensor, t: torch.Tensor, indicator: torch.Tensor) -> torch.Tensor:
        return check_flow_inputs("DiMRFlow", self.config.latent_shape, x, t, indicator)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, indicator: torch.Tensor, return_all: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        t = self._check(x, t, indicator)
        log_snr = 4 - t.float() * 8  # as the official solver / loss compute it, in fp32
        tau = log_snr / 4.0
        n, outs, lowres = len(self.stages), [], None
        for i, stage in enumerate(self.stages):
            last = i == n - 1
            out, lowres = stage(x, lowres, tau, indicator, want_output=return_all or last, want_skips=not last)
            if self.config.detach_lowres and lowres is not None:
                lowres = lowres.detach()
            if out is not None:
                outs.append(out)
        return outs if return_all else outs[-1]


#################################################################################
#                                Multi-scale loss                               #
#################################################################################


def multiscale_targets(v: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The official `multi_scale_targets(..., scale_correction=True)` for even sizes: v (B, C, H, W) downsampled to
    each `size` by r * avg_pool_r (r = H / size; a box sum divided by r, not r^2)."""
    H = v.shape[-1]
    out = []
    for s in sizes:
        if H % s:
            raise ValueError(f"multiscale_targets: size {s} does not divide the target size {H}")
        r = H // s
        out.append(v if r == 1 else F.avg_pool2d(v, r) * r)
    return out


def multiscale_flow_loss(
    preds: list[torch.Tensor], v: torch.Tensor, coeffs: tuple[float, ...] | list[float]
) -> torch.Tensor:
    """Per-sample sum_l coeff_l * mean_{C,H,W} (pred_l - target_l)^2 -> (B,) (official `p_losses_textVAE`)."""
    if len(preds) != len(coeffs):
        raise ValueError(f"multiscale_flow_loss: {len(preds)} predictions but {len(coeffs)} loss coefficients")
    targets = multiscale_targets(v, [p.shape[-1] for p in preds])
    loss = 0
    for p, tgt, c in zip(preds, targets, coeffs):
        loss = loss + c * (p.float() - tgt.float()).pow(2).flatten(1).mean(1)
    return loss
