"""Image -> image on the real 8x8 digits (`crossflow.digits`): the data and the training pairs, the judges (PSNR,
classifier, distances) and their bars, `crossflow eval` on the digits-sr / digits-vary models, its progress lines. The
pipeline and the `upscale` / `vary` verbs: `tests/crossflow/pipelines/test_img2img.py`."""

import pytest
import torch

from crossflow.digits import data
from crossflow.digits import eval as judge
from crossflow.pipelines import image as img2img


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


def test_upscale_judge_scores_a_posterior_mean_against_the_baselines_bar():
    """The posterior mean is judged beside the single samples: the oracle's own mean passes, bicubic as the mean
    misses the bar set by the best simple baseline, and a run without one is judged on the other bars only."""
    real, _ = data.load_native("test")
    lows = data.downsample(real)

    def oracle(low):
        return real[torch.cdist(low.flatten(1), lows.flatten(1)).argmin(1)]

    base = judge.evaluate_upscale(oracle)
    assert "posterior_mean" not in base and base["passed"]
    good = judge.evaluate_upscale(oracle, posterior_mean=oracle, posterior_samples=3)
    assert good["posterior_mean"]["samples"] == 3 and good["psnr_posterior_mean_db"] > 90 and good["passed"]
    bad = judge.evaluate_upscale(oracle, posterior_mean=judge.bicubic, posterior_samples=3)
    assert abs(bad["psnr_posterior_mean_db"] - bad["psnr_bicubic_db"]) < 1e-9 and not bad["passed"]
    assert judge.passes("digits-sr", bad) == {"psnr_gain_db": True, "accuracy": True,
                                             "psnr_posterior_mean_db": False, "realism": True}
    ok, line = judge.verdict("digits-sr", bad)
    assert not ok and "mean of 3 samples" in line and line.count("MISSED") == 1
    with pytest.raises(KeyError):  # every bar but the optional ones must be measured
        judge.passes("digits-sr", {k: v for k, v in good.items() if k != "accuracy"})


def test_posterior_mean_is_the_mean_of_the_pipelines_samples(img2img_checkpoints, torch_backend):
    pipe = img2img.ImagePipeline.from_pretrained(img2img_checkpoints["digits-sr"])
    low = data.downsample(data.load_native("test")[0][:3])
    samples = pipe.images(low, num_images_per_image=4, seed=5, steps=2)
    mean = pipe.posterior_mean(low, 4, seed=5, steps=2)
    assert mean.shape == (3, 1, 8, 8)
    torch.testing.assert_close(mean, samples.view(3, 4, 1, 8, 8).mean(1))
    assert (samples.view(3, 4, -1).std(1) > 0).any()  # the samples differ: the mean is not one sample
    with pytest.raises(ValueError, match="n"):
        pipe.posterior_mean(low, 0)


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


# ---- data sets and the eval verb: the shared model with an image source (tiny widths: shapes and API, not quality)


def test_upscale_pairs_are_the_training_digits_and_their_4x4(img2img_config):
    ds = data.UpscalePairs(img2img_config("digits-sr"))
    real, y = data.load_native("train")
    assert len(ds) == len(real)
    item = ds[7]
    assert item["source"].shape == (1, 4, 4) and item["latent"].shape == (1, 8, 8)
    torch.testing.assert_close(item["latent"], real[7])
    torch.testing.assert_close(item["source"], real[7].view(1, 4, 2, 4, 2).mean((2, 4)))
    with pytest.raises(ValueError, match="digits-sr data set"):
        data.UpscalePairs(img2img_config("digits-vary"))  # an 8x8 source


def test_variation_pairs_are_another_hand_of_the_same_digit(img2img_config):
    ds = data.VariationPairs(img2img_config("digits-vary"), seed=3, size=50)
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
    other = data.VariationPairs(img2img_config("digits-vary"), seed=4, size=50)
    assert any(not torch.equal(ds[i]["latent"], other[i]["latent"]) for i in range(10))


def test_cli_eval_fails_an_untrained_model(img2img_checkpoints, tmp_path, capsys):
    import json

    from crossflow import cli

    for preset in ("digits-sr", "digits-vary"):
        res_file = tmp_path / f"{preset}.json"
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", "--preset", preset, "--checkpoint", str(img2img_checkpoints[preset]), "--steps", "2",
                      "--per-image", "2", "--posterior-samples", "2", "--json", str(res_file), "--backend", "torch",
                      "-q"])
        assert e.value.code == 1
        out = capsys.readouterr().out
        assert out.rstrip().endswith("FAIL")
        res = json.loads(res_file.read_text())
        assert res["passed"] is False and res["images"] == 359 and res["steps"] == 2
        if preset == "digits-sr":  # judged on its posterior mean too, of --posterior-samples samples
            assert res["posterior_mean"]["samples"] == 2 and "mean of 2 samples" in out


@pytest.mark.slow
def test_shipped_models_beat_their_bars_on_a_small_eval(torch_backend):
    """The committed weights on the first 100 held-out images with their sampling.json settings (the README's
    numbers come from the full `crossflow eval --preset digits-sr | digits-vary`)."""
    from crossflow.pipelines.base import default_checkpoint

    pipe = img2img.ImagePipeline.from_pretrained(default_checkpoint("digits-sr"))
    res = judge.evaluate_upscale(pipe.upscale, limit=100, posterior_samples=8,
                                 posterior_mean=lambda low: pipe.posterior_mean(low, 8, seed=0))
    # the mean of 8 (not 32) samples, on 100 images: a looser bar than the full eval's 19.53 dB
    assert res["psnr_gain_db"] >= 1.5 and res["accuracy"] >= 0.8 and res["psnr_posterior_mean_db"] >= 18.5, res
    pipe = img2img.ImagePipeline.from_pretrained(default_checkpoint("digits-vary"))
    res = judge.evaluate_variation(pipe.vary, n=2, limit=100)
    assert res["label_kept"] >= 0.9 and 0.4 <= res["distance_to_input"] <= 1.0, res


def test_cli_eval_prints_progress_lines_off_a_terminal(img2img_checkpoints, capsys):
    """Off a terminal (a log, CI) no bar draws: `eval` prints plain progress lines to stderr instead."""
    from crossflow import cli

    with pytest.raises(SystemExit):
        cli.main(["eval", "--preset", "digits-sr", "--checkpoint", str(img2img_checkpoints["digits-sr"]),
                  "--steps", "1", "--backend", "torch"])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("eval: 0/359 img (0%)") and err[-1].startswith("eval: 359/359 img (100%)"), err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--preset", "digits-sr", "--checkpoint", str(img2img_checkpoints["digits-sr"]),
                  "--steps", "1", "--backend", "torch", "-q"])
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
