"""Image -> image through the pipeline (`crossflow.pipelines.image`) on tiny untrained models: shapes, seeds, inputs and
output types; the `upscale` / `vary` verbs; reading a user's image files (`crossflow.pipelines.image_io`). The digits
data, judges and the `eval` verb: `tests/crossflow/digits/test_img2img_eval.py`."""

import pytest
import torch

from crossflow.digits import data
from crossflow.pipelines import image as img2img
from crossflow.pipelines import image_io


def test_image_pipeline_shapes_seed_and_inputs(torch_backend, img2img_config):
    from PIL import Image

    from crossflow.encoders.autoencoder import IdentityAutoencoder
    from crossflow.models.model import CrossFlow
    from crossflow.sampling import EulerSampler

    torch.manual_seed(0)
    model = CrossFlow(img2img_config("digits-sr")).eval()
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


def _png(path, size):
    from PIL import Image

    Image.fromarray((torch.rand(size, size) * 255).to(torch.uint8).numpy()).save(path)
    return str(path)


def test_cli_upscale_and_vary_write_grids(img2img_checkpoints, tmp_path, capsys):
    from PIL import Image

    from crossflow import cli

    a, b = _png(tmp_path / "a.png", 4), _png(tmp_path / "b.png", 6)  # any size under 8x8: area-averaged to 4x4
    out = tmp_path / "up.png"
    cli.main(["upscale", a, b, "-o", str(out), "--n", "3", "--checkpoint", str(img2img_checkpoints["digits-sr"]),
              "--steps", "2", "--backend", "torch", "-q"])
    assert "wrote" in capsys.readouterr().out
    gap = cli.GRID_GAP
    assert Image.open(out).size == ((3 * 8 + 2 * gap) * 8, (2 * 8 + gap) * 8)  # 2 rows x 3, 8x8 cells, upscaled x8
    out = tmp_path / "vary.png"
    cli.main(["vary", a, "-o", str(out), "--n", "2", "--checkpoint", str(img2img_checkpoints["digits-vary"]),
              "--steps", "2", "--upscale", "1", "--gap", "0", "--backend", "torch", "-q"])
    assert Image.open(out).size == (16, 8)
    assert capsys.readouterr().err == f"crossflow: note: {a}: resized from 4x4 to 8x8\n"  # said, on one line
    with pytest.raises(SystemExit) as e:
        cli.main(["upscale", str(tmp_path / "missing.png"), "-o", str(tmp_path / "x.png"),
                  "--checkpoint", str(img2img_checkpoints["digits-sr"])])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("crossflow: error: no such image file") and err.count("\n") == 1


def test_cli_upscale_refuses_an_image_at_its_output_size(img2img_checkpoints, tmp_path, cli_fails):
    """An 8x8 digit was averaged to 4x4 and came back worse than it went in: now refused, before the model loads."""
    png = _png(tmp_path / "eight.png", 8)
    err = cli_fails(["upscale", png, "-o", str(tmp_path / "up.png"), "--checkpoint",
                     str(img2img_checkpoints["digits-sr"])], 1)
    assert f"{png} is 8x8 already" in err and not (tmp_path / "up.png").exists()


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
