"""A lean, fast CrossFlow (Liu et al., CVPR 2025): text -> Text VE latent -> flow transformer -> image latent.

Importing this package imports nothing heavy: each public name below is loaded from its module on first access
(PEP 562), so `crossflow --help` does not pay for torch, and transformers / diffusers are imported only when a text
encoder or a VAE is built.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "IdentityAutoencoder": "encoders.autoencoder", "VAEAutoencoder": "encoders.autoencoder",
    "build_autoencoder": "encoders.autoencoder",
    "atomic_write": "checkpoint", "save_pretrained": "checkpoint",
    "CONFIGS": "config", "CrossFlowConfig": "config",
    "convert_official_state_dict": "convert.dit", "detect_preset": "convert.dit",
    "load_official_checkpoint": "convert.dit", "save_converted": "convert.dit",
    "DiMRFlow": "models.dimr",
    "DiMRConfig": "dimr_config", "DiMRStage": "dimr_config",
    "SyntheticPairs": "data",
    "FastSampler": "fast_sampler",
    "ImagePipeline": "pipelines.image",
    "CrossFlow": "models.model", "FlowTransformer": "models.model", "load_pretrained": "models.model",
    "CrossFlowPipeline": "pipelines.text_to_image", "sample": "pipelines.text_to_image",
    "EulerSampler": "sampling", "interpolate_latents": "sampling", "latent_arithmetic": "sampling",
    "SchedulerSampler": "scheduler_sampler", "make_sampler": "scheduler_sampler",
    "TextEncoder": "encoders.text_encoder",
    "ImageVE": "models.image_ve", "TextDecoder": "models.text_decoder",
    "CaptionPipeline": "pipelines.caption",
    "TextVE": "models.text_ve",
    "TrainConfig": "training.train_config", "Trainer": "training.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'crossflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"crossflow.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
