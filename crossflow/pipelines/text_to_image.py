"""Text -> image in one call, in the style of a diffusers pipeline.

    pipe = CrossFlowPipeline.from_pretrained("path/to/model")          # text encoder + autoencoder named by the config
    images = pipe(["a handwritten seven", "a zero"], num_images_per_prompt=2, seed=0)   # list of PIL images

prompts -> frozen text encoder (token embeddings + mask) -> Text VE sample z0 (the only randomness: the generator /
seed; or z0 given, `pipe(z0=latents)`) -> sampler (FastSampler: Euler + indicator CFG, CUDA-graph captured on a GPU)
-> z1 -> autoencoder decode -> images in [-1, 1] -> output.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from crossflow.pipelines.base import Pipeline, cached, check_count, check_output_type, make_generator


class CrossFlowPipeline(Pipeline):
    """Prompts to images with a CrossFlow model.

    text_encoder: callable `prompts -> (emb (B, L, Dt), mask (B, L) bool)` (`encoders.text_encoder.TextEncoder`);
    model: a `CrossFlow`; autoencoder: `decode(latents (B, C, H, W)) -> images (B, C', H', W') in [-1, 1]`;
    sampler: `sampler(model.flow, z0, steps=..., guidance_scale=...) -> z1` (and `callback=` for a progress bar),
    default `FastSampler()` (50 steps, s = 7): CUDA-graph captured on a GPU, the same ops eagerly (exactly
    `EulerSampler`) elsewhere; `from_pretrained` builds it with the checkpoint's `sampling.json`. `pipe.sampling`: the
    settings in effect.
    """

    tasks, pairing = ("text-to-image",), "a text -> image"

    def __init__(self, text_encoder: Any, model: torch.nn.Module, autoencoder: Any, sampler: Any | None = None) -> None:
        super().__init__(model, sampler)
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder

    @classmethod
    def _from_model(cls, model: torch.nn.Module, sampler: Any, settings: dict[str, Any]) -> "CrossFlowPipeline":
        from crossflow.encoders.autoencoder import build_autoencoder
        from crossflow.encoders.text_encoder import TextEncoder

        return cls(TextEncoder.from_config(model.config), model, build_autoencoder(model.config), sampler)

    # ----- stages -----

    @staticmethod
    def _prompts(prompts: str | Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty string or list of strings, got {prompts!r:.200}")
        blank = [i for i, p in enumerate(prompts) if not p.strip()]
        if blank:  # the model has no "empty prompt" to draw: CrossFlow's unconditional branch is the indicator
            raise ValueError(
                f"prompts must not be empty or whitespace only (prompt {blank[0]} is {prompts[blank[0]]!r})")
        return prompts

    @torch.no_grad()
    def encode_prompts(
        self, prompts: str | Sequence[str], num_images_per_prompt: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Prompts -> z0 (B * num_images_per_prompt, C, H, W), images of one prompt adjacent; the Text VE's
        reparameterisation noise is drawn from `generator` (this is where a seed acts)."""
        prompts = self._prompts(prompts)
        check_count(num_images_per_prompt, "num_images_per_prompt")
        emb, mask = self.text_encoder(prompts)  # (P, L, Dt), (P, L)
        device = self.device
        emb = emb.to(device=device, dtype=self.dtype).repeat_interleave(num_images_per_prompt, dim=0)
        mask = mask.to(device=device, dtype=torch.bool).repeat_interleave(num_images_per_prompt, dim=0)
        z0, _, _ = self.model.encode_text(emb, mask, generator=generator)
        return z0

    # ----- the call -----

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        *,
        z0: torch.Tensor | None = None,
        progress: bool = False,
    ) -> list | torch.Tensor:
        """Generate images for `prompts`, or from given text latents `z0`.

        z0 (B, C, H, W): start latents instead of prompts (e.g. `encode_prompts` outputs, interpolated or combined);
        give prompts or z0, not both. steps / guidance_scale: None = the sampler's own (default: 50 steps, scale 7).
        seed or generator (not both, prompts only): the Text VE noise; seed builds a CPU generator, so results match
        across devices. output_type: "pil" -> list of PIL images ("L" for 1 channel, "RGB" for 3); "pt" ->
        (B, C', H', W') float in [0, 1]; "latent" -> z1 (B, C, H, W). progress: one tqdm bar over the sampling steps
        on stderr (shown only when stderr is a terminal).
        """
        check_output_type(output_type)
        if (prompts is None) == (z0 is None):
            raise ValueError("pass either prompts or z0 (start latents), not both or neither")
        generator = make_generator(seed, generator)
        if z0 is not None and (generator is not None or num_images_per_prompt != 1):
            raise ValueError("seed, generator and num_images_per_prompt act on the Text VE noise; with z0 there is "
                             "none (draw it with encode_prompts)")
        was_training = self.model.training
        self.model.eval()
        try:
            if z0 is None:
                z0 = self.encode_prompts(prompts, num_images_per_prompt, generator)
            else:
                z0 = z0.to(device=self.device, dtype=self.dtype)
            z1 = self._sample(z0, steps, guidance_scale, progress)
        finally:
            self.model.train(was_training)
        return self._output(z1, output_type)


def sample(
    prompts: str | Sequence[str], checkpoint: str | os.PathLike | None = None, *, num_images_per_prompt: int = 1,
    steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
    device: str | torch.device | None = None, output_type: str = "pil",
) -> list | torch.Tensor:
    """Prompts to images in one call: loads `checkpoint` (default: the shipped digits model) once per
    (checkpoint, device) (`base.cached`), then runs the pipeline with FastSampler. Defaults come from the checkpoint's
    `sampling.json` when present (e.g. the digits model's guidance scale), else 50 steps and scale 7."""
    pipe = cached(CrossFlowPipeline, checkpoint, device, "digits")
    return pipe(prompts, num_images_per_prompt=num_images_per_prompt, steps=steps, guidance_scale=guidance_scale,
                seed=seed, output_type=output_type)
