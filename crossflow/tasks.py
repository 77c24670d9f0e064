"""The tasks beyond text-to-image, on the one CrossFlow model (a pairing, `CrossFlowConfig.source` / `.target`) and the
shared samplers and kernels:

    caption(images)            image -> text     (preset digits-caption: image VE -> flow -> text latent -> decoder)
    vary_text("a handwritten seven", n=4)        text -> text through the captioning model's text autoencoder
    vary_image(images, n=4)    image -> image    (preset digits-vary: image VE -> flow -> image; `img2img`)

Images are tensors (B, C, H, W) in [-1, 1] (`load_images` reads files: grey, resized to the model's source size, ink
bright on a dark ground as the digits model draws them).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from crossflow.fast_sampler import FastSampler
from crossflow.model import reparameterize

# Extra keys of a checkpoint's sampling.json read here (sampling_defaults keeps the sampler's own).
VARIATION_KEY = "text_variation_strength"
NOISE_KEY = "source_noise_scale"
REDRAWS = 3


def default_checkpoint(preset: str) -> str:
    """The shipped weights of a task preset: crossflow/weights/<preset>."""
    return str(Path(__file__).resolve().parent / "weights" / preset)


def load_images(paths: Sequence[Any], channels: int, size: int) -> torch.Tensor:
    """Image files (or PIL images) -> (N, channels, size, size) float32 in [-1, 1] (bilinear resize). One channel:
    files are read as `img2img.to_grey` reads them (16-bit scaled, ink in the alpha channel, a light ground inverted),
    PIL images as `convert("L")`; three: RGB. OSError/ValueError name the file that cannot be read."""
    import numpy as np
    from PIL import Image

    from crossflow.img2img import open_image, to_grey

    out = []
    for p in paths:
        im = p if isinstance(p, Image.Image) else open_image(p)
        if channels == 1 and not isinstance(p, Image.Image):
            im = to_grey(im)[0]
        im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).view(size, size, channels)
        out.append(t.permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


class CaptionPipeline:
    """Images to captions with an image -> text CrossFlow: image VE sample z0 (the seed's only randomness) ->
    sampler -> text latent z1 -> text decoder. `pipe(images, num_captions_per_image=K, seed=S)` -> texts, an image's
    K captions adjacent."""

    def __init__(self, model: torch.nn.Module, sampler: Any | None = None, text_encoder: Any | None = None,
                 variation_strength: float = 1.0, noise_scale: float = 1.0) -> None:
        cfg = model.config
        if cfg.source != "image" or cfg.target != "text":
            raise ValueError(f"CaptionPipeline needs an image -> text model, got {cfg.source} -> {cfg.target}")
        self.model, self.sampler = model, sampler if sampler is not None else FastSampler()
        self._text_encoder, self.variation_strength = text_encoder, float(variation_strength)
        if not isinstance(noise_scale, (int, float)) or not 0 <= noise_scale < float("inf"):
            raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale!r}")
        self.noise_scale = float(noise_scale)  # the image VE's posterior std is scaled by this when sampling

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str | None = None,
                        sampler: Any | None = None) -> "CaptionPipeline":
        """Load a `save_pretrained` directory with its recommended settings (`sampling.json`: the sampler's unless
        `sampler` is given, the noise scale and variation strength); another task's checkpoint is refused before
        anything loads."""
        from crossflow.config import check_task
        from crossflow.model import CrossFlow
        from crossflow.pipeline import SAMPLER_KEYS, sampling_settings

        check_task(directory, ("image-to-text",), "CaptionPipeline")
        settings = sampling_settings(directory)
        if sampler is None:
            sampler = FastSampler(**{k: v for k, v in settings.items() if k in SAMPLER_KEYS})
        model = CrossFlow.from_pretrained(directory).eval()
        if device is not None:
            model.to(device)
        return cls(model, sampler, variation_strength=settings.get(VARIATION_KEY, 1.0),
                   noise_scale=settings.get(NOISE_KEY, 1.0))

    @property
    def sampling(self) -> dict[str, Any]:
        """The settings a call uses when it passes none: the sampler's, the source noise scale, the variation
        strength (the keys of `sampling.json`)."""
        from crossflow.pipeline import sampler_settings

        return {**sampler_settings(self.sampler), NOISE_KEY: self.noise_scale, VARIATION_KEY: self.variation_strength}

    @property
    def text_encoder(self):
        """The frozen text encoder the config names (text variation only; loaded on first use)."""
        if self._text_encoder is None:
            from crossflow.text_encoder import TextEncoder

            self._text_encoder = TextEncoder.from_config(self.model.config)
        return self._text_encoder

    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    @staticmethod
    def _count(n: Any) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of outputs per input must be an int >= 1, got {n!r}")
        return n

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, num_captions_per_image: int = 1, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None) -> list[str]:
        shape = self.model.config.source_shape
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"caption: expected images (B, {', '.join(map(str, shape))}) in [-1, 1], got {got}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        n = self._count(num_captions_per_image)
        generator = torch.Generator().manual_seed(seed) if seed is not None else generator
        p = self._param()
        x = images.to(device=p.device, dtype=p.dtype).repeat_interleave(n, dim=0)
        mu, logvar = self.model.image_ve(x)
        # z0 = mu + noise_scale * sigma * eps: a temperature on the source posterior (1 = as trained), trading the
        # wording's variety for the digit's reliability
        z0 = reparameterize(mu, logvar + 2 * math.log(max(self.noise_scale, 1e-30)), generator)
        z0 = z0.view(x.shape[0], *self.model.config.latent_shape)
        z1 = self.sampler(self.model, z0, steps=steps, guidance_scale=guidance_scale)
        return self.model.decode_text(z1)

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
        from crossflow.text_decoder import tokenize

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"texts must be a non-empty string or list of non-empty strings, got {texts!r:.200}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        n = self._count(num_variations)
        strength = self.variation_strength if strength is None else float(strength)
        generator = torch.Generator().manual_seed(seed) if seed is not None else generator
        p = self._param()
        emb, mask = self.text_encoder(texts)
        z1 = self.model.encode_caption(emb.to(device=p.device, dtype=p.dtype), mask.to(p.device))
        z0 = invert(self.model, z1, steps=steps or self.sampler.steps).repeat_interleave(n, dim=0)
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        same = [" ".join(tokenize(t)) for t in texts for _ in range(n)]
        out: list[str | None] = [None] * len(same)
        todo = list(range(len(same)))
        for attempt in range(1 + REDRAWS):  # a draw that repeats the input's wording is drawn again
            eps = torch.randn(z0.shape, generator=generator, device=gen_dev, dtype=torch.float32)
            z = z0[todo] + strength * eps[todo].to(device=z0.device, dtype=z0.dtype)
            for i, text in zip(todo, self.model.decode_text(self.sampler(self.model, z, steps=steps))):
                out[i] = text
            todo = [i for i in todo if " ".join(tokenize(out[i])) == same[i]]
            if not todo:
                break
        return out


_PIPES: dict[tuple[str, str], CaptionPipeline] = {}


def _pipe(checkpoint: str | os.PathLike | None, device: str | torch.device | None) -> CaptionPipeline:
    path = str(checkpoint if checkpoint is not None else default_checkpoint("digits-caption"))
    dev = str(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    key = (os.path.abspath(path), dev)
    if key not in _PIPES:
        _PIPES[key] = CaptionPipeline.from_pretrained(path, device=dev)
    return _PIPES[key]


def caption(images: torch.Tensor, checkpoint: str | os.PathLike | None = None, *, n: int = 1, seed: int | None = 0,
            steps: int | None = None, guidance_scale: float | None = None,
            device: str | torch.device | None = None) -> list[list[str]]:
    """Images (B, C, H, W) in [-1, 1] -> B lists of n captions (default checkpoint: the shipped digits-caption)."""
    out = _pipe(checkpoint, device)(images, n, steps=steps, guidance_scale=guidance_scale, seed=seed)
    return [out[i * n : (i + 1) * n] for i in range(images.shape[0])]


def vary_text(texts: str | Sequence[str], checkpoint: str | os.PathLike | None = None, *, n: int = 1,
              seed: int | None = 0, steps: int | None = None, strength: float | None = None,
              device: str | torch.device | None = None) -> list[list[str]]:
    """Texts -> one list of n rewordings per text (`CaptionPipeline.vary_text`; default: the shipped
    digits-caption model)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = _pipe(checkpoint, device).vary_text(texts, n, steps=steps, strength=strength, seed=seed)
    return [out[i * n : (i + 1) * n] for i in range(len(texts))]


_IMAGE_PIPES: dict[tuple[str, str], Any] = {}


def vary_image(images: torch.Tensor | Sequence[str | os.PathLike], checkpoint: str | os.PathLike | None = None, *,
               n: int = 1, seed: int | None = 0, steps: int | None = None, guidance_scale: float | None = None,
               device: str | torch.device | None = None) -> torch.Tensor:
    """Images (B, 1, H, W) in [-1, 1] of any size, or B image files -> (B * n, 1, 8, 8) variations in [-1, 1], an
    image's n adjacent (`img2img.ImagePipeline`, which area-averages or resizes to 8x8; default checkpoint: the shipped
    digits-vary)."""
    from crossflow.img2img import ImagePipeline, read_images

    path = str(checkpoint if checkpoint is not None else default_checkpoint("digits-vary"))
    dev = str(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    key = (os.path.abspath(path), dev)
    if key not in _IMAGE_PIPES:
        _IMAGE_PIPES[key] = ImagePipeline.from_pretrained(path, device=dev, tasks=("image-variation",))
    if not isinstance(images, torch.Tensor):
        images = read_images(images)
    return _IMAGE_PIPES[key](images, num_images_per_image=n, steps=steps, guidance_scale=guidance_scale, seed=seed)
