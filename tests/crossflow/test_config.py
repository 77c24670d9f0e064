"""CrossFlowConfig: presets, validation, serialisation, parameter counts vs the papers (crossflow.md §1.2, §7)."""

import dataclasses

import pytest
import torch

from crossflow.config import CONFIGS, CrossFlowConfig
from crossflow.models.model import CrossFlow

# DiT paper (Peebles & Xie, Table 1) sizes; ours has a 2-row indicator table and 4 output channels instead of
# 1000 classes and learn_sigma, which shifts S/2 by ~1.5% and the others by < 0.5%.
DIT_PAPER = {"dit-s-2": 33e6, "dit-b-2": 130e6, "dit-l-2": 458e6, "dit-xl-2": 675e6, "dit-h-2-512": 1.0677e9}
VE_SPEC = {"dit-xl-2": 110e6, "dit-h-2-512": 142e6}  # crossflow.md §7: CLIP@256 VE ~110M, T5@512 VE ~142M


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="unknown CrossFlow config 'nope'") as e:
        CrossFlowConfig.from_name("nope")
    for name in CONFIGS:
        assert name in str(e.value)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_presets_build_and_roundtrip(name):
    cfg = CrossFlowConfig.from_name(name)
    assert CrossFlowConfig.from_json(cfg.to_json()) == cfg
    assert cfg.latent_numel == cfg.latent_channels * cfg.latent_size**2
    assert cfg.num_tokens * cfg.patch_size**2 == cfg.latent_size**2
    assert cfg.head_dim * cfg.num_heads == cfg.hidden_size


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hidden_size=100, num_heads=3), "hidden_size 100 must be divisible by num_heads 3"),
        (dict(latent_size=15), "latent_size 15 must be divisible by patch_size 4"),
        (dict(hidden_size=66, num_heads=3), "divisible by 4"),
        (dict(depth=0), "depth must be an int >= 1, got 0"),
        (dict(num_heads=2.0), "num_heads must be an int"),
        (dict(norm="batch"), "norm must be one of"),
        (dict(kl_kind="paper"), "kl_kind must be one of"),
        (dict(cfg_dropout=1.0), r"cfg_dropout must be in \[0.0, 1.0\), got 1.0"),
        (dict(ve_dropout=-0.1), "ve_dropout"),
        (dict(text_scale=0), "text_scale must be > 0"),
        (dict(text_dim=100, ve_reductions=3), "divisible by 2\\*\\*ve_reductions = 8"),
        (dict(ve_heads=5), r"VE attention widths \[384, 192, 96\].*ve_heads 5"),
        (dict(ve_adaptor=True, ve_adaptor_grid=64), "ve_adaptor: 2 \\* latent_numel = 512"),
        (dict(autoencoder=""), "autoencoder must be a non-empty string"),
    ],
)
def test_invalid_values_raise_with_the_values(changes, message):
    with pytest.raises(ValueError, match=message):
        CrossFlowConfig.from_name("digits", **changes)


def test_replace_validates_and_rejects_unknown_fields():
    cfg = CrossFlowConfig.from_name("tiny")
    assert cfg.replace(depth=3).depth == 3 and cfg.depth == 2
    with pytest.raises(ValueError, match="unknown CrossFlowConfig fields \\['width'\\]"):
        cfg.replace(width=3)
    with pytest.raises(ValueError, match="num_heads"):
        cfg.replace(num_heads=3)
    with pytest.raises(ValueError, match="unknown CrossFlowConfig fields"):
        CrossFlowConfig.from_dict({**cfg.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="invalid CrossFlowConfig JSON"):
        CrossFlowConfig.from_json("{not json")


def test_frozen():
    cfg = CrossFlowConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.depth = 3  # type: ignore[misc]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_papers(capsys):
    rows = []
    for name in CONFIGS:
        with torch.device("meta"):  # no allocation: dit-h-2-512 is 1.2B parameters
            m = CrossFlow(CrossFlowConfig.from_name(name))
        ve = m.text_ve if hasattr(m, "text_ve") else m.image_ve  # image -> image pairings have only an image VE
        rows.append((name, _count(m.flow), _count(ve), _count(m.image_encoder)))
    with capsys.disabled():
        print("\n" + f"{'preset':<12} {'flow':>14} {'source VE':>14} {'image enc':>12}")
        for name, f, v, i in rows:
            print(f"{name:<12} {f:>14,} {v:>14,} {i:>12,}")
    counts = {name: (f, v) for name, f, v, _ in rows}
    for name, want in DIT_PAPER.items():
        got = counts[name][0]
        assert abs(got / want - 1) < 0.02, f"{name}: flow has {got:,} parameters, paper {want:,.0f}"
    for name, want in VE_SPEC.items():
        got = counts[name][1]
        assert abs(got / want - 1) < 0.03, f"{name}: Text VE has {got:,} parameters, expected ~{want:,.0f}"
    assert counts["tiny"][0] < 500_000 and counts["digits"][0] < 5_000_000
