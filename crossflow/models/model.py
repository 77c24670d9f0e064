"""The CrossFlow model: a source encoder (z0), the flow transformer (velocity), the target side, a contrastive encoder.

The pairing is configured (`CrossFlowConfig.source` / `.target`; DESIGN.md section 9, in the project's design notes
outside this repository), not copied:
  * source "text": the Text VE over text-encoder tokens; "image": the image VE (`image_ve.ImageVE`) over an image.
  * the flow network: the DiT (`FlowTransformer`) or DiMR (`models.dimr.DiMRFlow`), by `CrossFlowConfig.backbone`.
  * target "image": the image latent (the autoencoder's; the digits use pixels); "text": the text autoencoder, i.e. the
    Text VE's mu of the caption is the flow's target and `text_decoder.TextDecoder` reads it back as words. The text
    latent (latent_numel values, no order of its own) is held in the flow's (C, H, W) grid, so the DiT, its patches,
    its fixed 2-D positions (here: distinct codes per token), the samplers and the kernels serve every pairing as is.

`FlowTransformer` is the official DiT variant (`libs/model/dit_t2i.py`): patch embedding, fixed 2-D sin-cos positions,
raw-t sinusoidal timestep embedding plus a 2-class cond/uncond indicator embedding, adaLN-Zero blocks, final adaLN
layer. It sees no text: conditioning enters only through the source z0 and the indicator. Two structural changes make
it fast without changing the math (an official checkpoint converts exactly, `crossflow.convert.dit`):

  * the adaLN modulation of every block and of the final layer comes from ONE Linear on SiLU(c), computed up front
    (its weight is the official per-block weights stacked along the output dim);
  * each residual add is fused with the following LayerNorm + modulate (`crossflow_kernels.gated_residual_adaln`), so
    the MLP residual of block i lands in block i+1's first norm, and the last one in the final layer's norm.

With `backbone="dimr"` the flow network is `crossflow.models.dimr.DiMRFlow` (the official multi-resolution network, same
call) and the flow-matching term is its multi-scale loss (`dimr.multiscale_flow_loss`, weights `loss_coeffs`).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import crossflow_kernels
from crossflow import flow as fm
from crossflow.checkpoint import load_state_dict_strict, read_pretrained, save_pretrained, skip_random_init
from crossflow.config import CrossFlowConfig
from crossflow.models.dimr import DiMRFlow, multiscale_flow_loss
from crossflow.models.image_encoder import build_image_encoder
from crossflow.models.image_ve import ImageVE
from crossflow.models.layers import (DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder,
                                     check_flow_inputs, sincos_pos_embed_2d)
from crossflow.models.text_decoder import TextDecoder
from crossflow.models.text_ve import TextVE

NUM_INDICATOR_CLASSES = 2  # 0 = conditional, 1 = unconditional (official `LabelEmbedder(num_classes=2)`)
NORM_EPS = 1e-6  # DiT's LayerNorm(elementwise_affine=False, eps=1e-6)


class FlowTransformer(nn.Module):
    """DiT with adaLN-Zero: `forward(x (B, C, H, W), t (B,) in [0, 1], indicator (B,) long) -> v (B, C, H, W)`.

    Set `gradient_checkpointing = True` to recompute each block in the backward pass (training memory).
    """

    def __init__(self, cfg: CrossFlowConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        D, C, p = cfg.hidden_size, cfg.latent_channels, cfg.patch_size
        self.x_embedder = PatchEmbed(p, C, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(NUM_INDICATOR_CLASSES, D)
        # Fixed, recomputed on construction: a buffer that is neither trained nor saved.
        self.register_buffer("pos_embed", torch.empty(1, cfg.num_tokens, D), persistent=False)  # (1, T, D)
        self.init_buffers()
        self.blocks = nn.ModuleList(
            [DiTBlock(D, cfg.num_heads, cfg.mlp_hidden, cfg.norm, NORM_EPS) for _ in range(cfg.depth)]
        )
        # Block i's (shift, scale, gate)_msa, (shift, scale, gate)_mlp: rows [6i, 6i+6) * D; final (shift, scale) last.
        self.adaLN_modulation = nn.Linear(D, (6 * cfg.depth + 2) * D)
        self.final_layer = FinalLayer(D, p, C)
        self.initialize_weights()

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent buffers, e.g. after `to_empty()` on a model built on the meta device."""
        pos = sincos_pos_embed_2d(self.config.hidden_size, self.config.grid_size, device=self.pos_embed.device)
        with torch.no_grad():
            self.pos_embed.copy_(pos[None])

    def initialize_weights(self) -> None:
        """DiT's init: xavier Linear / zero bias, patch embed as a Linear, N(0, 0.02) embeddings, zeroed adaLN and
        output layer (every block is the identity and the output is zero at init)."""

        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for t in (self.adaLN_modulation.weight, self.adaLN_modulation.bias, *self.final_layer.parameters()):
            nn.init.zeros_(t)

    def _check(self, x: torch.Tensor, t: torch.Tensor, indicator: torch.Tensor) -> torch.Tensor:
        return check_flow_inputs("FlowTransformer", self.config.latent_shape, x, t, indicator)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        B, G, p, C = x.shape[0], self.config.grid_size, self.config.patch_size, self.config.latent_channels
        x = x.reshape(B, G, G, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, G * p, G * p)

    def _block(self, i: int, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.blocks[i], *args, use_reentrant=False)
        return self.blocks[i](*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, indicator: torch.Tensor) -> torch.Tensor:
        t = self._check(x, t, indicator)
        B, D, depth, cfg = x.shape[0], self.config.hidden_size, self.config.depth, self.config
        x = self.x_embedder(x)  # (B, T, D), T = (H / p) * (W / p)
        x = x + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(indicator)  # (B, D)
        mods = self.adaLN_modulation(F.silu(c)).to(x.dtype)  # (B, (6 * depth + 2) * D), every block at once
        blk = mods[:, : 6 * depth * D].view(B, depth, 6, D)  # (B, depth, 6, D)
        fin = mods[:, 6 * depth * D :].view(B, 2, D)  # (B, 2, D) final (shift, scale)
        h = crossflow_kernels.adaln_modulate(x, blk[:, 0, 0], blk[:, 0, 1], NORM_EPS, cfg.norm)  # (B, T, D)
        for i in range(depth):
            nxt = blk[:, i + 1] if i + 1 < depth else fin  # whose norm this block's MLP residual is fused into
            # a shared no-op unless CROSSFLOW_KERNELS_NVTX is set
            with crossflow_kernels.nvtx_range(f"crossflow/block{i}"):
                x, h = self._block(i, x, h, blk[:, i], nxt[:, 0], nxt[:, 1])  # (B, T, D) each
        return self.unpatchify(self.final_layer(h))  # (B, C, H, W)


def build_flow(cfg: CrossFlowConfig) -> nn.Module:
    """The velocity network `cfg.backbone` names: our DiT (`FlowTransformer`) or DiMR
    (`crossflow.models.dimr.DiMRFlow`)."""
    if cfg.backbone == "dimr":
        return DiMRFlow(cfg.dimr)
    return FlowTransformer(cfg)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """mu + exp(logvar / 2) * eps, eps drawn in fp32 on `generator`'s device (a CPU generator reproduces across
    devices)."""
    if generator is None:
        eps = torch.randn(mu.shape, device=mu.device, dtype=torch.float32)
    else:
        eps = torch.randn(mu.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return mu + torch.exp(0.5 * logvar) * eps.to(device=mu.device, dtype=mu.dtype)


class CrossFlow(nn.Module):
    """The whole trainable model of one pairing (`config.source` -> `config.target`):

      * `text_ve` (text source, or text target: the text autoencoder's encoder), `image_ve` (image source);
      * `flow`, the shared flow transformer on the target latent (image latent or text latent);
      * `image_encoder`: the contrastive encoder of the target latent (its name is text-to-image's, kept for the
        shipped weights), and `logit_scale`;
      * `text_decoder` (text target).

    Calling it (`forward`, alias `loss`) computes the training loss; sampling uses `encode_source` (`encode_text`,
    `encode_image`), `velocity`, and for a text target `decode_text`. `logit_scale` starts at log(1/0.07) and is used
    raw (not exponentiated), as the official code uses open_clip's.
    """

    def __init__(self, cfg: CrossFlowConfig):
        super().__init__()
        if not isinstance(cfg, CrossFlowConfig):
            raise ValueError(f"CrossFlow expects a CrossFlowConfig, got {type(cfg).__name__}")
        self.config = cfg
        # Construction order = draw order of the random init: text-to-image's is text_ve, flow, image_encoder.
        if cfg.uses_text_ve:
            self.text_ve = TextVE(cfg)
        if cfg.source == "image":
            self.image_ve = ImageVE(cfg)
        self.flow = build_flow(cfg)
        self.image_encoder = build_image_encoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if cfg.target == "text":
            self.text_decoder = TextDecoder(cfg)

    @classmethod
    def empty(cls, cfg: CrossFlowConfig) -> "CrossFlow":
        """A CPU model with UNINITIALISED parameters (skips the random init, which is slow at 1B parameters) and
        correct buffers: for loaders that overwrite every parameter next."""
        with skip_random_init():
            return cls(cfg)

    def encode_text(
        self, emb: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text embeddings (B, L, Dt) + mask (B, L) -> (z0 (B, C, H, W), mu, logvar (B, latent_numel)).

        z0 = mu + exp(logvar / 2) * eps is the reparameterised sample; eps is the only randomness of sampling, drawn
        in fp32 on `generator`'s device (so a CPU generator reproduces across devices). Text source only.
        """
        if self.config.source != "text":
            raise ValueError(f"encode_text: this model's source is {self.config.source!r}, not text")
        mu, logvar = self.text_ve(emb, mask)  # (B, N) each
        z0 = reparameterize(mu, logvar, generator)
        return z0.view(mu.shape[0], *self.config.latent_shape), mu, logvar

    def encode_image(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Source images (B, Cs, Hs, Ws) in [-1, 1] -> (z0 (B, C, H, W), mu, logvar (B, latent_numel)), as
        `encode_text`. Image source only."""
        if self.config.source != "image":
            raise ValueError(f"encode_image: this model's source is {self.config.source!r}, not image")
        mu, logvar = self.image_ve(images)
        z0 = reparameterize(mu, logvar, generator)
        return z0.view(mu.shape[0], *self.config.latent_shape), mu, logvar

    def encode_source(
        self, source: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`encode_text(source, mask, generator)` or `encode_image(source, generator)`, by `config.source`."""
        if self.config.source == "text":
            return self.encode_text(source, mask, generator)
        return self.encode_image(source, generator)

    def encode_caption(self, emb: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text target: caption token embeddings -> the text latent (the Text VE's mu) (B, C, H, W), the flow's
        target in training and the start of text variation."""
        if self.config.target != "text":
            raise ValueError(f"encode_caption: this model's target is {self.config.target!r}, not text")
        mu, _ = self.text_ve(emb, mask)
        return mu.view(mu.shape[0], *self.config.latent_shape)

    def decode_text(self, z1: torch.Tensor) -> list[str]:
        """Text target: text latents (B, C, H, W) -> one text each (`TextDecoder.decode`)."""
        if self.config.target != "text":
            raise ValueError(f"decode_text: this model's target is {self.config.target!r}, not text")
        return self.text_decoder.decode(z1)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, indicator: torch.Tensor) -> torch.Tensor:
        """v(x, t, indicator) of the flow network (the finest level for DiMR); see `FlowTransformer.forward`."""
        return self.flow(x, t, indicator)

    def forward(
        self, emb: torch.Tensor | None, mask: torch.Tensor | None, z1: torch.Tensor | None,
        generator: torch.Generator | None = None, images: torch.Tensor | None = None, *,
        source: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one batch (the design notes outside this repository, reference/crossflow.md §8): FM-MSE
        + CLIP(z0, image features) + kl_weight * KL, all trained jointly (the FM gradient reaches the Text VE through
        z0). `forward` so that DDP, which wraps the model itself, sees one call that touches every parameter; sampling
        uses `encode_text` and `velocity`.

        emb (B, L, D) text embeddings, mask (B, L) bool; z1 (B, C, H, W) image latents; images: the pixel images of
        the targets, (B, C', H', W') in [-1, 1], needed by a pretrained (pixel) image encoder; by default the image
        encoder sees z1 (the same thing in pixel space). Draw order from `generator` (fixed, so a resumed run replays
        it): VE noise, indicator dropout, t.

        Other pairings: an image source takes its images as `source` (B, Cs, Hs, Ws) in [-1, 1] (emb/mask then
        belong to the target, if text). A text target takes the caption's token embeddings as emb/mask and its word
        ids as `tokens` (B, max_words); z1 is then None: the target is the Text VE's mu of the caption (detached:
        the flow chases the autoencoder's latent, it does not move it), the decoder learns to read a *sample* of the
        caption's posterior (cross-entropy `rec`, weight rec_weight), and the caption posterior's KL (`kl_text`) is
        weighted as the source's. Draw order: source VE noise, caption VE noise, indicator dropout, t.
        Returns (total loss, detached components {"fm", "clip", "kl", "logit_scale", "null_frac"}, plus "rec" and
        "kl_text" for a text target).
        """
        cfg = self.config
        if images is None and cfg.image_encoder != "conv" and cfg.autoencoder != "identity":
            raise ValueError(f"image encoder {cfg.image_encoder!r} needs pixel images: the training data must yield "
                             "'image' (B, C, H, W) in [-1, 1] beside 'latent'")
        if cfg.source == "image":
            if source is None:
                raise ValueError("an image-source model needs the source images: forward(..., source=images)")
            z0, mu, logvar = self.encode_image(source, generator=generator)  # (B, C, H, W); not detached
        else:
            z0, mu, logvar = self.encode_text(emb, mask, generator=generator)  # (B, C, H, W); not detached
        extra: dict[str, torch.Tensor] = {}
        if cfg.target == "text":
            if emb is None or tokens is None:
                raise ValueError("a text-target model needs the caption: forward(emb, mask, None, ..., tokens=ids)")
            t_mu, t_logvar = self.text_ve(emb, mask)  # (B, N) each: the text autoencoder's encoder
            logits = self.text_decoder(reparameterize(t_mu, t_logvar, generator), tokens)  # (B, W, V), teacher-forced
            extra["rec"] = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
            extra["kl_text"] = fm.kl_loss(t_mu, t_logvar, cfg.kl_kind)
            z1 = t_mu.detach().view(t_mu.shape[0], *cfg.latent_shape)
            images = None  # the contrastive encoder reads the text latent
        elif z1 is None:
            raise ValueError("an image-target model needs the target latents z1")
        z0 = z0.reshape(z1.shape)
        img_feat = self.image_encoder(z1 if images is None else images)  # (B, C*H*W), true targets before the roll
        l_clip = fm.contrastive_loss(z0, img_feat, self.logit_scale)
        l_kl = fm.kl_loss(mu, logvar, cfg.kl_kind)

        indicator, target_z1 = fm.indicator_dropout(z1, cfg.cfg_dropout, generator)
        t = fm.sample_t(z1.shape[0], generator, device=z1.device)
        zt = fm.interpolate(z0, target_z1, t, cfg.sigma_min)
        target = fm.velocity_target(z0, target_z1, cfg.sigma_min)
        if cfg.backbone == "dimr" and cfg.dimr.loss_coeffs:  # one prediction per resolution, weighted multi-scale MSE
            preds = self.flow(zt, t, indicator, return_all=True)  # coarse to fine
            l_fm = multiscale_flow_loss(preds, target, cfg.dimr.loss_coeffs).mean()
        else:
            l_fm = fm.flow_matching_loss(self.flow(zt, t, indicator), target)  # pred (B, C, H, W)

        loss = l_fm + l_clip + cfg.kl_weight * l_kl
        if extra:
            loss = loss + cfg.kl_weight * extra["kl_text"] + cfg.rec_weight * extra["rec"]
        parts = {"fm": l_fm.detach(), "clip": l_clip.detach(), "kl": l_kl.detach(),
                 "logit_scale": self.logit_scale.detach().float().reshape(()), "null_frac": indicator.float().mean(),
                 **{k: v.detach() for k, v in extra.items()}}
        return loss, parts

    def loss(self, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss: `self(...)`, named for readers (a DDP-wrapped model must be called, not `.loss`-ed)."""
        return self(*args, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike, sampling: dict[str, Any] | None = None,
                        preset: str | None = None) -> None:
        """Write `model.safetensors`, `config.json` (with the task and `preset`), `sampling.json` (the recommended
        sampler settings, when given) and their `checksums.sha256` atomically (`crossflow.checkpoint.save_pretrained`).
        """
        save_pretrained(self, directory, sampling, preset)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "CrossFlow":
        """Load a `save_pretrained` directory in the checkpoint's dtype, verifying checksums, config and keys.

        Raises FileNotFoundError for a missing directory or file, ValueError for a corrupted/truncated/edited file
        (named), an invalid config, or missing/unexpected/misshapen keys (listed).
        """
        cfg, tensors, weights = read_pretrained(directory)
        model = cls.empty(cfg)  # no random init: the strict load below overwrites every parameter
        load_state_dict_strict(model, tensors, str(weights))
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(dtypes) == 1:  # keep a half-precision checkpoint in its dtype (construction made the model fp32)
            model = model.to(dtype=dtypes.pop())
        return model.to(map_location)


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> CrossFlow:
    """`CrossFlow.from_pretrained(directory, map_location)`."""
    return CrossFlow.from_pretrained(directory, map_location)
