"""The one pipeline base: what every task pipeline (text -> image, image -> text, image -> image) shares.

    from_pretrained(directory, device, sampler)   the model, its parts and the checkpoint's recommended sampler
                                                  settings (`checkpoint.read_sampling`); another task's checkpoint is
                                                  refused before anything loads
    resolve(steps, guidance_scale)                the settings a call runs with (the call's, else the sampler's)
    output types                                  "pil": PIL images ("L" for 1 channel, "RGB" for 3); "pt": float32
                                                  (B, C, H, W) in [0, 1] on the pipeline's device; "latent": z1
    cached(cls, checkpoint, device)               one bounded cache of loaded pipelines for the one-call helpers

Subclasses set `tasks` (the `config.TASKS` they run) and build their parts in `_from_model`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from crossflow.fast_sampler import FastSampler

OUTPUT_TYPES = ("pil", "pt", "latent")
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"  # the shipped checkpoints, one folder per preset


def default_checkpoint(preset: str = "digits") -> str:
    """The shipped weights of a preset: crossflow/weights/<preset> (default: the text-to-digit model)."""
    return str(WEIGHTS / preset)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_count(n: Any, name: str) -> int:
    """`n` outputs per input: an int >= 1, else ValueError naming `name`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    return n


def make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """The generator a call draws its noise from: a CPU generator seeded by `seed` (so results match across devices),
    else `generator`; both given is a ValueError."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    return torch.Generator().manual_seed(seed) if seed is not None else generator


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


class Pipeline:
    """A CrossFlow model and a sampler (default `FastSampler()`: 50 steps, s = 7; `from_pretrained`: the checkpoint's
    `sampling.json`). The sampler integrates the model's flow network, `model.flow`."""

    tasks: tuple[str, ...] = ()  # the `CrossFlowConfig.task`s this pipeline runs
    pairing = ""  # its models' source -> target, in words for errors: "a text -> image"

    def __init__(self, model: torch.nn.Module, sampler: Any | None = None) -> None:
        cfg = getattr(model, "config", None)
        if cfg is not None and cfg.task not in self.tasks:
            raise ValueError(f"{type(self).__name__} needs {self.pairing} model, got {cfg.source} -> {cfg.target} "
                             f"({cfg.task})")
        self.model = model
        self.sampler = sampler if sampler is not None else FastSampler()

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str | None = None,
                        sampler: Any | None = None, **kw: Any) -> "Pipeline":
        """Load a `save_pretrained` directory with its recommended settings (`sampling.json`: the sampler's unless
        `sampler` is given, and the task's own); a checkpoint of another task is refused before anything loads.
        `sampler`: a sampler object, or a name of `config.SAMPLERS` built with the checkpoint's steps and guidance."""
        from crossflow.checkpoint import read_sampling, sampler_settings
        from crossflow.config import check_task
        from crossflow.models.model import CrossFlow

        tasks = kw.pop("tasks", cls.tasks)
        check_task(directory, tasks, cls.__name__ + (f" for {tasks[0]}" if tasks != cls.tasks else ""))
        settings = read_sampling(directory)
        if sampler is None or isinstance(sampler, str):
            from crossflow.scheduler_sampler import make_sampler

            chosen = sampler_settings(settings)
            if sampler is not None:
                chosen["method"] = sampler
            sampler = make_sampler(**chosen)
        pipe = cls._from_model(CrossFlow.from_pretrained(directory).eval(), sampler, settings, **kw)
        return pipe.to(device) if device is not None else pipe

    @classmethod
    def _from_model(cls, model: torch.nn.Module, sampler: Any, settings: dict[str, Any]) -> "Pipeline":
        return cls(model, sampler)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> "Pipeline":
        """Move the model and every other part that is a module to `device`; returns self."""
        self.model.to(device)
        for part in vars(self).values():
            if isinstance(part, torch.nn.Module) and part is not self.model:
                part.to(device)
        return self

    @property
    def sampling(self) -> dict[str, Any]:
        """The settings a call uses when it passes none (the keys of `sampling.json`)."""
        from crossflow.checkpoint import SAMPLER_KEYS

        return {k: getattr(self.sampler, k) for k in SAMPLER_KEYS if hasattr(self.sampler, k)}

    def resolve(self, steps: int | None = None, guidance_scale: float | None = None) -> dict[str, Any]:
        """{"guidance_scale", "steps"} a call with these arguments runs with (validated; None = the sampler's)."""
        steps, guidance_scale = self.sampler.resolve(steps, guidance_scale)
        return {"guidance_scale": guidance_scale, "steps": steps}

    def _sample(self, z0: torch.Tensor, steps: int | None = None, guidance_scale: float | None = None,
                progress: bool = False) -> torch.Tensor:
        """z0 -> z1 through the sampler; progress: one tqdm bar over the steps on stderr (only on a terminal)."""
        if not progress:
            return self.sampler(self.model.flow, z0, steps=steps, guidance_scale=guidance_scale)
        from tqdm.auto import tqdm

        total = self.resolve(steps, guidance_scale)["steps"]
        # disable=None: tqdm's own rule, no bar when stderr is not a terminal (logs, pipes, CI)
        with tqdm(total=total, desc="sampling", unit="step", disable=None, leave=False) as bar:
            return self.sampler(self.model.flow, z0, steps=steps, guidance_scale=guidance_scale, callback=bar.update)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """z1 (B, C, H, W) -> images (B, C', H', W') in [-1, 1], float32."""
        return self.autoencoder.decode(latents).float().clamp(-1, 1)

    def _output(self, z1: torch.Tensor, output_type: str) -> Any:
        """z1 -> the `output_type` (see the module docstring)."""
        from crossflow.pipelines.image_io import to_pil

        if output_type == "latent":
            return z1
        images = self.decode_latents(z1)
        return (images + 1) / 2 if output_type == "pt" else to_pil(images)


@functools.lru_cache(maxsize=4)
def _cached(cls: type, path: str, device: str, options: tuple) -> Pipeline:
    return cls.from_pretrained(path, device=device, **dict(options))


def cached(cls: type, checkpoint: str | os.PathLike | None, device: str | torch.device | None, preset: str,
           **options: Any) -> Pipeline:
    """`cls.from_pretrained(checkpoint, device)`, loaded once per (class, checkpoint, device, options) and kept in a
    small LRU cache (the one-call helpers); checkpoint None: the shipped weights of `preset`, device None: CUDA when
    there is one."""
    path = os.path.abspath(str(checkpoint if checkpoint is not None else default_checkpoint(preset)))
    return _cached(cls, path, str(device if device is not None else default_device()), tuple(sorted(options.items())))


def split(out: list, n: int) -> list[list]:
    """A flat list of n outputs per input -> one list per input."""
    return [out[i : i + n] for i in range(0, len(out), n)]

