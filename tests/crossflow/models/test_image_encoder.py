"""The optional frozen pretrained image encoder for the contrastive loss (a tiny random CLIP vision tower on disk)."""

import pytest
import torch

import crossflow_kernels
from crossflow.config import CrossFlowConfig
from crossflow.models.image_encoder import PretrainedImageEncoder
from crossflow.models.model import CrossFlow


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    d = tmp_path_factory.mktemp("clip-vision")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=2)
    CLIPVisionModel(cfg).save_pretrained(d)
    return str(d)


def test_pretrained_encoder_is_frozen_and_unsaved(tower_dir):
    cfg = CrossFlowConfig.from_name("tiny", latent_channels=1, image_encoder=tower_dir)
    model = CrossFlow(cfg)
    assert isinstance(model.image_encoder, PretrainedImageEncoder)
    assert not any(k.startswith("image_encoder._tower") for k in model.state_dict())  # reloaded by name, not saved
    emb, mask = torch.randn(4, cfg.text_len, cfg.text_dim), torch.ones(4, cfg.text_len, dtype=torch.bool)
    z1 = torch.rand(4, *cfg.latent_shape) * 2 - 1
    with crossflow_kernels.use_backend("torch"):
        loss, parts = model(emb, mask, z1, torch.Generator().manual_seed(0))
    loss.backward()
    assert model.image_encoder.fc2.weight.grad is not None  # the projection trains
    assert all(p.grad is None and not p.requires_grad for p in model.image_encoder._tower.parameters())
    assert torch.isfinite(parts["clip"])


def test_pretrained_encoder_round_trip(tower_dir, tmp_path):
    cfg = CrossFlowConfig.from_name("tiny", latent_channels=1, image_encoder=tower_dir)
    model = CrossFlow(cfg).eval()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    model.save_pretrained(tmp_path)
    again = CrossFlow.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again.image_encoder(x), model.image_encoder(x))


def test_pretrained_encoder_needs_pixels_in_latent_space(tower_dir):
    cfg = CrossFlowConfig.from_name("tiny", latent_channels=4, image_encoder=tower_dir, autoencoder="some/vae")
    model = CrossFlow(cfg)
    emb, mask = torch.randn(2, cfg.text_len, cfg.text_dim), torch.ones(2, cfg.text_len, dtype=torch.bool)
    with crossflow_kernels.use_backend("torch"), pytest.raises(ValueError, match="needs pixel images"):
        model(emb, mask, torch.randn(2, *cfg.latent_shape), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="pixel images"):
        model.image_encoder(torch.randn(2, 4, 8, 8))
