"""Image -> image on the real 8x8 digits: the data, the judges (PSNR, classifier, distances) and their bars."""

import pytest
import torch

from crossflow import digits, img2img


def test_native_digits_are_the_originals_on_the_same_split():
    x8, y8 = img2img.load_native("test")
    x16, y16 = digits.load_images("test")
    assert x8.shape[1:] == (1, 8, 8) and torch.equal(y8, y16)
    # the 16x16 text-to-image data are the bilinear upsampling of exactly these images
    up = torch.nn.functional.interpolate((x8 + 1) / 2, size=16, mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(up, x16)
    levels = (x8 + 1) / 2 * 16  # the originals' 17 grey levels 0..16
    torch.testing.assert_close(levels, levels.round(), atol=1e-5, rtol=0)


def test_downsample_is_the_2x2_block_mean():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    want = x.view(3, 1, 4, 2, 4, 2).mean((3, 5))
    torch.testing.assert_close(img2img.downsample(x), want)
    with pytest.raises(ValueError, match="grey images"):
        img2img.downsample(torch.rand(3, 8, 8))


def test_psnr_on_the_unit_grey_scale():
    real = torch.zeros(2, 1, 8, 8)
    off = real + 0.2  # 0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    torch.testing.assert_close(img2img.psnr(off, real), torch.full((2,), 20.0, dtype=torch.float64))
    assert (img2img.psnr(real, real) > 90).all()
    with pytest.raises(ValueError, match="differ"):
        img2img.psnr(real, real[:1])


def test_upscale_judge_scores_bicubic_as_the_baseline_and_passes_an_oracle():
    res = img2img.evaluate_upscale(img2img.bicubic)
    assert res["psnr_gain_db"] == 0 and not res["passed"]
    assert 13.0 < res["psnr_bicubic_db"] < 14.0  # the "about 13.5 dB"
    assert 0.7 < res["accuracy_bicubic"] < 0.82 and res["accuracy_4x4_classifier"] > 0.9
    assert res["classifier_accuracy_on_real"] > 0.99
    real, _ = img2img.load_native("test")
    lows = img2img.downsample(real)

    def oracle(low):  # looks the real image up: the best any model could do
        d = torch.cdist(low.flatten(1), lows.flatten(1))
        return real[d.argmin(1)]

    best = img2img.evaluate_upscale(oracle)
    assert best["passed"] and best["accuracy"] > 0.99 and best["psnr_gain_db"] > 20
    with pytest.raises(ValueError, match="expected"):
        img2img.evaluate_upscale(lambda low: low)  # 4x4 back: wrong shape


def test_variation_judge_refuses_copies_and_strangers():
    real, y = img2img.load_native("train")

    def copies(x, n, seed):
        return x.repeat_interleave(n, 0)

    res = img2img.evaluate_variation(copies, n=2, limit=60)
    assert res["label_kept"] > 0.95 and res["distance_to_input"] == 0 and not res["passed"]

    def other_digit(x, n, seed):  # far from the input, and the wrong digit
        k = (img2img.predict(x) + 1) % 10
        return torch.cat([real[y == c][:n] for c in k.tolist()])

    res = img2img.evaluate_variation(other_digit, n=2, limit=60)
    assert res["label_kept"] < 0.05 and not res["passed"]

    def same_class_neighbour(x, n, seed):  # real training digits of the input's class, nearest first
        out = []
        for img, c in zip(x, img2img.predict(x).tolist()):
            pool = real[y == c]
            d = (pool - img).flatten(1).norm(dim=1)
            out.append(pool[d.argsort()[3 : 3 + n]])
        return torch.cat(out)

    res = img2img.evaluate_variation(same_class_neighbour, n=2, limit=60)
    assert res["passed"], res
    assert 0.4 < res["distance_to_input"] < 1.0 and res["distance_between_variations"] > 0
    with pytest.raises(ValueError, match="n must be"):
        img2img.evaluate_variation(copies, n=1)
