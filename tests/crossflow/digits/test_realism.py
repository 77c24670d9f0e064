"""The realism score (issue 22): a classifier two-sample test that reads 0.5 on real against real and clearly more
on degraded real digits, with a fixed, deterministic protocol."""

import pytest
import torch
import torch.nn.functional as F

from crossflow.digits import data
from crossflow.digits import eval as judge
from crossflow.digits.realism import features, real_halves, realism, two_sample_accuracy


@pytest.fixture(scope="module")
def real():
    return data.load_native("test")[0]


def test_real_against_real_is_chance(real):
    a, b = real_halves()
    assert len(a) + len(b) == len(real) and abs(len(a) - len(b)) <= 10
    assert not set(map(tuple, a.flatten(1).tolist())) & set(map(tuple, b.flatten(1).tolist()))  # disjoint
    for seed in (0, 1):
        res = two_sample_accuracy(a, b, seed=seed)
        assert abs(res["accuracy"] - 0.5) < 0.1, res
        assert res["per_class"] == min(len(a), len(b)) and res["folds"] == 5
    # identical sets: exactly indistinguishable
    same = two_sample_accuracy(real, real.clone())
    assert abs(same["accuracy"] - 0.5) < 0.02, same
    # the training split against the held-out split: the same distribution
    assert abs(realism(data.load_native("train")[0])["accuracy"] - 0.5) < 0.1


def test_degraded_digits_are_told_apart(real):
    kernel = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    blurred = F.conv2d(F.pad(real, (1, 1, 1, 1), value=-1), kernel[None, None])
    assert realism(blurred)["accuracy"] > 0.9
    assert realism(judge.bicubic(data.downsample(real)))["accuracy"] > 0.9
    g = torch.Generator().manual_seed(0)
    noisy = (real + 0.1 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    assert realism(noisy)["accuracy"] > 0.75
    # slight noise on paired outputs: above chance, not below (a real image's noisy twin never in the training folds)
    faint = (real + 0.05 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    assert realism(faint)["accuracy"] > 0.55


def test_protocol_is_deterministic_and_takes_16x16_images(real):
    g = torch.Generator().manual_seed(1)
    noisy = (real + 0.1 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    assert realism(noisy) == realism(noisy)
    assert realism(noisy, seed=1)["accuracy"] != realism(noisy)["accuracy"]  # the seed is the protocol's only freedom
    x16, _ = data.load_digits("test")
    assert features(x16).shape == (len(x16), 64)
    assert realism(x16)["accuracy"] == 0.5  # 16x16 data judged against the 16x16 real held-out: the same images
    assert two_sample_accuracy(real, x16)["accuracy"] > 0.9  # ... not against the sharper 8x8 originals
    assert abs(two_sample_accuracy(*real_halves(size=16))["accuracy"] - 0.5) < 0.1
    more = torch.cat([noisy, noisy])
    assert realism(more)["per_class"] == len(real)  # equal counts
    with pytest.raises(ValueError, match="at least"):
        two_sample_accuracy(real[:5], real[5:10])


def test_the_judges_report_realism_that_can_fail():
    from crossflow.digits.data import downsample, load_native
    from crossflow.digits.eval import bicubic, evaluate_upscale, verdict

    real, _ = load_native("test")
    low = downsample(real)

    def oracle(batch):  # the real 8x8 of each 4x4 input: indistinguishable by construction
        return real[[int((low.flatten(1) == b.flatten()).all(1).nonzero()[0]) for b in batch]]

    exact = evaluate_upscale(oracle)
    assert abs(exact["realism"] - 0.5) < 0.1 and exact["psnr_db"] > 90
    blurry = evaluate_upscale(bicubic)
    assert blurry["realism"] > 0.9 and "told from real digits" in verdict("digits-sr", blurry)[1]
    assert "realism" not in evaluate_upscale(bicubic, limit=5)  # too few images for the folds: not reported
