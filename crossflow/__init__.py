"""A lean, fast CrossFlow (Liu et al., CVPR 2025): text -> Text VE latent -> flow transformer -> image latent.

Importing this package has no side effects: the heavy optional dependencies (transformers, diffusers) are imported
only when a text encoder or a VAE is built.
"""

from crossflow.autoencoder import IdentityAutoencoder, VAEAutoencoder, build_autoencoder
from crossflow.checkpoint import atomic_write, save_pretrained
from crossflow.config import CONFIGS, CrossFlowConfig
from crossflow.convert import convert_official_state_dict, load_official_checkpoint
from crossflow.data import SyntheticPairs
from crossflow.fast_sampler import FastSampler
from crossflow.model import CrossFlow, FlowTransformer, load_pretrained
from crossflow.pipeline import CrossFlowPipeline, sample
from crossflow.sampling import EulerSampler, interpolate_latents, latent_arithmetic
from crossflow.text_encoder import TextEncoder
from crossflow.text_ve import TextVE

__all__ = [
    "CONFIGS", "CrossFlow", "CrossFlowConfig", "CrossFlowPipeline", "EulerSampler", "FastSampler", "FlowTransformer",
    "IdentityAutoencoder", "SyntheticPairs", "TextEncoder", "TextVE", "TrainConfig", "Trainer", "VAEAutoencoder",
    "atomic_write", "build_autoencoder", "convert_official_state_dict", "interpolate_latents",
    "latent_arithmetic", "load_official_checkpoint", "load_pretrained", "sample", "save_pretrained",
]


def __getattr__(name: str):
    # Lazy, so that `python -m crossflow.train` does not find its own module already imported by this package.
    if name in ("TrainConfig", "Trainer"):
        from crossflow import train

        return getattr(train, name)
    raise AttributeError(f"module 'crossflow' has no attribute {name!r}")
