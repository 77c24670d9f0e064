"""CrossFlowPipeline: prompts -> PIL images with the real MiniLM text encoder (bundled, offline) and a tiny model.

`tiny` has text_dim 32; here it is re-sized to MiniLM's 384-d tokens and a 1-channel pixel-space latent, so the
identity autoencoder's output is a grayscale image. Every test runs on the torch kernel backend: these test the
pipeline's plumbing (prompts, seeds, output types, loading); the kernels are tested on their own
(tests/crossflow_kernels) and the model's Triton path against torch in models/test_parity.py."""

import io
import sys

import pytest
import torch

from crossflow.encoders.autoencoder import build_autoencoder
from crossflow.config import CrossFlowConfig
from crossflow.models.model import CrossFlow
from crossflow.pipelines.text_to_image import CrossFlowPipeline
from crossflow.checkpoint import read_sampling, sampler_settings
from crossflow.pipelines.image_io import to_pil
from crossflow.sampling import EulerSampler
from crossflow.encoders.text_encoder import TextEncoder

pytestmark = pytest.mark.usefixtures("torch_backend")


@pytest.fixture(scope="module")
def pipe(perturb):
    torch.manual_seed(0)
    cfg = CrossFlowConfig.from_name("tiny").replace(text_dim=384, latent_channels=1)
    model = CrossFlow(cfg).eval()
    perturb(model.flow.final_layer, std=0.02)  # adaLN-Zero makes a fresh flow output exactly 0
    return CrossFlowPipeline(TextEncoder.from_config(cfg), model, build_autoencoder(cfg), EulerSampler(steps=2))


def test_prompts_to_pil_images(pipe):
    images = pipe(["a handwritten seven", "zero"], num_images_per_prompt=2, seed=0)
    assert len(images) == 4
    assert all(im.mode == "L" and im.size == (8, 8) for im in images)
    again = pipe(["a handwritten seven", "zero"], num_images_per_prompt=2, seed=0)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]  # the seed fixes the VE noise


def test_output_types_and_seeding(pipe):
    z = pipe("one", num_images_per_prompt=3, seed=1, output_type="latent")
    assert z.shape == (3, 1, 8, 8)
    assert not torch.equal(z[0], z[1])  # each image of a prompt gets its own VE noise
    g = torch.Generator().manual_seed(1)
    assert torch.equal(z, pipe("one", num_images_per_prompt=3, generator=g, output_type="latent"))
    pt = pipe("one", num_images_per_prompt=3, seed=1, output_type="pt")
    assert pt.shape == (3, 1, 8, 8) and pt.min() >= 0 and pt.max() <= 1
    torch.testing.assert_close(pt, (z.clamp(-1, 1) + 1) / 2)
    z0 = pipe.encode_prompts("one", 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, EulerSampler(steps=2)(pipe.model.flow, z0))


def test_from_pretrained_round_trip(pipe, tmp_path):
    pipe.model.save_pretrained(tmp_path)
    loaded = CrossFlowPipeline.from_pretrained(tmp_path, sampler=EulerSampler(steps=2))
    a = pipe("seven", seed=3, output_type="latent")
    assert torch.equal(a, loaded("seven", seed=3, output_type="latent"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[]), "prompts"),
    (dict(prompts=["ok", 3]), "prompts"),
    (dict(prompts="x", output_type="np"), "output_type"),
    (dict(prompts="x", seed=0, generator=torch.Generator()), "seed or generator"),
    (dict(prompts="x", num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(prompts="x", steps=0), "steps"),
])
def test_bad_input_raises(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_to_pil_modes():
    rgb = to_pil(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    assert rgb[0].mode == "RGB" and rgb[0].getpixel((0, 0)) == (0, 128, 255)
    with pytest.raises(ValueError, match="1 \\| 3"):
        to_pil(torch.zeros(1, 4, 2, 2))


def test_latents_in_are_the_prompt_path(pipe):
    """pipe(z0=...) is the same call from given start latents (what interpolation and arithmetic use)."""
    z0 = pipe.encode_prompts(["one", "seven"], 2, torch.Generator().manual_seed(4))
    from_prompts = pipe(["one", "seven"], num_images_per_prompt=2, seed=4, output_type="pt")
    torch.testing.assert_close(pipe(z0=z0, output_type="pt"), from_prompts, rtol=0, atol=0)
    assert len(pipe(z0=z0[:3])) == 3  # PIL by default, one image per latent


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "either prompts or z0"),
    (dict(prompts="x", z0=torch.zeros(1, 1, 8, 8)), "either prompts or z0"),
    (dict(z0=torch.zeros(1, 1, 8, 8), seed=0), "with z0 there is none"),
    (dict(z0=torch.zeros(1, 1, 8, 8), num_images_per_prompt=2), "with z0 there is none"),
    (dict(prompts=["ok", "  "]), "empty or whitespace"),
    (dict(prompts=""), "empty or whitespace"),
    (dict(prompts="x", guidance_scale=-1.0), "guidance_scale"),
])
def test_bad_latent_and_prompt_input_raises(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_counts_the_steps_on_a_terminal(pipe, monkeypatch):
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    pipe("one", steps=3, progress=True, output_type="latent")
    assert "sampling" in tty.getvalue() and "/3 " in tty.getvalue()
    quiet = _TTY()
    monkeypatch.setattr(sys, "stderr", quiet)
    pipe("one", steps=3, output_type="latent")  # progress is off by default
    assert quiet.getvalue() == ""


def test_sampling_defaults_names_a_bad_file(tmp_path):
    assert sampler_settings(read_sampling(tmp_path)) == {}
    (tmp_path / "sampling.json").write_text('{"steps": 20, "guidance_scale": 3.0, "other": 1}')
    assert sampler_settings(read_sampling(tmp_path)) == {"steps": 20, "guidance_scale": 3.0}
    for text in ("{oops", "[1, 2]", '{"guidance_scale": "high"}', '{"steps": 0}', '{"source_noise_scale": -1}'):
        (tmp_path / "sampling.json").write_text(text)
        with pytest.raises(ValueError, match=f"{tmp_path / 'sampling.json'}: invalid sampling settings"):
            sampler_settings(read_sampling(tmp_path))


def test_from_pretrained_applies_and_exposes_the_checkpoints_sampling_settings(pipe, tmp_path):
    pipe.model.save_pretrained(tmp_path, sampling={"steps": 3, "guidance_scale": 1.5})
    loaded = CrossFlowPipeline.from_pretrained(tmp_path)  # on main: 50 steps at guidance 7, sampling.json ignored
    assert loaded.sampling == {"steps": 3, "guidance_scale": 1.5, "official_grid": False, "method": "euler"}
    want = pipe("seven", seed=3, steps=3, guidance_scale=1.5, output_type="latent")
    torch.testing.assert_close(loaded("seven", seed=3, output_type="latent"), want)
    given = CrossFlowPipeline.from_pretrained(tmp_path, sampler=EulerSampler(steps=2))  # an explicit sampler wins
    assert given.sampling == {"steps": 2, "guidance_scale": 7.0, "official_grid": False, "method": "euler"}


def test_a_checkpoint_may_recommend_a_method_and_a_caller_may_name_another(pipe, tmp_path):
    from crossflow.scheduler_sampler import SchedulerSampler

    pipe.model.save_pretrained(tmp_path, sampling={"steps": 3, "guidance_scale": 1.5, "method": "midpoint"})
    loaded = CrossFlowPipeline.from_pretrained(tmp_path)
    assert loaded.sampling["method"] == "midpoint" and loaded.sampler.nfe() == 6
    want = CrossFlowPipeline(pipe.text_encoder, pipe.model, pipe.autoencoder,
                             EulerSampler(steps=3, guidance_scale=1.5, method="midpoint"))
    torch.testing.assert_close(loaded("seven", seed=3, output_type="latent"),
                               want("seven", seed=3, output_type="latent"))
    named = CrossFlowPipeline.from_pretrained(tmp_path, sampler="dpm++")  # the checkpoint's steps and guidance
    assert isinstance(named.sampler, SchedulerSampler) and named.sampler.resolve() == (3, 1.5)
    pipe.model.save_pretrained(tmp_path, sampling={"steps": 3, "method": "rk4"})
    with pytest.raises(ValueError, match="method must be one of"):
        CrossFlowPipeline.from_pretrained(tmp_path)


def test_every_pipeline_loads_the_shipped_settings():
    from crossflow.config import SAMPLING
    from crossflow.pipelines.image import ImagePipeline
    from crossflow.pipelines.base import default_checkpoint as digits
    from crossflow.pipelines.caption import CaptionPipeline
    from crossflow.pipelines.base import default_checkpoint

    plain = {"official_grid": False, "method": "euler"}
    assert CrossFlowPipeline.from_pretrained(digits()).sampling == {**plain, **SAMPLING["digits"]}
    assert CaptionPipeline.from_pretrained(default_checkpoint("digits-caption")).sampling == {
        **plain, **SAMPLING["digits-caption"]}
    for preset in ("digits-sr", "digits-vary"):
        assert ImagePipeline.from_pretrained(default_checkpoint(preset)).sampling == {**plain, **SAMPLING[preset]}


def test_a_checkpoint_of_another_task_is_refused_before_it_loads(monkeypatch):
    from crossflow.pipelines.image import ImagePipeline
    from crossflow.models.model import CrossFlow
    from crossflow.pipelines.caption import CaptionPipeline
    from crossflow.pipelines.base import default_checkpoint

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(CrossFlow, "from_pretrained", no_load)
    with pytest.raises(ValueError, match=r"digits-caption is an image-to-text checkpoint \(preset digits-caption\), "
                                         r"for `crossflow caption`.*`CrossFlowPipeline` needs a text-to-image"):
        CrossFlowPipeline.from_pretrained(default_checkpoint("digits-caption"))
    with pytest.raises(ValueError, match="is a text-to-image checkpoint .*`CaptionPipeline` needs an image-to-text"):
        CaptionPipeline.from_pretrained(default_checkpoint("digits"))
    with pytest.raises(ValueError, match="is a super-resolution checkpoint .*needs an image-variation checkpoint"):
        ImagePipeline.from_pretrained(default_checkpoint("digits-sr"), tasks=("image-variation",))
    with pytest.raises(ValueError, match="an image-to-text checkpoint .*needs a super-resolution or image-variation"):
        ImagePipeline.from_pretrained(default_checkpoint("digits-caption"))
