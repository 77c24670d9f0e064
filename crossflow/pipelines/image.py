"""Image -> image: super-resolution (the shipped digits-sr: 4x4 -> 8x8) and image variation (digits-vary: a digit ->
the same digit in another hand), on the one CrossFlow model with an image source and an image target. The data and
the judges of these presets are the digits wing's (`crossflow.digits`)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from crossflow.pipelines.base import Pipeline, cached, check_count, check_output_type, make_generator
from crossflow.pipelines.image_io import check_images, from_pil, open_image, resize

IMAGE_TASKS = ("super-resolution", "image-variation")  # `config.TASKS` of an image -> image model


class ImagePipeline(Pipeline):
    """Images -> images with an image-source, image-target CrossFlow: super-resolution (`digits-sr`) and image
    variation (`digits-vary`).

    images (B, 1, H, W) in [-1, 1], or PIL images -> resized to the source size (`resize`) -> image VE sample z0 (the
    only randomness: `seed` / `generator`) -> sampler (Euler + indicator CFG, `FastSampler` by default) -> z1 ->
    autoencoder decode. A PIL input is read as a grey image with white ink on black (the digits' convention: 0 is
    the background) unless `invert=True`.
    """

    tasks, pairing = IMAGE_TASKS, "an image -> image"

    def __init__(self, model: torch.nn.Module, autoencoder: Any, sampler: Any | None = None) -> None:
        super().__init__(model, sampler)
        self.autoencoder = autoencoder

    @classmethod
    def _from_model(cls, model: torch.nn.Module, sampler: Any, settings: dict[str, Any]) -> "ImagePipeline":
        from crossflow.encoders.autoencoder import build_autoencoder

        return cls(model, build_autoencoder(model.config), sampler)

    def _sources(self, images: Any, invert: bool) -> torch.Tensor:
        size = self.model.config.source_size
        if isinstance(images, torch.Tensor):
            x = resize(check_images(images, "ImagePipeline"), size)
        else:
            if not isinstance(images, (list, tuple)) or not images:
                raise ValueError("images must be a (B, 1, H, W) tensor in [-1, 1] or a non-empty list of PIL images")
            x = torch.cat([resize(t, size) for t in from_pil(images)])
        return -x if invert else x

    def _z1(self, images: Any, n: int, steps: int | None, guidance_scale: float | None, seed: int | None,
            generator: torch.Generator | None, invert: bool, progress: bool) -> torch.Tensor:
        check_count(n, "num_images_per_image")
        generator = make_generator(seed, generator)
        x = self._sources(images, invert).to(self.device, self.dtype).repeat_interleave(n, dim=0)
        z0, _, _ = self.model.encode_image(x, generator=generator)
        return self._sample(z0, steps, guidance_scale, progress)

    @torch.no_grad()
    def __call__(self, images: Any, num_images_per_image: int = 1, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", invert: bool = False,
                 progress: bool = False) -> Any:
        """B images -> B * num_images_per_image outputs (an input's outputs adjacent), as `output_type` says
        (`base`: "pil", "pt" in [0, 1], "latent"). steps / guidance_scale: None = the sampler's."""
        check_output_type(output_type)
        z1 = self._z1(images, num_images_per_image, steps, guidance_scale, seed, generator, invert, progress)
        return self._output(z1, output_type)

    @torch.no_grad()
    def images(self, images: Any, num_images_per_image: int = 1, seed: int | None = None, **kw: Any) -> torch.Tensor:
        """As `__call__`, returning the images (B', 1, H, W) in [-1, 1] on the CPU, float32 (what the judges read)."""
        z1 = self._z1(images, num_images_per_image, kw.pop("steps", None), kw.pop("guidance_scale", None), seed,
                      kw.pop("generator", None), kw.pop("invert", False), kw.pop("progress", False))
        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        return self.decode_latents(z1).cpu()

    def upscale(self, low: torch.Tensor, **kw) -> torch.Tensor:
        """`evaluate_upscale`'s callable: (B, 1, 4, 4) -> (B, 1, 8, 8) in [-1, 1], seed 0 unless given."""
        return self.images(low, seed=kw.pop("seed", 0), **kw)

    def posterior_mean(self, images: Any, n: int, seed: int | None = 0, **kw: Any) -> torch.Tensor:
        """The mean of `n` samples per input, (B, 1, H, W) in [-1, 1] on the CPU: an estimate of the posterior mean
        E[target | input] (super-resolution's best guess under squared error; one sample is a plausible image, their
        mean the least-squares one). Same arguments as `images`."""
        check_count(n, "n")
        out = self.images(images, num_images_per_image=n, seed=seed, **kw)
        return out.view(len(out) // n, n, *out.shape[1:]).mean(1)

    def vary(self, images: torch.Tensor, n: int, seed: int = 0, **kw) -> torch.Tensor:
        """`evaluate_variation`'s callable: (B, 1, 8, 8) -> (B * n, 1, 8, 8) in [-1, 1]."""
        return self.images(images, num_images_per_image=n, seed=seed, **kw)


def vary_image(images: torch.Tensor | Sequence[str | os.PathLike], checkpoint: str | os.PathLike | None = None, *,
               n: int = 1, seed: int | None = 0, steps: int | None = None, guidance_scale: float | None = None,
               device: str | torch.device | None = None) -> torch.Tensor:
    """Images (B, 1, H, W) in [-1, 1] of any size, or B image files -> (B * n, 1, 8, 8) variations in [-1, 1], an
    image's n adjacent (`ImagePipeline.images`, which area-averages or resizes to 8x8; default checkpoint: the shipped
    digits-vary)."""
    pipe = cached(ImagePipeline, checkpoint, device, "digits-vary", tasks=("image-variation",))
    if not isinstance(images, torch.Tensor):
        images = [open_image(p) for p in images]
    return pipe.images(images, num_images_per_image=n, steps=steps, guidance_scale=guidance_scale, seed=seed)
