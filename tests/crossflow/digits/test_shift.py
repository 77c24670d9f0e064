"""Shifted digits (issue 22): the shift's direction and fill, the 16x16 data made from a shifted 8x8, the seeded
augmentation, the shifted evaluation sets, and the augment_shift option of the digit training data sets."""

import pytest
import torch

from crossflow.digits import data
from crossflow.digits import shift as digits_shift
from crossflow.digits.shift import BACKGROUND, ring, shift, shift16, shifted_set, upsample16


def _dot(y: int, x: int, size: int = 8) -> torch.Tensor:
    img = torch.full((1, 1, size, size), BACKGROUND)
    img[0, 0, y, x] = 1.0
    return img


def test_shift_moves_down_and_right_and_fills_with_the_background():
    out = shift(_dot(3, 3), 1, 2)
    assert out[0, 0, 4, 5] == 1.0 and int((out == 1.0).sum()) == 1  # dy down, dx right
    out = shift(_dot(3, 3), -2, -1)
    assert out[0, 0, 1, 2] == 1.0 and int((out == 1.0).sum()) == 1
    # leaving at one border does not come back at the other (no wrap-around): the image is all background
    for dy, dx in ((1, 0), (0, 1)):
        gone = shift(_dot(7, 7), dy, dx)
        assert (gone == BACKGROUND).all()
    x, _ = data.load_native("test")
    assert torch.equal(shift(x, 0, 0), x)
    out = shift(x, 2, -1)
    assert (out[..., :2, :] == BACKGROUND).all() and (out[..., :, -1:] == BACKGROUND).all()
    assert torch.equal(out[..., 2:, :-1], x[..., :-2, 1:])
    assert (shift(x, 8, 0) == BACKGROUND).all()


def test_16x16_images_are_the_shifted_8x8_resampled_as_the_data_set_does():
    x8, _ = data.load_native("train")
    x16, _ = data.load_digits("train")
    assert torch.equal(upsample16(x8), x16)  # bit-identical to the text-to-image / caption data
    assert torch.equal(shift16(x8, 0, 0), x16)
    s = shift16(x8[:20], 1, -1)
    assert torch.equal(s, upsample16(shift(x8[:20], 1, -1)))
    # the ink moved by 2 pixels at 16x16 (less where ink left the frame): the centre of mass follows the 8x8 shift
    def centre(im):
        w = (im + 1).flatten(1)
        ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        return (w * ys.flatten()).sum(1) / w.sum(1), (w * xs.flatten()).sum(1) / w.sum(1)
    (y0, x0), (y1, x1) = centre(x16[:20]), centre(s)
    assert 0.7 < (y1 - y0).mean() < 2.1 and -2.1 < (x1 - x0).mean() < -0.7


def test_random_shifts_are_uniform_in_range_and_seeded():
    g = torch.Generator().manual_seed(0)
    s = digits_shift.random_shifts(5000, 2, g)
    assert s.shape == (5000, 2) and s.min() == -2 and s.max() == 2
    counts = torch.stack([(s == v).sum(0) for v in range(-2, 3)]).float() / 5000
    assert (counts - 0.2).abs().max() < 0.03
    again = digits_shift.random_shifts(5000, 2, torch.Generator().manual_seed(0))
    assert torch.equal(s, again)
    assert not digits_shift.random_shifts(4, 0, torch.Generator()).any()
    x8, _ = data.load_native("test")
    a, sa = digits_shift.augment(x8[:30], 2, torch.Generator().manual_seed(1))
    b, sb = digits_shift.augment(x8[:30], 2, torch.Generator().manual_seed(1), size=16)
    assert torch.equal(sa, sb) and torch.equal(upsample16(a), b)
    for i in range(30):
        assert torch.equal(a[i : i + 1], shift(x8[i : i + 1], *sa[i].tolist()))
    with pytest.raises(ValueError, match="k must be"):
        digits_shift.random_shifts(3, -1, torch.Generator())


def test_shifted_set_is_every_image_at_every_shift_of_the_ring():
    assert ring(0) == [(0, 0)]
    assert len(ring(1)) == 8 and len(ring(2)) == 16 and len(ring(2, "compass")) == 8
    assert all(max(abs(a), abs(b)) == 2 for a, b in ring(2)) and len(set(ring(2))) == 16
    assert set(ring(2, "compass")) == {(a, b) for a in (-2, 0, 2) for b in (-2, 0, 2)} - {(0, 0)}
    x8, y = data.load_native("test")
    imgs, labels, shifts = shifted_set(x8[:10], y[:10], 2)
    assert imgs.shape == (160, 1, 8, 8) and torch.equal(labels, y[:10].repeat(16))
    for m, (dy, dx) in enumerate(ring(2)):
        assert torch.equal(imgs[m * 10 : (m + 1) * 10], shift(x8[:10], dy, dx))
        assert (shifts[m * 10 : (m + 1) * 10] == torch.tensor([dy, dx])).all()


# ---- the training data sets' augment_shift option


class _FakeBank:  # the caption bank without the text encoder: one token embedding per (digit, template)
    def __init__(self):
        self.templates = data.TRAIN_TEMPLATES
        self.captions = [data.caption(t, k) for k in range(10) for t in self.templates]
        self.emb = torch.arange(len(self.captions), dtype=torch.float32)[:, None, None].expand(-1, 10, 384)
        self.mask = torch.ones(len(self.captions), 10, dtype=torch.bool)

    def pick(self, digit, template):
        i = digit * len(self.templates) + template
        return self.emb[i], self.mask[i]


def _which_shift(img16, img8, k=2):
    hits = [(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)
            if torch.equal(img16[None], shift16(img8[None], dy, dx))]
    assert hits, "not a shift of the source image within the range"
    return hits[0]


def test_caption_and_text_to_image_data_shift_the_image_and_keep_the_rest():
    from crossflow.config import CrossFlowConfig

    x8, _ = data.load_native("train")
    bank = _FakeBank()
    for cls, preset, key in ((data.DigitCaptions, "digits-caption", "source"), (data.DigitPairs, "digits", "latent")):
        cfg = CrossFlowConfig.from_name(preset)
        plain = cls(cfg, seed=3, bank=bank)
        again = cls(cfg, seed=3, bank=bank, augment_shift=0)
        moved = cls(cfg, seed=3, bank=bank, augment_shift=2)
        seen = set()
        for i in range(60):
            a, b, c = plain[i], again[i], moved[i]
            assert all(torch.equal(a[k], b[k]) for k in a)  # 0: exactly the data set as before
            assert all(torch.equal(a[k], c[k]) for k in a if k != key)  # same caption draw, same label
            assert torch.equal(a[key], plain.images[i % plain.base])
            seen.add(_which_shift(c[key], x8[i % plain.base]))
            assert torch.equal(c[key], moved[i][key])  # a pure function of (seed, i)
        assert len(seen) >= 15  # the shifts vary over samples
        with pytest.raises(ValueError, match="augment_shift"):
            cls(cfg, bank=bank, augment_shift=-1)


def test_upscale_and_variation_data_shift_consistently(img2img_config):
    _tiny = img2img_config

    sr = data.UpscalePairs(_tiny("digits-sr"), seed=5, augment_shift=2)
    plain = data.UpscalePairs(_tiny("digits-sr"), seed=5)
    seen = set()
    for i in range(40):
        s = sr[i]
        assert torch.equal(s["source"], data.downsample(s["latent"][None])[0])  # the 4x4 of the shifted 8x8
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(s["latent"][None], shift(plain[i]["latent"][None], dy, dx))]
        assert hits
        seen.add(hits[0])
    assert len(seen) >= 10
    vary = data.VariationPairs(_tiny("digits-vary"), seed=5, size=40, augment_shift=2)
    base = data.VariationPairs(_tiny("digits-vary"), seed=5, size=40)
    for i in range(40):
        v, b = vary[i], base[i]
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(v["source"][None], shift(b["source"][None], dy, dx))
                and torch.equal(v["latent"][None], shift(b["latent"][None], dy, dx))]
        assert hits, "source and target moved by one shared shift"


def test_train_config_takes_augment_shift_for_digit_data_only():
    from crossflow.training.train_config import TrainConfig, parse_config

    assert TrainConfig("x").augment_shift == 0
    tc = parse_config(["--preset", "digits-caption", "--augment-shift", "2", "--out", "/tmp/none"])
    assert tc.augment_shift == 2 and tc.data == "digits-caption"
    with pytest.raises(ValueError, match="augment_shift"):
        TrainConfig("x", augment_shift=2)  # synthetic data
    with pytest.raises(ValueError, match="augment_shift"):
        TrainConfig("x", preset="digits-caption", data="digits-caption", augment_shift=9)
    tc = parse_config(["--preset", "digits-caption", "--augment-shift", "2", "--augment-shift-prob", "0.5", "--out",
                       "/tmp/none"])
    assert tc.augment_shift_prob == 0.5
    with pytest.raises(ValueError, match="augment_shift_prob"):
        TrainConfig("x", preset="digits-caption", data="digits-caption", augment_shift=2, augment_shift_prob=0.0)


def test_a_shift_probability_keeps_that_share_centred_and_the_rest_as_before(img2img_config):
    plain = data.UpscalePairs(img2img_config("digits-sr"), seed=5)
    every = data.UpscalePairs(img2img_config("digits-sr"), seed=5, augment_shift=2)
    half = data.UpscalePairs(img2img_config("digits-sr"), seed=5, augment_shift=2, augment_prob=0.5)
    centred = [torch.equal(half[i]["latent"], plain[i]["latent"]) for i in range(400)]
    moved_always = [torch.equal(every[i]["latent"], plain[i]["latent"]) for i in range(400)]
    # (0, 0) is 1 of 25 shifts: about 4 % centred when every sample is shifted, about 52 % at probability 0.5
    assert sum(moved_always) < 40 and 160 < sum(centred) < 260
    with pytest.raises(ValueError, match="augment_prob"):
        data.UpscalePairs(img2img_config("digits-sr"), augment_shift=2, augment_prob=1.5)
