"""The DiMR configuration (`crossflow.dimr_config`: `DiMRConfig`, `DiMRStage`, the presets and the released checkpoints'
facts) alone and inside `CrossFlowConfig`: validation and JSON round trips."""

from __future__ import annotations

import math

import pytest
import torch

from crossflow.dimr_config import DIMR_CONFIGS, DiMRConfig, DiMRStage
from crossflow.models.dimr import DiMRFlow


def test_config_validation_and_round_trip():
    cfg = DiMRConfig.from_name("dimr-512-clip")
    assert DiMRConfig.from_dict(__import__("json").loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="depth must be odd"):
        DiMRConfig.from_name("dimr-tiny", stages=(DiMRStage("transformer", 32, 48, 4, 2, 4, num_heads=2),))
    with pytest.raises(ValueError, match="must equal latent_size"):
        DiMRConfig.from_name("dimr-tiny", latent_size=16)
    with pytest.raises(ValueError, match="norm_type"):
        DiMRConfig.from_name("dimr-tiny", norm_type="group")
    with pytest.raises(ValueError, match="unknown DiMR preset"):
        DiMRConfig.from_name("dimr-1024")
    model = DiMRFlow(DiMRConfig.from_name("dimr-tiny"))
    with pytest.raises(ValueError, match="expected latent"):
        model(torch.randn(1, 4, 9, 9), torch.rand(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="indicator"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.zeros(1))
    assert all(".nodecay_" in n for n in model.no_weight_decay_names()) and model.no_weight_decay_names()
    assert math.isclose(sum(DIMR_CONFIGS["dimr-512-t5"].loss_coeffs), 1.75)


def test_crossflow_presets_and_config_round_trip():
    from crossflow.config import CrossFlowConfig
    from crossflow.models.dimr import OFFICIAL_CHECKPOINTS
    from crossflow.models.model import CrossFlow

    for name, info in OFFICIAL_CHECKPOINTS.items():
        cfg = CrossFlowConfig.from_name(name)
        assert cfg.backbone == "dimr" and cfg.dimr == DIMR_CONFIGS[name]
        assert all(getattr(cfg, k) == v for k, v in info["crossflow_fields"].items())
        assert CrossFlowConfig.from_json(cfg.to_json()) == cfg
    tiny = CrossFlowConfig.from_name("dimr-tiny")
    assert CrossFlowConfig.from_json(tiny.to_json()) == tiny and isinstance(CrossFlowConfig.from_json(
        tiny.to_json()).dimr, DiMRConfig)
    assert isinstance(CrossFlow(tiny).flow, DiMRFlow)
    with pytest.raises(ValueError, match="latent shape"):
        tiny.replace(latent_size=16)
    with pytest.raises(ValueError, match="needs dimr="):
        tiny.replace(dimr=None)
    with pytest.raises(ValueError, match="backbone must be one of"):
        tiny.replace(backbone="unet")
