"""The image Variational Encoder: the source encoder of an image-source pairing (captioning, super-resolution, image
variation). Images (B, Cs, Hs, Ws) in [-1, 1] -> (mu, logvar), each (B, latent_numel): the flow starts from
z0 = mu + exp(logvar / 2) * eps, as it does from the Text VE's sample in text-to-image.

The network is `image_encoder.ImageEncoder` (stride-2 convs to <= 4x4, flatten, Linear, GELU + LayerNorm, Linear) with
2 * latent_numel outputs: the same small conv net the contrastive loss already uses, so no new layer kind.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from crossflow.config import CrossFlowConfig
from crossflow.models.image_encoder import ImageEncoder


class ImageVE(nn.Module):
    """`forward(images (B, source_channels, source_size, source_size)) -> (mu, logvar)`, each (B, latent_numel)."""

    def __init__(self, cfg: CrossFlowConfig):
        super().__init__()
        self.config = cfg
        self.net = ImageEncoder(cfg.source_channels, cfg.source_size, cfg.image_ve_width, cfg.image_feature_dim,
                                2 * cfg.latent_numel)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.config.source_shape
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"ImageVE: expected source images (B, C, H, W) = (B, {', '.join(map(str, shape))}), "
                             f"got {got}")
        out = self.net(images.to(next(self.parameters()).dtype))  # (B, 2 * latent_numel)
        mu, logvar = out.chunk(2, dim=-1)
        return mu, logvar
