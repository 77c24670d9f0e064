"""Building blocks of the CrossFlow flow transformer (a DiT with adaLN-Zero) and its contrastive image encoder.

Module and parameter names follow the official `libs/model/dit_t2i.py` (itself DiT's `models.py` on timm layers), so
its checkpoints convert by renaming only (`crossflow.convert`). Every hot op goes through the `kernels` seam:
`kernels.attention`, `kernels.adaln_modulate`, `kernels.gated_residual_adaln`.

Shapes: B batch, T image tokens, D hidden width, H heads, Dh head dim, C/Hl/Wl latent channels/height/width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

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
        o = kernels.attention(q, k, v)  # (B, H, T, Dh); its transpose(1, 2) is contiguous on the Triton path
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

    The official block computes `x += gate_msa * attn(modulate(LN(x), shift_msa, scale_msa))` and the same for the
    MLP. Here the block receives the residual stream `x` *and* `h = modulate(LN(x), shift_msa, scale_msa)` already
    computed by the previous fused op, and returns the new residual and the normalised input of whatever comes next
    (the next block's attention, or the final layer), so each residual add + LN + modulate is one kernel
    (`kernels.gated_residual_adaln`). Its modulation vectors are computed outside (`FlowTransformer.adaLN_modulation`).
    """

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
        x, h = kernels.gated_residual_adaln(x, a, mod[:, 2], mod[:, 3], mod[:, 4], self.eps, self.norm)
        m = self.mlp(h).to(x.dtype)  # (B, T, D)
        return kernels.gated_residual_adaln(x, m, mod[:, 5], next_shift, next_scale, self.eps, self.norm)


class FinalLayer(nn.Module):
    """The output projection of the final adaLN layer; its norm + modulation is fused into the last block."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)  # (B, T, p*p*C)


#################################################################################
#                     Contrastive image encoder (ours)                          #
#################################################################################


class ImageEncoder(nn.Module):
    """Target latent (B, C, Hl, Wl) -> feature (B, out_dim) for the text-image contrastive loss.

    NOTE(deviation): the official model runs a trainable SigLIP ViT-L/16 tower (~0.3B) on the 256 px *pixels* plus an
    MLP/Adaptor projection to the latent size. That is the main training-cost trap (crossflow.md §6.11); the paper only
    asks for "a simple encoder to project the target into z0's shape". Ours is a small conv net on the target latent:
    stride-2 convs down to <= 4x4, flatten, Linear to `feature_dim` (the tower's output), then a GELU + LayerNorm +
    Linear projection to `out_dim` (the official timm Mlp's act -> norm order, one layer shallower).
    """

    def __init__(self, in_channels: int, size: int, width: int, feature_dim: int, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(1, width), nn.SiLU()]
        ch, s = width, size
        while s > 4:
            nxt = min(2 * ch, 4 * width)
            layers += [nn.Conv2d(ch, nxt, 3, stride=2, padding=1), nn.GroupNorm(1, nxt), nn.SiLU()]
            ch, s = nxt, (s + 1) // 2
        self.conv = nn.Sequential(*layers)
        self.fc1 = nn.Linear(ch * s * s, feature_dim)
        self.norm = nn.LayerNorm(feature_dim)
        self.fc2 = nn.Linear(feature_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x).flatten(1)  # (B, ch * s * s)
        f = self.norm(F.gelu(self.fc1(f)))  # (B, feature_dim)
        return self.fc2(f)  # (B, out_dim)


class PretrainedImageEncoder(nn.Module):
    """A frozen pretrained vision tower (any `transformers` vision model by hub name or local path: SigLIP, CLIP, ViT)
    plus a trainable projection to `out_dim`: the official design (SigLIP image tower + Mlp), with the tower frozen.

    Input: *pixel* images (B, C, H, W) in [-1, 1] (grey images are repeated to 3 channels), resized to the tower's
    input size and normalised with its processor's mean/std. The tower is kept out of the module tree: it is not
    trained, not saved in checkpoints (it is reloaded by name) and follows the input's device on first use.
    """

    def __init__(self, name: str, feature_dim: int, out_dim: int):
        super().__init__()
        import os

        from transformers import AutoModel

        kw = {"local_files_only": True} if os.path.isdir(name) else {}
        with torch.device("cpu"):  # real weights even when the CrossFlow around us is built on the meta device
            model = AutoModel.from_pretrained(name, **kw)
        tower = getattr(model, "vision_model", model)  # CLIPModel / SiglipModel -> their vision tower
        tower.requires_grad_(False).eval()
        object.__setattr__(self, "_tower", tower)  # not a submodule: frozen, unsaved
        vcfg = tower.config
        self.image_size = int(vcfg.image_size)
        self.mean, self.std = _processor_stats(name, kw)  # plain lists: no buffer to re-materialise after a meta build
        self.fc1 = nn.Linear(int(vcfg.hidden_size), feature_dim)
        self.norm = nn.LayerNorm(feature_dim)
        self.fc2 = nn.Linear(feature_dim, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"PretrainedImageEncoder: expected pixel images (B, 1 | 3, H, W) in [-1, 1], "
                             f"got {tuple(images.shape)}")
        tower = self._tower
        if next(tower.parameters()).device != images.device:
            tower.to(images.device)
        x = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = ((x + 1) / 2 - mean) / std  # [-1, 1] -> the tower's normalisation
        with torch.no_grad():
            out = tower(pixel_values=x.to(next(tower.parameters()).dtype))
        f = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state.mean(1)
        f = self.norm(F.gelu(self.fc1(f.to(self.fc1.weight.dtype))))  # (B, feature_dim)
        return self.fc2(f)  # (B, out_dim)


def _processor_stats(name: str, kw: dict) -> tuple[list[float], list[float]]:
    """The image processor's mean/std, or SigLIP's 0.5/0.5 (i.e. [-1, 1] input) when the model ships none."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(name, **kw)
        return list(proc.image_mean), list(proc.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        return [0.5] * 3, [0.5] * 3
