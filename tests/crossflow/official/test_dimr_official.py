"""DiMR against the official code (`crossflow.models.dimr` and its converter `crossflow.convert.dimr`), through the
independent oracle in `dimr_oracle.py`: parameter counts, the forward at every level, every key of the released layouts,
architecture detection, whole checkpoints and the `crossflow convert` verb end to end on a fake official file.

Reference parameter counts (flow network only, VE and SigLIP tower excluded): 950.8 M at 256 px and 985.4 M at 512 px,
from the project's reference notes, reference/crossflow.md §1.5/§7 (kept beside the repository, not in it: an analytic
count of the official code, agreeing with the paper's "0.95B"); the oracle built from the official config literals
must also give exactly our count.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dimr_oracle import OFFICIAL, OMRModel, official_from_ours, ours_from_official, tiny_official

import crossflow_kernels
from crossflow.convert.dimr import (
    convert_dimr_flow_state_dict,
    detect_official_architecture,
    load_dimr_flow,
    official_dimr_shapes,
)
from crossflow.models.dimr import DiMRConfig, DiMRFlow, multiscale_flow_loss, multiscale_targets
from crossflow.sampling import EulerSampler


@pytest.fixture
def paired(randomize):
    """`paired(layout, norm_type="TDRMSN")` -> (oracle, ours, config): a tiny version of a released layout in the
    official module (randomised), ours loaded from its state dict through the converter, and our config."""

    def make(layout: str, norm_type: str = "TDRMSN"):
        oc = tiny_official(layout, norm_type)
        cfg = ours_from_official(oc)
        gen = torch.Generator().manual_seed(7)
        torch.manual_seed(1)
        oracle = OMRModel(oc)
        randomize(oracle, gen)
        ours = load_dimr_flow(oracle.state_dict(), cfg)
        return oracle, ours, cfg

    return make


@pytest.fixture
def fake_official_checkpoint(randomize):
    """`fake_official_checkpoint(preset, seed=0)` -> (config, oracle, state dict): a whole official-layout DiMR
    CrossFlow state dict for `preset`: the oracle's flow network (`stages.*`), a Text VE (`context_encoder.*`), the
    SigLIP logit scale and a projection weight (dropped by the converter)."""

    def make(preset: str, seed: int = 0):
        from crossflow.config import CrossFlowConfig
        from crossflow.models.text_ve import TextVE

        cfg = CrossFlowConfig.from_name(preset)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        oracle = OMRModel(official_from_ours(cfg.dimr))
        randomize(oracle, gen)
        ve = TextVE(cfg)
        sd = dict(oracle.state_dict())
        sd.update({f"context_encoder.{k}": v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point()
                   else v for k, v in ve.state_dict().items()})
        sd["open_clip.logit_scale"] = torch.tensor(2.5)
        sd["open_clip_output.fc1.weight"] = torch.randn(8, 4, generator=gen)
        return cfg, oracle, sd

    return make


# ---------------------------------------------------------------------------------------------------------------------
# (a) parameter counts of the released presets
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,millions", [("dimr-256-clip", 950.8), ("dimr-256-t5", 950.8),
                                           ("dimr-512-clip", 985.4), ("dimr-512-t5", 985.4)])
def test_preset_parameter_counts(name, millions):
    with torch.device("meta"):
        ours = DiMRFlow(DiMRConfig.from_name(name))
        oracle = OMRModel(OFFICIAL[name]())
    n = sum(p.numel() for p in ours.parameters())
    assert round(n / 1e6, 1) == millions
    assert n == sum(p.numel() for p in oracle.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# (b) forward (every level) matches the official math, through the converter
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,norm_type", [  # the quick loop keeps one layout per norm type (-m "not slow")
    ("256", "TDRMSN"), pytest.param("512", "TDRMSN", marks=pytest.mark.slow), ("512", "LN"), ("256", "RMSN"),
    ("256", "ADARMSN"), pytest.param("512", "ADARMSN", marks=pytest.mark.slow)])
def test_forward_matches_official(layout, norm_type, paired):
    """Ours (fp32) vs the oracle in fp64 must be within 2x the oracle's own fp32 error vs fp64 (plus 2 fp32 ulps of
    the output scale, so that a level where PyTorch happens to be exact does not demand bit equality)."""
    oracle, ours, cfg = paired(layout, norm_type)
    oracle64 = OMRModel(tiny_official(layout, norm_type)).double()
    oracle64.load_state_dict(oracle.state_dict())
    B = 4
    x = torch.randn(B, *cfg.latent_shape)
    mixed = torch.tensor([True, False, False, True])
    cases = [  # equal t across the batch takes the official seed_time shortcut (one row of TD parameters)
        (torch.tensor([0.0, 0.3, 0.71, 1.0]), mixed), (torch.full((B,), 0.45), torch.zeros(B, dtype=torch.bool)),
        (torch.full((B,), 0.45), torch.ones(B, dtype=torch.bool)), (torch.rand(B), ~mixed),
    ]
    with crossflow_kernels.use_backend("torch"), torch.no_grad():
        for t, ind in cases:
            log_snr = 4 - t * 8
            ref64 = oracle64(x.double(), log_snr, ind)
            ref32 = oracle(x, log_snr, ind)
            got = ours(x, t, ind.long(), return_all=True)
            assert len(got) == len(ref64) == len(cfg.stages)
            for lvl, (g, r64, r32) in enumerate(zip(got, ref64, ref32)):
                assert g.shape == r64.shape
                own = (r32.double() - r64).abs().max().item()
                err = (g.double() - r64).abs().max().item()
                floor = 2 * torch.finfo(torch.float32).eps * r64.abs().max().item()
                assert err <= 2 * own + floor, (f"level {lvl}, t={t.tolist()}, indicator={ind.tolist()}: "
                                                f"error {err:.3e} vs PyTorch fp32 {own:.3e}")
            torch.testing.assert_close(ours(x, t, ind), got[-1], rtol=0, atol=0)


def test_time_and_indicator_matter(paired):
    """Guard for the test above: with the randomised parameters, t and the indicator change every level."""
    _, ours, cfg = paired("512")
    x = torch.randn(2, *cfg.latent_shape)
    with crossflow_kernels.use_backend("torch"), torch.no_grad():
        a = ours(x, torch.tensor([0.2, 0.2]), torch.tensor([0, 0]), return_all=True)
        b = ours(x, torch.tensor([0.7, 0.7]), torch.tensor([0, 0]), return_all=True)
        c = ours(x, torch.tensor([0.2, 0.2]), torch.tensor([1, 1]), return_all=True)
    for u, v, w in zip(a, b, c):
        assert (u - v).abs().max() > 1e-3 and (u - w).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# (c) converter: every key of the four real configs, and architecture detection
# ---------------------------------------------------------------------------------------------------------------------


def _official_meta_state(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        sd = dict(OMRModel(OFFICIAL[name]()).state_dict())
        # The text side the detector reads (T5: the 4096 -> 1024 Compressor) and keys convert.py handles.
        sd["context_encoder.layers.0.attn.W_Q.weight"] = torch.empty(1024 if "t5" in name else 768, 1)
        if "t5" in name:
            sd["context_encoder.compressor.fc1.weight"] = torch.empty(1024, 4096)
        sd["open_clip.logit_scale"] = torch.empty(())
        sd["open_clip_output.fc1.weight"] = torch.empty(4096, 1024)
    return sd


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_converter_maps_every_key_of_released_configs(name):
    sd = _official_meta_state(name)
    cfg = DiMRConfig.from_name(name)
    flow_keys = {k for k in sd if k.startswith("stages.")}
    assert set(official_dimr_shapes(cfg)) == flow_keys  # no missing, no unexpected
    assert all(tuple(sd[k].shape) == s for k, s in official_dimr_shapes(cfg).items())
    out = convert_dimr_flow_state_dict({f"module.{k}": v for k, v in sd.items()}, cfg, prefix="flow.")
    with torch.device("meta"):
        ours = DiMRFlow(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in out.items()} == {f"flow.{k}": tuple(v.shape) for k, v in ours.items()}
    assert detect_official_architecture(sd) == name


def test_converter_rejects_mismatch():
    sd = _official_meta_state("dimr-256-clip")
    with pytest.raises(ValueError, match="missing keys"):
        convert_dimr_flow_state_dict(sd, DiMRConfig.from_name("dimr-512-clip"))
    bad = dict(sd)
    bad["stages.1.extra.weight"] = torch.empty(1, device="meta")
    with pytest.raises(ValueError, match=r"1 unexpected keys \['stages.1.extra.weight'\]"):
        convert_dimr_flow_state_dict(bad, DiMRConfig.from_name("dimr-256-clip"))


def test_detector_names_dit_and_refuses_others(paired):
    with torch.device("meta"):
        dit = {"x_embedder.proj.weight": torch.empty(1280, 4, 2, 2), "t_embedder.mlp.0.weight": torch.empty(1280, 256),
               "y_embedder.embedding_table.weight": torch.empty(2, 1280)}
    assert detect_official_architecture(dit) == "dit"
    oracle, _, _ = paired("256")
    with pytest.raises(ValueError, match=r"a DiMR checkpoint \(2 stages: transformer \(width 24, patch 2, 5 blocks\)"):
        detect_official_architecture(oracle.state_dict())
    with pytest.raises(ValueError, match="not a CrossFlow checkpoint"):
        detect_official_architecture({"foo.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_whole_official_dimr_checkpoint_converts(name):
    """Flow + Text VE + logit scale of a released layout (meta tensors), SigLIP tower keys dropped; a VE of the wrong
    text encoder is refused."""
    from crossflow.config import CrossFlowConfig
    from crossflow.convert.dimr import convert_official_dimr_state_dict
    from crossflow.models.dimr import OFFICIAL_CHECKPOINTS
    from crossflow.models.text_ve import TextVE

    text_cfg = CrossFlowConfig(**OFFICIAL_CHECKPOINTS[name]["crossflow_fields"], patch_size=2)
    with torch.device("meta"):
        sd = {k: v for k, v in OMRModel(OFFICIAL[name]()).state_dict().items()}
        ve = TextVE(text_cfg).state_dict()
        sd.update({f"context_encoder.{k}": v for k, v in ve.items()})
        sd.update({"open_clip.logit_scale": torch.empty(()), "open_clip_output.fc1.weight": torch.empty(4096, 1024),
                   "open_clip.visual.trunk.pos_embed": torch.empty(1, 256, 1024)})
        flow = DiMRFlow(DiMRConfig.from_name(name)).state_dict()
    assert detect_official_architecture(sd) == name
    out = convert_official_dimr_state_dict(sd, DiMRConfig.from_name(name), text_cfg)
    want = {f"flow.{k}" for k in flow} | {f"text_ve.{k}" for k in ve} | {"logit_scale"}
    assert set(out) == want
    other = "dimr-256-t5" if name == "dimr-256-clip" else "dimr-256-clip"
    wrong = CrossFlowConfig(**{**OFFICIAL_CHECKPOINTS[other]["crossflow_fields"],
                               "latent_size": text_cfg.latent_size}, patch_size=2)
    with pytest.raises(ValueError, match="Text VE"):
        convert_official_dimr_state_dict(sd, DiMRConfig.from_name(name), wrong)


# ---------------------------------------------------------------------------------------------------------------------
# (d) the loss and the Text VE sizes of the released checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def test_multiscale_targets_match_official():
    """Official `even_multi_scale_targets(scale_correction=True)`: a grouped box conv of ones / r, stride r."""
    v = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    got = multiscale_targets(v, [2, 4, 8])
    for g, r in zip(got, (4, 2, 1)):
        ref = v if r == 1 else F.conv2d(v, torch.ones(4, 1, r, r, dtype=v.dtype) / r, stride=r, groups=4)
        torch.testing.assert_close(g, ref)
    preds = [torch.zeros(2, 4, s, s, dtype=v.dtype) for s in (2, 4, 8)]
    loss = multiscale_flow_loss(preds, v, (0.25, 0.5, 1.0))
    want = sum(c * t.pow(2).flatten(1).mean(1) for c, t in zip((0.25, 0.5, 1.0), got))
    torch.testing.assert_close(loss, want.float())


@pytest.mark.parametrize("name,millions", [("dimr-256-clip", 110.2), ("dimr-256-t5", 165.2),
                                           ("dimr-512-clip", 97.5), ("dimr-512-t5", 142.4)])
def test_official_text_side_fields_build_the_official_ve(name, millions):
    """`OFFICIAL_CHECKPOINTS[...]["crossflow_fields"]` give a CrossFlowConfig whose Text VE has the official
    `context_encoder` size (97.5-165.2 M across the four files: issue 13; 110 / 98 / 142 M in crossflow.md §1.2)."""
    from crossflow.config import CrossFlowConfig
    from crossflow.models.dimr import OFFICIAL_CHECKPOINTS
    from crossflow.models.text_ve import TextVE

    fields = OFFICIAL_CHECKPOINTS[name]["crossflow_fields"]
    cfg = CrossFlowConfig(**fields, patch_size=2)
    assert cfg.latent_size == DiMRConfig.from_name(name).latent_size
    with torch.device("meta"):
        ve = TextVE(cfg)
    assert round(sum(p.numel() for p in ve.parameters()) / 1e6, 1) == millions


# ---------------------------------------------------------------------------------------------------------------------
# (e) the convert verb end to end on a fake official file
# ---------------------------------------------------------------------------------------------------------------------


def test_convert_verb_detects_converts_and_samples_a_fake_official_dimr_checkpoint(tmp_path, capsys, one_thread,
                                                                                   fake_official_checkpoint):
    """An official-layout DiMR file (DDP prefixes, SigLIP keys) -> `crossflow convert` without --preset (detected) ->
    the converted flow network equals the official math -> `crossflow sample --checkpoint DIR` with no sampler flags
    is the official sampler (50 steps, official grid, guidance 7); a mismatching --preset is refused in one line."""
    import json

    import numpy as np
    from PIL import Image

    from crossflow import cli
    from crossflow.models.dimr import OFFICIAL_SAMPLING
    from crossflow.models.model import CrossFlow
    from crossflow.pipelines.text_to_image import CrossFlowPipeline

    cfg, oracle, sd = fake_official_checkpoint("dimr-digits")
    pth, out = tmp_path / "t2i_digits_dimr.pth", tmp_path / "ours"
    torch.save({f"module.{k}": v for k, v in sd.items()}, pth)
    cli.main(["convert", str(pth), "-o", str(out)])
    assert "dimr-digits" in capsys.readouterr().out
    model = CrossFlow.from_pretrained(out)
    assert model.config == cfg and model.logit_scale.item() == 2.5
    for k, v in model.text_ve.state_dict().items():
        assert torch.equal(v, sd[f"context_encoder.{k}"]), k
    x, t, ind = torch.randn(3, *cfg.latent_shape), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([False, True, False])
    with crossflow_kernels.use_backend("torch"), torch.no_grad():
        for o, r in zip(model.flow(x, t, ind.long(), return_all=True), oracle(x, 4 - 8 * t, ind), strict=True):
            torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "sampling.json").read_text()) == OFFICIAL_SAMPLING

    png = tmp_path / "three.png"
    cli.main(["sample", "a handwritten three", "--checkpoint", str(out), "-o", str(png), "--backend", "torch",
              "--device", "cpu", "--upscale", "1", "-q"])
    pipe = CrossFlowPipeline.from_pretrained(out, sampler=EulerSampler(**OFFICIAL_SAMPLING))
    with crossflow_kernels.use_backend("torch"):
        want = np.asarray(pipe("a handwritten three", seed=0)[0])
    assert np.array_equal(np.asarray(Image.open(png)), want)

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", str(pth), "--preset", "digits", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("crossflow: error: ") and err.count("\n") == 1 and len(err) < 700
    assert "DiMR" in err and "'dimr-digits'" in err and "--preset dimr-digits" in err and "'digits'" in err, err
    assert not (tmp_path / "x").exists()


def test_load_official_checkpoint_refuses_a_dimr_layout_no_preset_has(tmp_path, fake_official_checkpoint):
    from crossflow.convert.dit import load_official_checkpoint

    _, _, sd = fake_official_checkpoint("dimr-tiny")
    sd = {k: v for k, v in sd.items() if not k.startswith("stages.2.")}  # a two-stage network
    torch.save(sd, tmp_path / "odd.pth")
    for cfg in (None, "dimr-tiny", "dit-h-2-512"):
        with pytest.raises(ValueError) as e:
            load_official_checkpoint(tmp_path / "odd.pth", cfg)
        msg = str(e.value)
        assert "a DiMR checkpoint (2 stages: transformer (width 32, patch 4, 3 blocks)" in msg and len(msg) < 700, msg
