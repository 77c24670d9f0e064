"""The contrastive image encoder of CrossFlow's training loss: target -> features the size of z0.

`build_image_encoder(cfg)` picks `ImageEncoder` (ours: a small conv net on the target latent, `cfg.image_encoder ==
"conv"`) or `PretrainedImageEncoder` (a frozen `transformers` vision tower named by `cfg.image_encoder` plus a
trainable projection, on pixel images). Only the training loss uses it; sampling never does.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from crossflow.config import CrossFlowConfig


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


def build_image_encoder(cfg: CrossFlowConfig) -> nn.Module:
    """The contrastive image encoder of `cfg` -> (B, latent_numel) features: `ImageEncoder` on the target latent
    ("conv"), or `PretrainedImageEncoder` (a frozen tower named by `cfg.image_encoder`) on pixel images."""
    if cfg.image_encoder != "conv":
        return PretrainedImageEncoder(cfg.image_encoder, cfg.image_feature_dim, cfg.latent_numel)
    return ImageEncoder(
        cfg.latent_channels, cfg.latent_size, cfg.image_encoder_width, cfg.image_feature_dim, cfg.latent_numel
    )
