"""The embedded default: the digits data (real, split, captions) and the shipped model's quality on a small eval."""

import io
import sys
import time

import pytest
import torch

import crossflow_kernels
from crossflow.config import SAMPLING, CrossFlowConfig
from crossflow.fast_sampler import FastSampler
from crossflow.pipelines.text_to_image import CrossFlowPipeline
from crossflow.pipelines.base import default_checkpoint
from crossflow.checkpoint import read_sampling
from crossflow.digits import data
from crossflow.digits import eval as judge


def test_split_is_stratified_disjoint_and_stable():
    xtr, ytr = data.load_digits("train")
    xte, yte = data.load_digits("test")
    xall, _ = data.load_digits("all")
    assert xtr.shape[1:] == (1, 16, 16) and len(xtr) + len(xte) == len(xall) == 1797
    assert xtr.min() >= -1 and xtr.max() <= 1
    for k in range(10):  # every digit held out at about 20 %
        frac = (yte == k).sum() / ((ytr == k).sum() + (yte == k).sum())
        assert 0.18 < frac < 0.22
    flat_tr = {tuple(r) for r in xtr.flatten(1).tolist()}
    assert not any(tuple(r) in flat_tr for r in xte.flatten(1)[:50].tolist())  # no held-out image in training
    torch.testing.assert_close(data.load_digits("test")[0], xte)


def test_caption_templates_are_disjoint_and_name_the_digit():
    assert not set(data.TRAIN_TEMPLATES) & set(data.HELDOUT_TEMPLATES)
    assert data.caption("a handwritten {w}", 7) == "a handwritten seven"
    assert data.caption("the digit {n}", 7) == "the digit 7"


def test_digit_pairs_are_deterministic_and_shaped():
    cfg = CrossFlowConfig.from_name("digits")
    ds = data.DigitPairs(cfg, seed=3, size=20)
    a, b = ds[5], ds[5]
    assert a["text_emb"].shape == (cfg.text_len, cfg.text_dim) and a["latent"].shape == (1, 16, 16)
    assert torch.equal(a["text_emb"], b["text_emb"]) and int(a["label"]) == int(ds.labels[5])


@pytest.mark.parametrize("preset", ["digits", "digits-caption", "digits-sr", "digits-vary"])
def test_shipped_sampling_json_is_the_presets_table(preset):
    """Each shipped checkpoint's sampling.json holds exactly its preset's `config.SAMPLING` entry (the one source)."""
    assert read_sampling(default_checkpoint(preset)) == SAMPLING[preset]


@pytest.mark.slow
def test_shipped_model_draws_the_prompted_digits():
    """A small eval of the committed weights (the README's numbers come from the full `crossflow eval`)."""
    ckpt = default_checkpoint()
    pipe = CrossFlowPipeline.from_pretrained(ckpt, sampler=FastSampler(steps=20))
    with crossflow_kernels.use_backend("torch"):  # speed on CPU; the kernels are tested on their own
        res = judge.evaluate(pipe, per_prompt=3, guidance_scale=7.0, steps=20, templates=data.HELDOUT_TEMPLATES[:2])
    assert res["samples"] == 60
    assert res["accuracy"] >= 0.9, res
    assert res["diversity"] >= 0.4, res


class _TTY(io.StringIO):
    def isatty(self) -> bool:  # tqdm draws only on a terminal
        return True


def test_evaluate_progress_moves_per_batch(monkeypatch):
    """The eval bar counts images and moves after every batch (one batch per template); off unless asked."""
    batches = []

    def fake_pipe(prompts, num_images_per_prompt, seed, output_type, **kw):
        batches.append(tty.getvalue().count("img"))  # bar redraws before this batch
        time.sleep(0.15)  # longer than tqdm's minimum redraw interval (0.1 s)
        return torch.rand(len(prompts) * num_images_per_prompt, 1, 16, 16)

    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    res = judge.evaluate(fake_pipe, per_prompt=2, templates=data.HELDOUT_TEMPLATES[:3], progress=True)
    assert res["samples"] == 60
    out = tty.getvalue()
    assert "eval" in out and "60/60" in out
    assert batches[0] < batches[1] < batches[2]  # it moved between batches, not only at the end
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    judge.evaluate(fake_pipe, per_prompt=2, templates=data.HELDOUT_TEMPLATES[:1])
    assert tty.getvalue() == ""


def test_background_speckle_metric():
    """background_std: the class-background pixels of real digits are nearly constant; speckle raises it, ink outside
    the background does not count, and real and generated images go through the same mask."""
    mask = judge.background_mask()
    assert mask.shape == (10, 16, 16) and mask.dtype == torch.bool
    assert mask[:, 0, 0].all() and 0.15 < mask.float().mean() < 0.3  # a corner is background for every digit
    assert not mask[:, 6:10, 6:10].all()  # the centre carries ink for most digits
    x, y = data.load_digits("test")
    real = judge.background_std(x, y, mask)
    assert 0.04 < real < 0.05
    g = torch.Generator().manual_seed(0)
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    assert judge.background_std(noisy, y, mask) == pytest.approx((real**2 + 0.1**2) ** 0.5, rel=0.05)
    inked = torch.where(mask[y][:, None], x, torch.ones_like(x))  # saturate every non-background pixel
    assert judge.background_std(inked, y, mask) == pytest.approx(real)
    with pytest.raises(ValueError, match="background_std"):
        judge.background_std(x[:, :, :8], y, mask)


def test_background_parts_split_a_repeated_pattern_from_per_sample_noise():
    mask = judge.background_mask()
    x, y = data.load_digits("test")
    real = judge.background_parts(x, y, mask)
    assert -1.0 < real["mean"] < -0.95 and 0.0 < real["pattern_std"] < 0.03 and 0.03 < real["noise_std"] < 0.05
    g = torch.Generator().manual_seed(0)
    pattern = 0.2 * torch.randn(1, 1, 16, 16, generator=g)  # the same grey pattern on every image
    noise = 0.2 * torch.randn(x.shape, generator=g)  # different on every image
    with_pattern = judge.background_parts(x + pattern, y, mask)
    with_noise = judge.background_parts(x + noise, y, mask)
    assert (with_pattern["pattern_std"] > 0.15
            and with_pattern["noise_std"] == pytest.approx(real["noise_std"], rel=1e-6))
    assert with_noise["noise_std"] > 0.15 and with_noise["pattern_std"] < 0.05
    total = judge.background_std(x + pattern, y, mask)
    assert total == pytest.approx((with_pattern["pattern_std"] ** 2 + with_pattern["noise_std"] ** 2) ** 0.5, rel=0.1)
