"""A lean, fast CrossFlow (Liu et al., CVPR 2025): text -> Text VE latent -> flow transformer -> image latent.

Importing this package has no side effects: the heavy optional dependencies (transformers, diffusers) are imported
only when a text encoder or a VAE is built.
"""

from crossflow.autoencoder import IdentityAutoencoder, VAEAutoencoder, build_autoencoder
from crossflow.checkpoint import atomic_write, load_pretrained, save_pretrained
from crossflow.config import CONFIGS, CrossFlowConfig
from crossflow.convert import convert_official_state_dict, load_official_checkpoint
from crossflow.model import CrossFlow, FlowTransformer
from crossflow.text_encoder import TextEncoder
from crossflow.text_ve import TextVE

__all__ = [
    "CONFIGS", "CrossFlow", "CrossFlowConfig", "FlowTransformer", "IdentityAutoencoder", "TextEncoder", "TextVE",
    "VAEAutoencoder", "atomic_write", "build_autoencoder", "convert_official_state_dict", "load_official_checkpoint",
    "load_pretrained", "save_pretrained",
]
