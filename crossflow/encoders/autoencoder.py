"""Frozen image autoencoders: images in [-1, 1] <-> the flow's latent space.

  * `IdentityAutoencoder`: pixel space (the latent *is* the image), for the embedded digits model.
  * `VAEAutoencoder`: a `diffusers.AutoencoderKL` (CrossFlow: the SD-v1 KL-f8 VAE) with CrossFlow's scale 0.23010
    (not SD's 0.18215) and no shift. `encode` *samples* the posterior (the official trains on sampled latents).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from crossflow.config import CrossFlowConfig

CROSSFLOW_VAE_SCALE = 0.23010


class IdentityAutoencoder(nn.Module):
    """Pixel space: `encode(images) = images`, `decode(latent) = latent` (images in [-1, 1])."""

    scale = 1.0
    downsample = 1

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


class VAEAutoencoder(nn.Module):
    """Frozen `AutoencoderKL`: `encode(images (B, 3, H, W) in [-1, 1]) -> scale * posterior.sample()` (B, c, H/f, W/f);
    `decode(latent) -> images` (B, 3, H, W), roughly in [-1, 1] (not clamped)."""

    def __init__(self, vae: nn.Module, scale: float = CROSSFLOW_VAE_SCALE):
        super().__init__()
        if not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"VAE scale must be a positive float, got {scale!r}")
        self.vae, self.scale = vae, float(scale)
        self.vae.requires_grad_(False)
        self.eval()
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, name: str, scale: float = CROSSFLOW_VAE_SCALE,
                        dtype: torch.dtype | None = None) -> "VAEAutoencoder":
        """From a local directory or a hub id; ``"org/repo/sub/folder"`` loads subfolder ``sub/folder`` of
        ``org/repo`` (e.g. ``"CompVis/stable-diffusion-v1-4/vae"``)."""
        from diffusers import AutoencoderKL

        kw: dict = {} if dtype is None else {"torch_dtype": dtype}
        if os.path.isdir(name):
            vae = AutoencoderKL.from_pretrained(name, local_files_only=True, **kw)
        else:
            parts = name.split("/")
            repo, sub = "/".join(parts[:2]), "/".join(parts[2:]) or None
            vae = AutoencoderKL.from_pretrained(repo, subfolder=sub, **kw)
        return cls(vae, scale)

    def train(self, mode: bool = True) -> "VAEAutoencoder":
        return super().train(False)  # frozen

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"VAEAutoencoder.encode: expected images (B, {self.vae.config.in_channels}, H, W), "
                             f"got {tuple(images.shape)}")
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"VAEAutoencoder.encode: H, W {tuple(images.shape[-2:])} must be multiples of "
                             f"{self.downsample}")
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return self.scale * posterior.sample(generator=generator)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.dim() != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"VAEAutoencoder.decode: expected latent (B, {self.latent_channels}, h, w), "
                             f"got {tuple(latent.shape)}")
        return self.vae.decode(latent.to(self.vae.dtype) / self.scale).sample


def build_autoencoder(cfg: CrossFlowConfig, dtype: torch.dtype | None = None) -> IdentityAutoencoder | VAEAutoencoder:
    """The autoencoder named by `cfg.autoencoder` (``"identity"`` or an AutoencoderKL name/path, scale
    `cfg.vae_scale`), checked against the config's latent channels."""
    if cfg.autoencoder == "identity":
        return IdentityAutoencoder()
    ae = VAEAutoencoder.from_pretrained(cfg.autoencoder, scale=cfg.vae_scale, dtype=dtype)
    if ae.latent_channels != cfg.latent_channels:
        raise ValueError(f"autoencoder {cfg.autoencoder!r} has {ae.latent_channels} latent channels, config has "
                         f"latent_channels={cfg.latent_channels}")
    return ae
