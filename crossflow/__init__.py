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
    "IdentityAutoencoder": "autoencoder", "VAEAutoencoder": "autoencoder", "build_autoencoder": "autoencoder",
    "atomic_write": "checkpoint", "save_pretrained": "checkpoint",
    "CONFIGS": "config", "CrossFlowConfig": "config",
    "convert_official_state_dict": "convert", "detect_preset": "convert", "load_official_checkpoint": "convert",
    "save_converted": "convert",
    "DiMRFlow": "dimr",
    "DiMRConfig": "dimr_config", "DiMRStage": "dimr_config",
    "SyntheticPairs": "data",
    "FastSampler": "fast_sampler",
    "ImagePipeline": "img2img",
    "CrossFlow": "model", "FlowTransformer": "model", "load_pretrained": "model",
    "CrossFlowPipeline": "pipeline", "sample": "pipeline",
    "EulerSampler": "sampling", "interpolate_latents": "sampling", "latent_arithmetic": "sampling",
    "TextEncoder": "text_encoder",
    "ImageVE": "image_ve", "TextDecoder": "text_decoder",
    "CaptionPipeline": "tasks",
    "TextVE": "text_ve",
    "TrainConfig": "train_config", "Trainer": "train",
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
