"""Building blocks of the CrossFlow flow transformer (a DiT with adaLN-Zero).

Module and parameter names follow the official `libs/model/dit_t2i.py` (itself DiT's `models.py` on timm layers), so
its checkpoints convert by renaming only (`crossflow.convert.dit`). Every hot op goes through the `crossflow_kernels`
seam: `crossflow_kernels.attention`, `crossflow_kernels.adaln_modulate`, `crossflow_kernels.gated_residual_adaln`.

Shapes: B batch, T image tokens, D hidden width, H heads, Dh head dim, C/Hl/Wl latent channels/height/width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import crossflow_kernels

#################################################################################
#               Embedding layers for timesteps, indicator and patches           #
#################################################################################


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) t: (B,) -> (B, dim) fp32, [cos | sin] as GLIDE/DiT.

    CrossFlow feeds raw t in [0, 1] (not x1000): the DiT checkpoint was trained that way.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): sinusoidal(256) then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, 256) fp32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """The CFG indicator: 0 = conditional, 1 = unconditional. Exactly 2 rows, as the official table (no extra null
    row: CrossFlow's uncond branch is its own class, not a dropped label)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels.long())  # (B, D)


class PatchEmbed(nn.Module):
    """(B, C, Hl, Wl) -> (B, T, D) with a stride-p Conv2d (timm's PatchEmbed, flatten + transpose)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    out = pos[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def sincos_pos_embed_2d(dim: int, grid_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (MAE/DiT), (grid_size**2, dim) fp32, tokens in row-major (h, w) order.

    As the reference, the first half of the channels encodes the column (w) and the second half the row (h);
    computed in float64 and rounded once, so it matches the official numpy table.
    """
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    hh, ww = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    emb = torch.cat([_sincos_1d(dim // 2, ww.reshape(-1)), _sincos_1d(dim // 2, hh.reshape(-1))], dim=1)
    return emb.float()  # (G*G, dim)


#################################################################################
#                                 DiT block                                     #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv Linear (timm `Attention`, qkv_bias=True, no qk-norm)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh), strided views, no copies
        o = crossflow_kernels.attention(q, k, v)  # (B, H, T, Dh); its transpose(1, 2) is contiguous on the Triton path
        return self.proj(o.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm `Mlp` as the official DiT builds it)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """An adaLN-Zero DiT block whose residual adds are fused into the *next* normalisation.

    The official block computes `x += gate_msa * attn(modulate(LN(x), shift_msa, scale_msa))` and the same for the MLP.
    Here the block receives the residual stream `x` *and* `h = modulate(LN(x), shift_msa, scale_msa)` already computed
    by the previous fused op, and returns the new residual and the normalised input of whatever comes next (the next
    block's attention, or the final layer), so each residual add + LN + modulate is one kernel
    (`crossflow_kernels.gated_residual_adaln`). Its modulation vectors are computed outside
    (`FlowTransformer.adaLN_modulation`)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, norm: str = "layer", eps: float = 1e-6):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, mlp_hidden)
        self.norm, self.eps = norm, eps

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, mod: torch.Tensor, next_shift: torch.Tensor, next_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x, h: (B, T, D); mod: (B, 6, D) = shift/scale/gate for msa, then for mlp; next_*: (B, D)
        a = self.attn(h).to(x.dtype)  # (B, T, D)
        x, h = crossflow_kernels.gated_residual_adaln(x, a, mod[:, 2], mod[:, 3], mod[:, 4], self.eps, self.norm)
        m = self.mlp(h).to(x.dtype)  # (B, T, D)
        return crossflow_kernels.gated_residual_adaln(x, m, mod[:, 5], next_shift, next_scale, self.eps, self.norm)


class FinalLayer(nn.Module):
    """The output projection of the final adaLN layer; its norm + modulation is fused into the last block."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)  # (B, T, p*p*C)


def check_flow_inputs(name: str, shape: tuple[int, ...], x: torch.Tensor, t: torch.Tensor,
                      indicator: torch.Tensor) -> torch.Tensor:
    """The flow networks' (FlowTransformer, DiMRFlow) input checks: x (B, *shape), t (B,) or 0-d, indicator (B,)
    long/bool; returns t as (B,). ValueError naming `name` otherwise."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != shape:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected latent (B, C, H, W) = (B, {', '.join(map(str, shape))}), got {got}")
    B = x.shape[0]
    if not isinstance(t, torch.Tensor) or not (t.dim() == 0 or tuple(t.shape) == (B,)):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected t of shape ({B},) or a 0-d tensor, got {got}")
    if (not isinstance(indicator, torch.Tensor) or tuple(indicator.shape) != (B,)
            or indicator.is_floating_point() or indicator.is_complex()):
        got = (tuple(indicator.shape), indicator.dtype) if isinstance(indicator, torch.Tensor) else type(indicator)
        raise ValueError(f"{name}: expected indicator ({B},) long/bool (0 = cond, 1 = uncond), got {got}")
    return t.expand(B) if t.dim() == 0 else t
