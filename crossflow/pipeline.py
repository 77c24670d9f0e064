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

from crossflow.fast_sampler import FastSampler

OUTPUT_TYPES = ("pil", "pt", "latent")


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_pil(images: torch.Tensor) -> list:
    """(B, C, H, W) images in [-1, 1] -> PIL images: 1 channel -> mode "L", 3 channels -> "RGB"."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"to_pil: expected (B, 1 | 3, H, W) images, got {tuple(images.shape)}")
    u8 = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    u8 = u8.permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    if images.shape[1] == 1:
        u8 = u8[..., 0]  # (B, H, W): uint8 2-D arrays become mode "L", (H, W, 3) ones "RGB"
    return [Image.fromarray(a) for a in u8]


class CrossFlowPipeline:
    """Prompts to images with a CrossFlow model.

    text_encoder: callable `prompts -> (emb (B, L, Dt), mask (B, L) bool)` (`crossflow.text_encoder.TextEncoder`);
    model: a `CrossFlow`; autoencoder: `decode(latents (B, C, H, W)) -> images (B, C', H', W') in [-1, 1]`;
    sampler: `sampler(model, z0, steps=..., guidance_scale=...) -> z1` (and `callback=` for a progress bar), default
    `FastSampler()` (50 steps, s = 7): CUDA-graph captured on a GPU, the same ops eagerly (exactly `EulerSampler`)
    elsewhere; `from_pretrained` builds it with the checkpoint's `sampling.json`. `pipe.sampling`: the settings in
    effect.
    """

    def __init__(self, text_encoder: Any, model: torch.nn.Module, autoencoder: Any, sampler: Any | None = None) -> None:
        cfg = getattr(model, "config", None)
        if cfg is not None and cfg.task != "text-to-image":
            raise ValueError(f"CrossFlowPipeline needs a text -> image model, got {cfg.source} -> {cfg.target} "
                             f"({cfg.task})")
        self.text_encoder = text_encoder
        self.model = model
        self.autoencoder = autoencoder
        self.sampler = sampler if sampler is not None else FastSampler()

    @property
    def device(self) -> torch.device:
        return _model_device(self.model)

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampler settings a call uses when it passes none (`steps`, `guidance_scale`, `official_grid`)."""
        return sampler_settings(self.sampler)

    def to(self, device: torch.device | str) -> "CrossFlowPipeline":
        """Move the model, and the text encoder and autoencoder when they are modules, to `device`; returns self."""
        self.model.to(device)
        for part in (self.text_encoder, self.autoencoder):
            if isinstance(part, torch.nn.Module):
                part.to(device)
        return self

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: torch.device | str | None = None, sampler: Any | None = None
    ) -> "CrossFlowPipeline":
        """Load a `save_pretrained` directory; the text encoder and autoencoder are the ones its config names, the
        sampler (unless given) a `FastSampler` with its recommended settings (`sampling.json`). A checkpoint of another
        task is refused before anything loads."""
        from crossflow.autoencoder import build_autoencoder
        from crossflow.config import check_task
        from crossflow.model import CrossFlow
        from crossflow.text_encoder import TextEncoder

        check_task(directory, ("text-to-image",), "CrossFlowPipeline")
        if sampler is None:
            sampler = FastSampler(**sampling_defaults(directory))
        model = CrossFlow.from_pretrained(directory).eval()
        cfg = model.config
        pipe = cls(TextEncoder.from_config(cfg), model, build_autoencoder(cfg), sampler)
        return pipe.to(device) if device is not None else pipe

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
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or (
            num_images_per_prompt < 1
        ):
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        emb, mask = self.text_encoder(prompts)  # (P, L, Dt), (P, L)
        device = self.device
        dtype = next(self.model.parameters()).dtype
        emb = emb.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        mask = mask.to(device=device, dtype=torch.bool).repeat_interleave(num_images_per_prompt, dim=0)
        z0, _, _ = self.model.encode_text(emb, mask, generator=generator)
        return z0

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """z1 (B, C, H, W) -> images (B, C', H', W') in [-1, 1]."""
        return self.autoencoder.decode(latents).float().clamp(-1, 1)

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
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if (prompts is None) == (z0 is None):
            raise ValueError("pass either prompts or z0 (start latents), not both or neither")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if z0 is not None and (seed is not None or generator is not None or num_images_per_prompt != 1):
            raise ValueError("seed, generator and num_images_per_prompt act on the Text VE noise; with z0 there is "
                             "none (draw it with encode_prompts)")
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        try:
            if z0 is None:
                z0 = self.encode_prompts(prompts, num_images_per_prompt, generator)
            else:
                z0 = z0.to(device=self.device, dtype=next(self.model.parameters()).dtype)
            z1 = self._sample(z0, steps, guidance_scale, progress)
        finally:
            self.model.train(was_training)
        if output_type == "latent":
            return z1
        images = self.decode_latents(z1)
        return (images + 1) / 2 if output_type == "pt" else to_pil(images)

    def _sample(self, z0: torch.Tensor, steps: int | None, guidance_scale: float | None, progress: bool):
        if not progress:
            return self.sampler(self.model, z0, steps=steps, guidance_scale=guidance_scale)
        from tqdm.auto import tqdm

        total = steps if steps is not None else getattr(self.sampler, "steps", None)
        # disable=None: tqdm's own rule, no bar when stderr is not a terminal (logs, pipes, CI)
        with tqdm(total=total, desc="sampling", unit="step", disable=None, leave=False) as bar:
            return self.sampler(self.model, z0, steps=steps, guidance_scale=guidance_scale, callback=bar.update)


# ---------------------------------------------------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------------------------------------------------


def default_checkpoint() -> str:
    """The shipped text-to-digit model (`crossflow/weights/digits`)."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "weights" / "digits")


_PIPES: dict[tuple[str, str], CrossFlowPipeline] = {}


def sample(
    prompts: str | Sequence[str], checkpoint: str | os.PathLike | None = None, *, num_images_per_prompt: int = 1,
    steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
    device: str | torch.device | None = None, output_type: str = "pil",
) -> list | torch.Tensor:
    """Prompts to images in one call: loads `checkpoint` (default: the shipped digits model) once per
    (checkpoint, device), then runs the pipeline with FastSampler. Defaults come from the checkpoint's
    `sampling.json` when present (e.g. the digits model's guidance scale), else 50 steps and scale 7."""
    path = str(checkpoint if checkpoint is not None else default_checkpoint())
    dev = str(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    key = (os.path.abspath(path), dev)
    if key not in _PIPES:
        _PIPES[key] = CrossFlowPipeline.from_pretrained(path, device=dev, sampler=FastSampler(**sampling_defaults(path)))
    return _PIPES[key](prompts, num_images_per_prompt=num_images_per_prompt, steps=steps,
                       guidance_scale=guidance_scale, seed=seed, output_type=output_type)


SAMPLER_KEYS = ("steps", "guidance_scale", "official_grid")
SCALE_KEYS = ("source_noise_scale", "text_variation_strength")  # image -> text (`tasks.CaptionPipeline`)


def sampler_settings(sampler: Any) -> dict[str, Any]:
    """The `SAMPLER_KEYS` a sampler has."""
    return {k: getattr(sampler, k) for k in SAMPLER_KEYS if hasattr(sampler, k)}


def sampling_settings(directory: str | os.PathLike) -> dict[str, Any]:
    """The recommended settings saved beside a checkpoint (`sampling.json`, as `config.SAMPLING` writes them: the
    sampler's `SAMPLER_KEYS`, and `SCALE_KEYS`; other keys are ignored). Without the file (a run trained before the
    trainer wrote it): the `config.SAMPLING` entry of the preset its config.json records or its config equals, else {}.
    A file that is not a JSON object or holds an invalid value raises ValueError naming it."""
    import json
    import math
    from pathlib import Path

    from crossflow.sampling import EulerSampler

    f = Path(directory) / "sampling.json"
    if not f.is_file():
        return _preset_sampling(directory)
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        kw = {k: d[k] for k in SAMPLER_KEYS if k in d}
        EulerSampler(**kw)  # the same checks a sampler built from them makes
        for k in SCALE_KEYS:
            v = d.get(k, 1.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
            if k in d:
                kw[k] = float(v)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{f}: invalid sampling settings ({e})") from None
    return kw


def _preset_sampling(directory: str | os.PathLike) -> dict[str, Any]:
    from crossflow.config import SAMPLING, CrossFlowConfig, read_checkpoint_info

    try:
        cfg, about = read_checkpoint_info(directory)
    except (OSError, ValueError):  # reported where the model loads
        return {}
    preset = about["preset"] or next((n for n in SAMPLING if CrossFlowConfig.from_name(n) == cfg), None)
    return dict(SAMPLING.get(preset, {}))


def sampling_defaults(directory: str | os.PathLike) -> dict[str, Any]:
    """The sampler's part of `sampling_settings` (steps, guidance_scale, official_grid), or {}."""
    return {k: v for k, v in sampling_settings(directory).items() if k in SAMPLER_KEYS}
