"""Image -> image on the real 8x8 digits: the data, the judges (PSNR, classifier, distances) and their bars."""

import pytest
import torch

from crossflow.digits import data
from crossflow.digits import eval as judge
from crossflow.pipelines import image as img2img
from crossflow.pipelines import image_io


def test_native_digits_are_the_originals_on_the_same_split():
    x8, y8 = data.load_native("test")
    x16, y16 = data.load_digits("test")
    assert x8.shape[1:] == (1, 8, 8) and torch.equal(y8, y16)
    # the 16x16 text-to-image data are the bilinear upsampling of exactly these images
    up = torch.nn.functional.interpolate((x8 + 1) / 2, size=16, mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(up, x16)
    levels = (x8 + 1) / 2 * 16  # the originals' 17 grey levels 0..16
    torch.testing.assert_close(levels, levels.round(), atol=1e-5, rtol=0)


def test_downsample_is_the_2x2_block_mean():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    want = x.view(3, 1, 4, 2, 4, 2).mean((3, 5))
    torch.testing.assert_close(data.downsample(x), want)
    with pytest.raises(ValueError, match="grey images"):
        data.downsample(torch.rand(3, 8, 8))


def test_psnr_on_the_unit_grey_scale():
    real = torch.zeros(2, 1, 8, 8)
    off = real + 0.2  # 0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    torch.testing.assert_close(judge.psnr(off, real), torch.full((2,), 20.0, dtype=torch.float64))
    assert (judge.psnr(real, real) > 90).all()
    with pytest.raises(ValueError, match="differ"):
        judge.psnr(real, real[:1])


def test_upscale_judge_scores_bicubic_as_the_baseline_and_passes_an_oracle():
    res = judge.evaluate_upscale(judge.bicubic)
    assert res["psnr_gain_db"] == 0 and not res["passed"]
    assert 13.0 < res["psnr_bicubic_db"] < 14.0  # the "about 13.5 dB"
    assert 0.7 < res["accuracy_bicubic"] < 0.82 and res["accuracy_4x4_classifier"] > 0.9
    assert res["classifier_accuracy_on_real"] > 0.99
    real, _ = data.load_native("test")
    lows = data.downsample(real)

    def oracle(low):  # looks the real image up: the best any model could do
        d = torch.cdist(low.flatten(1), lows.flatten(1))
        return real[d.argmin(1)]

    best = judge.evaluate_upscale(oracle)
    assert best["passed"] and best["accuracy"] > 0.99 and best["psnr_gain_db"] > 20
    with pytest.raises(ValueError, match="expected"):
        judge.evaluate_upscale(lambda low: low)  # 4x4 back: wrong shape


def test_variation_judge_refuses_copies_and_strangers():
    real, y = data.load_native("train")

    def copies(x, n, seed):
        return x.repeat_interleave(n, 0)

    res = judge.evaluate_variation(copies, n=2, limit=60)
    assert res["label_kept"] > 0.95 and res["distance_to_input"] == 0 and not res["passed"]

    def other_digit(x, n, seed):  # far from the input, and the wrong digit
        k = (judge.predict(x) + 1) % 10
        return torch.cat([real[y == c][:n] for c in k.tolist()])

    res = judge.evaluate_variation(other_digit, n=2, limit=60)
    assert res["label_kept"] < 0.05 and not res["passed"]

    def same_class_neighbour(x, n, seed):  # real training digits of the input's class, nearest first
        out = []
        for img, c in zip(x, judge.predict(x).tolist()):
            pool = real[y == c]
            d = (pool - img).flatten(1).norm(dim=1)
            out.append(pool[d.argsort()[3 : 3 + n]])
        return torch.cat(out)

    res = judge.evaluate_variation(same_class_neighbour, n=2, limit=60)
    assert res["passed"], res
    assert 0.4 < res["distance_to_input"] < 1.0 and res["distance_between_variations"] > 0
    with pytest.raises(ValueError, match="n must be"):
        judge.evaluate_variation(copies, n=1)


# ---- data sets, pipeline, CLI: the shared model with an image source (tiny widths: shapes and API, not quality)


def _tiny(preset: str):
    from crossflow.config import CrossFlowConfig

    return CrossFlowConfig.from_name(preset, hidden_size=32, depth=1, num_heads=2, image_ve_width=8,
                                     image_encoder_width=8, image_feature_dim=16)


def test_upscale_pairs_are_the_training_digits_and_their_4x4():
    ds = data.UpscalePairs(_tiny("digits-sr"))
    real, y = data.load_native("train")
    assert len(ds) == len(real)
    item = ds[7]
    assert item["source"].shape == (1, 4, 4) and item["latent"].shape == (1, 8, 8)
    torch.testing.assert_close(item["latent"], real[7])
    torch.testing.assert_close(item["source"], real[7].view(1, 4, 2, 4, 2).mean((2, 4)))
    with pytest.raises(ValueError, match="digits-sr data set"):
        data.UpscalePairs(_tiny("digits-vary"))  # an 8x8 source


def test_variation_pairs_are_another_hand_of_the_same_digit():
    ds = data.VariationPairs(_tiny("digits-vary"), seed=3, size=50)
    real, y = data.load_native("train")
    flat = real.flatten(1)
    seen = set()
    for i in range(50):
        a, b = ds[i], ds[i]
        assert torch.equal(a["latent"], b["latent"])  # a pure function of (seed, i)
        j = i % len(real)
        torch.testing.assert_close(a["source"], real[j])
        k = int((flat - a["latent"].flatten()).abs().sum(1).argmin())  # which training digit the target is
        assert k != j and y[k] == y[j]
        same = torch.nonzero(y == y[j]).flatten()
        d = (flat[same] - flat[j]).norm(dim=1)
        assert (d < (flat[k] - flat[j]).norm()).sum() <= data.VARY_NEIGHBOURS  # among the nearest 20 (+ itself)
        seen.add(k)
    assert len(seen) > 40
    other = data.VariationPairs(_tiny("digits-vary"), seed=4, size=50)
    assert any(not torch.equal(ds[i]["latent"], other[i]["latent"]) for i in range(10))


@pytest.fixture
def torch_backend():
    import crossflow_kernels

    with crossflow_kernels.use_backend("torch"):  # speed on CPU: the kernels are tested on their own (tests/crossflow_kernels)
        yield


def test_image_pipeline_shapes_seed_and_inputs(torch_backend):
    from PIL import Image

    from crossflow.encoders.autoencoder import IdentityAutoencoder
    from crossflow.models.model import CrossFlow
    from crossflow.sampling import EulerSampler

    torch.manual_seed(0)
    model = CrossFlow(_tiny("digits-sr")).eval()
    pipe = img2img.ImagePipeline(model, IdentityAutoencoder(),
                                 EulerSampler(steps=2, guidance_scale=1.0))
    low = torch.rand(3, 1, 4, 4) * 2 - 1
    out = pipe.images(low, num_images_per_image=2, seed=1)
    assert out.shape == (6, 1, 8, 8) and out.abs().max() <= 1
    torch.testing.assert_close(out, pipe.images(low, num_images_per_image=2, seed=1))
    # output_type "pt" means what it means for every pipeline: [0, 1]
    torch.testing.assert_close(pipe(low, num_images_per_image=2, seed=1, output_type="pt"), (out + 1) / 2)
    assert not torch.equal(out[0], out[1])  # the image VE's noise differs between an input's outputs
    # PIL images of any size are read as grey and area-averaged to the source size
    pil = [Image.fromarray(((low[i, 0].repeat_interleave(4, 0).repeat_interleave(4, 1) + 1) * 127.5).round()
                           .to(torch.uint8).numpy()) for i in range(3)]
    torch.testing.assert_close(pipe.images(pil, seed=1), pipe.images(low, seed=1), atol=2e-2, rtol=0)
    imgs = pipe(low[:1], output_type="pil", seed=0)
    assert len(imgs) == 1 and imgs[0].size == (8, 8) and imgs[0].mode == "L"
    with pytest.raises(ValueError, match="output_type"):
        pipe(low, output_type="np")
    with pytest.raises(ValueError, match="num_images_per_image"):
        pipe(low, num_images_per_image=0)
    from crossflow.config import CrossFlowConfig

    with pytest.raises(ValueError, match="image -> image"):
        img2img.ImagePipeline(CrossFlow(CrossFlowConfig.from_name("tiny")), None)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Untrained tiny digits-sr / digits-vary models, saved as the shipped ones are."""
    from crossflow.models.model import CrossFlow

    out = {}
    for preset in ("digits-sr", "digits-vary"):
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(preset)
        CrossFlow(_tiny(preset)).save_pretrained(d)
        out[preset] = d
    return out


def _png(path, size):
    from PIL import Image

    Image.fromarray((torch.rand(size, size) * 255).to(torch.uint8).numpy()).save(path)
    return str(path)


def test_cli_upscale_and_vary_write_grids(tiny_checkpoints, tmp_path, capsys):
    from PIL import Image

    from crossflow import cli

    a, b = _png(tmp_path / "a.png", 4), _png(tmp_path / "b.png", 6)  # any size under 8x8: area-averaged to 4x4
    out = tmp_path / "up.png"
    cli.main(["upscale", a, b, "-o", str(out), "--n", "3", "--checkpoint", str(tiny_checkpoints["digits-sr"]),
              "--steps", "2", "--backend", "torch", "-q"])
    assert "wrote" in capsys.readouterr().out
    gap = cli.GRID_GAP
    assert Image.open(out).size == ((3 * 8 + 2 * gap) * 8, (2 * 8 + gap) * 8)  # 2 rows x 3, 8x8 cells, upscaled x8
    out = tmp_path / "vary.png"
    cli.main(["vary", a, "-o", str(out), "--n", "2", "--checkpoint", str(tiny_checkpoints["digits-vary"]),
              "--steps", "2", "--upscale", "1", "--gap", "0", "--backend", "torch", "-q"])
    assert Image.open(out).size == (16, 8)
    assert capsys.readouterr().err == f"crossflow: note: {a}: resized from 4x4 to 8x8\n"  # said, on one line
    with pytest.raises(SystemExit) as e:
        cli.main(["upscale", str(tmp_path / "missing.png"), "-o", str(tmp_path / "x.png"),
                  "--checkpoint", str(tiny_checkpoints["digits-sr"])])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("crossflow: error: no such image file") and err.count("\n") == 1


def test_cli_eval_fails_an_untrained_model(tiny_checkpoints, tmp_path, capsys):
    import json

    from crossflow import cli

    for preset in ("digits-sr", "digits-vary"):
        res_file = tmp_path / f"{preset}.json"
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", "--preset", preset, "--checkpoint", str(tiny_checkpoints[preset]), "--steps", "2",
                      "--per-image", "2", "--json", str(res_file), "--backend", "torch", "-q"])
        assert e.value.code == 1
        out = capsys.readouterr().out
        assert out.rstrip().endswith("FAIL")
        res = json.loads(res_file.read_text())
        assert res["passed"] is False and res["images"] == 359 and res["steps"] == 2


@pytest.mark.slow
def test_shipped_models_beat_their_bars_on_a_small_eval(torch_backend):
    """The committed weights on the first 100 held-out images with their sampling.json settings (the README's
    numbers come from the full `crossflow eval --preset digits-sr | digits-vary`)."""
    from crossflow.checkpoint import read_sampling, sampler_settings
    from crossflow.pipelines.base import default_checkpoint

    assert sampler_settings(read_sampling(default_checkpoint("digits-sr"))) == {"steps": 50, "guidance_scale": 1.5}
    pipe = img2img.ImagePipeline.from_pretrained(default_checkpoint("digits-sr"))
    res = judge.evaluate_upscale(pipe.upscale, limit=100)
    assert res["psnr_gain_db"] >= 1.5 and res["accuracy"] >= 0.8, res
    pipe = img2img.ImagePipeline.from_pretrained(default_checkpoint("digits-vary"))
    res = judge.evaluate_variation(pipe.vary, n=2, limit=100)
    assert res["label_kept"] >= 0.9 and 0.4 <= res["distance_to_input"] <= 1.0, res


# ---- reading a user's image files (`to_grey`, `read_grey`)


def _digit8() -> "np.ndarray":
    """A real held-out digit, 16x16, 8-bit grey with bright ink on black."""
    import numpy as np


    x, _ = data.load_digits("test")
    return ((x[0, 0].numpy() + 1) * 127.5).round().astype(np.uint8)


def test_an_ordinary_grey_image_is_read_unchanged():
    from PIL import Image

    im = Image.fromarray(_digit8())
    out, notes = image_io.to_grey(im)
    assert out is im and notes == []  # 8-bit grey, dark ground: the same pixels as before, no note


def test_16_bit_grey_is_scaled_not_binarised(tmp_path):
    import numpy as np
    from PIL import Image

    g8 = _digit8()
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "d16.png")  # 16-bit PNG of the same digit
    assert Image.open(tmp_path / "d16.png").mode.startswith("I")
    ims, notes = image_io.read_grey([tmp_path / "d16.png"], 16)
    np.testing.assert_array_equal(np.asarray(ims[0]), g8)  # convert("L") made every inked pixel 255
    assert notes == [f"{tmp_path / 'd16.png'}: 16-bit grey scaled to 8 bits"]


@pytest.mark.parametrize("rgb, note", [(0, "dark ink made bright"), (255, "ink read from the transparency")])
def test_ink_drawn_in_the_alpha_channel_is_read(tmp_path, rgb, note):
    import numpy as np
    from PIL import Image

    g8 = _digit8()
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = rgb, g8  # black (or white) ink, its strength in the alpha channel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    ims, notes = image_io.read_grey([tmp_path / "a.png"], 16)
    np.testing.assert_array_equal(np.asarray(ims[0]), g8)  # convert("L") dropped the alpha: blank (or all white)
    assert len(notes) == 1 and note in notes[0]


def test_a_light_ground_is_inverted_and_colour_and_size_are_said(tmp_path):
    import numpy as np
    from PIL import Image

    g8 = _digit8()
    Image.fromarray(255 - g8).save(tmp_path / "paper.png")
    rgb = np.stack([g8 // 2, g8, g8], -1)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    ims, notes = image_io.read_grey([tmp_path / "paper.png", tmp_path / "colour.png"], 8)
    np.testing.assert_array_equal(np.asarray(ims[0]), g8)
    np.testing.assert_array_equal(np.asarray(ims[1]), np.asarray(Image.fromarray(rgb).convert("L")))
    assert notes == [f"{tmp_path / 'paper.png'}: inverted (dark ink on a light ground; the model reads bright ink on "
                     "a dark one), resized from 16x16 to 8x8",
                     f"{tmp_path / 'colour.png'}: colour converted to grey, resized from 16x16 to 8x8"]


def test_unreadable_inputs_name_the_file(tmp_path):
    from PIL import Image

    png = tmp_path / "t.png"
    Image.fromarray(_digit8()).save(png)
    png.write_bytes(png.read_bytes()[:-60])
    with pytest.raises(ValueError, match=f"{png}: cannot read the image .image file is truncated"):
        image_io.read_grey([png], 16)
    with pytest.raises(ValueError, match=f"{tmp_path} is a directory"):
        image_io.open_image(tmp_path)
    big = tmp_path / "big.png"
    Image.fromarray(_digit8()).save(big)
    with pytest.raises(ValueError, match="is 16x16 already: this model makes 8x8 images out of 4x4"):
        image_io.read_grey([big], 4, max_size=8)


def test_cli_upscale_refuses_an_image_at_its_output_size(tiny_checkpoints, tmp_path, cli_fails):
    """An 8x8 digit was averaged to 4x4 and came back worse than it went in: now refused, before the model loads."""
    png = _png(tmp_path / "eight.png", 8)
    err = cli_fails(["upscale", png, "-o", str(tmp_path / "up.png"), "--checkpoint",
                     str(tiny_checkpoints["digits-sr"])], 1)
    assert f"{png} is 8x8 already" in err and not (tmp_path / "up.png").exists()


def test_cli_eval_prints_progress_lines_off_a_terminal(tiny_checkpoints, capsys):
    """Off a terminal (a log, CI) no bar draws: `eval` prints plain progress lines to stderr instead."""
    from crossflow import cli

    with pytest.raises(SystemExit):
        cli.main(["eval", "--preset", "digits-sr", "--checkpoint", str(tiny_checkpoints["digits-sr"]), "--steps", "1",
                  "--backend", "torch"])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("eval: 0/359 img (0%)") and err[-1].startswith("eval: 359/359 img (100%)"), err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--preset", "digits-sr", "--checkpoint", str(tiny_checkpoints["digits-sr"]), "--steps", "1",
                  "--backend", "torch", "-q"])
    assert capsys.readouterr().err == ""


def test_progress_lines_are_periodic(monkeypatch, capsys):
    from crossflow import progress

    clock = iter([0.0, 10.0, 40.0, 100.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.progress(10, "eval", "img")
    bar.update(2)  # 10 s: no line
    bar.update(2)  # 40 s: a line
    bar.update(6)  # the end: a line
    assert capsys.readouterr().err.splitlines() == ["eval: 0/10 img (0%), 0 s elapsed",
                                                    "eval: 4/10 img (40%), 40 s elapsed",
                                                    "eval: 10/10 img (100%), 100 s elapsed"]
