"""The tasks beyond text-to-image, on the one CrossFlow model (a pairing, `CrossFlowConfig.source` / `.target`) and the
shared samplers and kernels:

    caption(images)            image -> text     (preset digits-caption: image VE -> flow -> text latent -> decoder)
    vary_text("a handwritten seven", n=4)        text -> text through the captioning model's text autoencoder
    vary_image(images, n=4)    image -> image    (preset digits-vary: image VE -> flow -> image; `image.ImagePipeline`)

Images are tensors (B, C, H, W) in [-1, 1] (`image_io.load_images` reads files: grey, resized to the model's source
size, ink bright on a dark ground as the digits model draws them).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch

from crossflow.checkpoint import SCALE_KEYS
from crossflow.models.model import reparameterize
from crossflow.pipelines.base import Pipeline, cached, check_count, make_generator, split
from crossflow.vocab import tokenize

NOISE_KEY, VARIATION_KEY = SCALE_KEYS  # the keys of a checkpoint's sampling.json read here beyond the sampler's
REDRAWS = 3


class CaptionPipeline(Pipeline):
    """Images to captions with an image -> text CrossFlow: image VE sample z0 (the seed's only randomness) ->
    sampler -> text latent z1 -> text decoder. `pipe(images, num_captions_per_image=K, seed=S)` -> texts, an image's
    K captions adjacent."""

    tasks, pairing = ("image-to-text",), "an image -> text"

    def __init__(self, model: torch.nn.Module, sampler: Any | None = None, text_encoder: Any | None = None,
                 variation_strength: float = 1.0, noise_scale: float = 1.0) -> None:
        super().__init__(model, sampler)
        self._text_encoder, self.variation_strength = text_encoder, float(variation_strength)
        if not isinstance(noise_scale, (int, float)) or not 0 <= noise_scale < float("inf"):
            raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale!r}")
        self.noise_scale = float(noise_scale)  # the image VE's posterior std is scaled by this when sampling

    @classmethod
    def _from_model(cls, model: torch.nn.Module, sampler: Any, settings: dict[str, Any]) -> "CaptionPipeline":
        return cls(model, sampler, variation_strength=settings.get(VARIATION_KEY, 1.0),
                   noise_scale=settings.get(NOISE_KEY, 1.0))

    @property
    def sampling(self) -> dict[str, Any]:
        """The settings a call uses when it passes none: the sampler's, the source noise scale, the variation
        strength (the keys of `sampling.json`)."""
        return {**super().sampling, NOISE_KEY: self.noise_scale, VARIATION_KEY: self.variation_strength}

    @property
    def text_encoder(self):
        """The frozen text encoder the config names (text variation only; loaded on first use)."""
        if self._text_encoder is None:
            from crossflow.encoders.text_encoder import TextEncoder

            self._text_encoder = TextEncoder.from_config(self.model.config)
        return self._text_encoder

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, num_captions_per_image: int = 1, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None) -> list[str]:
        shape = self.model.config.source_shape
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"caption: expected images (B, {', '.join(map(str, shape))}) in [-1, 1], got {got}")
        generator = make_generator(seed, generator)
        n = check_count(num_captions_per_image, "num_captions_per_image")
        x = images.to(device=self.device, dtype=self.dtype).repeat_interleave(n, dim=0)
        mu, logvar = self.model.image_ve(x)
        # z0 = mu + noise_scale * sigma * eps: a temperature on the source posterior (1 = as trained), trading the
        # wording's variety for the digit's reliability
        z0 = reparameterize(mu, logvar + 2 * math.log(max(self.noise_scale, 1e-30)), generator)
        z0 = z0.view(x.shape[0], *self.model.config.latent_shape)
        return self.model.decode_text(self._sample(z0, steps, guidance_scale))

    @torch.no_grad()
    def vary_text(self, texts: str | Sequence[str], num_variations: int = 1, steps: int | None = None,
                  strength: float | None = None, seed: int | None = None,
                  generator: torch.Generator | None = None) -> list[str]:
        """Texts -> `num_variations` rewordings each (a text's adjacent), through the text autoencoder and the flow:
        caption latent z1 (Text VE mu) -> the flow run backwards (t = 1 -> 0, cond branch) to z0, the source-side
        point that would caption as this text -> z0 + strength * eps (eps the seed's noise; image latents carry the
        digit, not the wording, so a nudge there redraws the wording) -> the flow forwards -> the decoder. An output
        with the input's own wording is drawn again with new noise, up to REDRAWS times."""
        from crossflow.sampling import invert

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"texts must be a non-empty string or list of non-empty strings, got {texts!r:.200}")
        generator = make_generator(seed, generator)
        n = check_count(num_variations, "num_variations")
        strength = self.variation_strength if strength is None else float(strength)
        steps = self.resolve(steps)["steps"]
        emb, mask = self.text_encoder(texts)
        z1 = self.model.encode_caption(emb.to(device=self.device, dtype=self.dtype), mask.to(self.device))
        z0 = invert(self.model.flow, z1, steps=steps).repeat_interleave(n, dim=0)
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        same = [" ".join(tokenize(t)) for t in texts for _ in range(n)]
        out: list[str | None] = [None] * len(same)
        todo = list(range(len(same)))
        for attempt in range(1 + REDRAWS):  # a draw that repeats the input's wording is drawn again
            eps = torch.randn(z0.shape, generator=generator, device=gen_dev, dtype=torch.float32)
            z = z0[todo] + strength * eps[todo].to(device=z0.device, dtype=z0.dtype)
            for i, text in zip(todo, self.model.decode_text(self._sample(z, steps))):
                out[i] = text
            todo = [i for i in todo if " ".join(tokenize(out[i])) == same[i]]
            if not todo:
                break
        return out


def caption(images: torch.Tensor, checkpoint: str | os.PathLike | None = None, *, n: int = 1, seed: int | None = 0,
            steps: int | None = None, guidance_scale: float | None = None,
            device: str | torch.device | None = None) -> list[list[str]]:
    """Images (B, C, H, W) in [-1, 1] -> B lists of n captions (default checkpoint: the shipped digits-caption)."""
    pipe = cached(CaptionPipeline, checkpoint, device, "digits-caption")
    return split(pipe(images, n, steps=steps, guidance_scale=guidance_scale, seed=seed), n)


def vary_text(texts: str | Sequence[str], checkpoint: str | os.PathLike | None = None, *, n: int = 1,
              seed: int | None = 0, steps: int | None = None, strength: float | None = None,
              device: str | torch.device | None = None) -> list[list[str]]:
    """Texts -> one list of n rewordings per text (`CaptionPipeline.vary_text`; default: the shipped
    digits-caption model)."""
    pipe = cached(CaptionPipeline, checkpoint, device, "digits-caption")
    return split(pipe.vary_text(texts, n, steps=steps, strength=strength, seed=seed), n)
