"""The `crossflow` command end to end on tiny settings: train (digits data, 2 steps), sample, interpolate, eval; its
errors (one line, exit 2 for usage and 1 at run time), its output formats and its start-up cost (no heavy import
before a verb needs it)."""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import crossflow_kernels
from crossflow import cli

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "diffusers", "triton", "crossflow_kernels", "crossflow.pipelines.text_to_image")


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra)
    env.pop("CROSSFLOW_DEBUG", None)
    return env


def _run(*argv, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crossflow.cli", *argv], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


class _TTY(io.StringIO):
    def isatty(self) -> bool:  # tqdm draws its bar only on a terminal
        return True


@pytest.fixture(scope="module")
def tiny_digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # The digits recipe with a 2-step budget: real data, real MiniLM, the real trainer; --backend torch for speed
    # (the kernels themselves are covered by tests/crossflow_kernels).
    cli.main(["train", "--preset", "digits", "--out", str(out), "--steps", "2", "--batch-size", "4",
              "--backend", "torch", "--quiet", "--log-every", "1"])
    assert (out / "final" / "model.safetensors").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    return out / "final"


@pytest.fixture
def ckpt_copy(tiny_digits_run, tmp_path):
    """A copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_digits_run, tmp_path / "ckpt"))


# ---------------------------------------------------------------------------------------------------------------------
# The verbs
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_sample_writes_a_png_grid_with_gaps(tiny_digits_run, tmp_path):
    png = tmp_path / "grid.png"
    cli.main(["sample", "a handwritten seven", "the digit 3", "-o", str(png), "--n", "3", "--steps", "2",
              "--checkpoint", str(tiny_digits_run), "--backend", "torch", "--upscale", "2", "--gap", "1", "-q"])
    im = Image.open(png)
    assert im.format == "PNG" and im.mode == "L"
    assert im.size == ((3 * 16 + 2) * 2, (2 * 16 + 1) * 2)
    assert im.getpixel((16 * 2, 0)) == 255 and im.getpixel((0, 16 * 2)) == 255  # the gap column and row are white


@pytest.mark.parametrize("ext, fmt", [(".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP"), (".png", "PNG")])
def test_cli_output_format_follows_the_extension(tiny_digits_run, tmp_path, ext, fmt):
    out = tmp_path / f"seven{ext}"
    cli.main(["sample", "a handwritten seven", "-o", str(out), "--steps", "1", "--checkpoint", str(tiny_digits_run),
              "--backend", "torch", "-q"])
    assert Image.open(out).format == fmt


def test_cli_sampler_picks_the_solver(tmp_path):
    # the shipped model (a barely trained one's field is nearly constant, where every solver agrees)
    common = ["--steps", "2", "--backend", "torch", "--upscale", "1", "-q"]
    outs = {}
    for name in (None, "euler", "midpoint", "dpm++"):
        out = tmp_path / f"{name}.png"
        cli.main(["sample", "a handwritten one", "-o", str(out), *common, *(["--sampler", name] if name else [])])
        outs[name] = Image.open(out).tobytes()
    assert outs[None] == outs["midpoint"]  # the shipped sampling.json names midpoint
    assert outs["midpoint"] != outs["euler"] and outs["dpm++"] not in (outs["euler"], outs["midpoint"])


def test_cli_interpolate_uses_the_pipeline(tiny_digits_run, tmp_path):
    """The strip's first frame is exactly `sample PROMPT_A` at the same seed: one code path from latents to pixels."""
    strip, one = tmp_path / "strip.png", tmp_path / "one.png"
    common = ["--steps", "2", "--checkpoint", str(tiny_digits_run), "--backend", "torch", "--upscale", "1", "--gap",
              "0", "--seed", "5", "-q"]
    cli.main(["interpolate", "a handwritten one", "a handwritten seven", "-o", str(strip), "--frames", "3", *common])
    cli.main(["sample", "a handwritten one", "-o", str(one), *common])
    s = Image.open(strip)
    assert s.size == (5 * 16, 16)
    assert s.crop((0, 0, 16, 16)).tobytes() == Image.open(one).tobytes()


def test_cli_arithmetic_samples_the_combined_text_latents(tiny_digits_run, tmp_path, torch_backend):
    """`arithmetic A - B + C` draws exactly the pipeline's images from latent_arithmetic(VE(A), VE(C), VE(B)), every
    term with the seed's noise, and they differ from plain `sample A`."""
    from crossflow.pipelines.text_to_image import CrossFlowPipeline
    from crossflow.sampling import latent_arithmetic

    out, one = tmp_path / "arith.png", tmp_path / "one.png"
    common = ["--steps", "2", "--checkpoint", str(tiny_digits_run), "--backend", "torch", "--upscale", "1", "--gap",
              "0", "--seed", "3", "-q"]
    cli.main(["arithmetic", "number seven, written by hand", "-", "seven", "+", "three", "-o", str(out), "--n", "2",
              *common])
    got = Image.open(out)
    assert got.size == (2 * 16, 16)
    pipe = CrossFlowPipeline.from_pretrained(tiny_digits_run)
    z = {p: pipe.encode_prompts(p, 2, generator=torch.Generator().manual_seed(3))
         for p in ("number seven, written by hand", "seven", "three")}
    with crossflow_kernels.use_backend("torch"):
        want = pipe(z0=latent_arithmetic(z["number seven, written by hand"], z["three"], z["seven"]), steps=2)
    for i, im in enumerate(want):
        assert got.crop((16 * i, 0, 16 * (i + 1), 16)).tobytes() == im.tobytes()
    cli.main(["sample", "number seven, written by hand", "-o", str(one), "--n", "2", *common])
    assert Image.open(one).tobytes() != got.tobytes()


def test_cli_eval_reports_and_exits_1_on_fail(tiny_digits_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as e:  # an untrained model misses the targets
        cli.main(["eval", "--checkpoint", str(tiny_digits_run), "--per-prompt", "2", "--steps", "2", "--backend",
                  "torch", "--json", str(out), "--quiet"])
    assert e.value.code == 1
    res = json.loads(out.read_text())
    assert 0.0 <= res["accuracy"] <= 1.0 and res["diversity"] > 0
    assert res["speckle"] == pytest.approx(res["background_std"] / res["background_std_real"])
    assert 0.04 < res["background_std_real"] < 0.05  # real held-out digits, whatever the model
    assert res["samples"] == 10 * 4 * 2 and res["classifier_accuracy_on_real"] > 0.95
    assert capsys.readouterr().out.rstrip().endswith(": FAIL")


def test_cli_eval_exits_0_on_pass(tiny_digits_run, monkeypatch, capsys):
    from crossflow.digits import eval as judge

    res = {"accuracy": 0.99, "diversity": 0.85, "speckle": 1.5}  # exactly at the bars
    monkeypatch.setattr(judge, "evaluate", lambda *a, **k: dict(res))
    assert cli.main(["eval", "--checkpoint", str(tiny_digits_run), "--backend", "torch", "-q"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": PASS")
    for key, worse in (("accuracy", 0.985), ("diversity", 0.84), ("speckle", 1.51)):  # each bar alone fails the eval
        monkeypatch.setattr(judge, "evaluate", lambda *a, worse=worse, key=key, **k: {**res, key: worse})
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", "--checkpoint", str(tiny_digits_run), "--backend", "torch", "-q"])
        assert e.value.code == 1
        out = capsys.readouterr().out.rstrip()
        assert out.endswith(": FAIL") and out.count("MISSED") == 1, out


def test_cli_progress_bar_on_a_terminal_only(tiny_digits_run, tmp_path, monkeypatch):
    argv = ["sample", "a handwritten seven", "-o", str(tmp_path / "a.png"), "--steps", "3", "--checkpoint",
            str(tiny_digits_run), "--backend", "torch"]
    for extra, shown in (([], True), (["--quiet"], False)):
        tty = _TTY()
        monkeypatch.setattr(sys, "stderr", tty)
        cli.main(argv + extra)
        err = tty.getvalue()
        assert ("sampling" in err and "/3 " in err) == shown, err
        assert "Loading weights" not in err  # transformers' loading bar is silenced


def test_cli_entry_point_subprocess(tiny_digits_run, tmp_path):
    png = tmp_path / "one.png"
    r = _run("sample", "a handwritten two", "-o", str(png), "--steps", "2", "--checkpoint", str(tiny_digits_run),
             "--backend", "torch")
    assert r.returncode == 0, r.stderr
    assert png.is_file() and "wrote" in r.stdout
    assert r.stderr == ""  # not a terminal: no progress bar, and no library loading noise


# ---------------------------------------------------------------------------------------------------------------------
# Errors: usage (exit 2) and run time (exit 1), one line each, never a traceback
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, match", [
    (["sample", "x", "--steps", "0"], "--steps: must be >= 1"),
    (["sample", "x", "--backend", "fast"], "--backend: invalid choice"),
    (["sample", "   "], "PROMPT: a prompt must not be empty"),
    (["sample", ""], "PROMPT: a prompt must not be empty"),
    (["interpolate", "one", " "], "PROMPT_B: a prompt must not be empty"),
    (["arithmetic", "seven"], "at least one '+ PROMPT' or '- PROMPT'"),
    (["arithmetic", "seven", "-"], "the operator '-' at the end has no prompt"),
    (["arithmetic", "seven", "*", "one"], "expected '+' or '-' between prompts, got '*', not an operator"),
    (["arithmetic", "seven", "three"], "got 'three', a prompt, not an operator: write 'seven' + 'three' or"),
    (["arithmetic", "a", "-", "b", "c"], "got 'c', a prompt, not an operator: write 'b' + 'c' or 'b' - 'c'"),
    (["arithmetic", "seven", "+", "  "], "prompt 2 is '  '"),
    (["arithmetic", "a", "-", "b", "-o", "x.gif"], "the extension names the image format"),
    (["sample", "x", "--guidance", "-1"], "--guidance: must be a finite number >= 0"),
    (["sample", "x", "--guidance", "nan"], "--guidance: must be a finite number >= 0"),
    (["sample", "x", "--upscale", "20000"], "--upscale: must be in 1..16"),
    (["sample", "x", "-o", "x.gif"], "the extension names the image format"),
    (["sample", "x", "-o", "noext"], "the extension names the image format"),
    (["sample", "x", "-o", "."], "is a directory"),
    (["eval", "--preset", "tiny"], "invalid choice"),
    (["sample", "x", "--sampler", "ddim"], "invalid choice"),
    (["eval", "--per-prompt", "1"], "--per-prompt: must be >= 2"),
    (["bogus"], "invalid choice"),
    ([], "required"),
])
def test_cli_usage_errors_exit_2_in_one_line(argv, match, cli_fails):
    assert match in cli_fails(argv, 2)


def test_usage_errors_are_caught_before_anything_heavy_is_imported():
    """Argument errors (and so everything checked before sampling: format, prompt, guidance, upscale) are answered
    by the parser alone; --help and the parser import no torch, transformers, diffusers or triton."""
    code = ("import sys\nfrom crossflow import cli\ncli.build_parser().format_help()\n"
            "for argv in (['sample', 'x', '--upscale', '20000'], ['sample', 'x', '-o', 'x.gif'], ['--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_help_lists_every_verb_and_shows_defaults():
    r = _run("--help", timeout=60)
    assert r.returncode == 0
    for verb in ("sample", "interpolate", "arithmetic", "train", "eval", "convert"):
        assert verb in r.stdout
    sample_help = _run("sample", "--help", timeout=60).stdout
    assert "(default: 4)" in sample_help and "(default: samples.png)" in sample_help and "(default: 0)" in sample_help


def test_backend_names_match_kernels():
    assert cli.BACKENDS == crossflow_kernels.BACKENDS


def test_triton_backend_on_a_cpu_machine_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    env = _env()
    env.pop("TRITON_INTERPRET", None)  # a user's machine: no interpreter
    r = _run("sample", "x", "--backend", "triton", "--device", "cpu", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("crossflow: error: --backend triton cannot run on cpu")


def test_existing_directory_as_output(tmp_path, cli_fails):
    (tmp_path / "out.png").mkdir()
    assert "is a directory" in cli_fails(["sample", "x", "-o", str(tmp_path / "out.png")], 2)


def test_missing_checkpoint(cli_fails):
    assert "no checkpoint directory at /nonexistent/ckpt" in cli_fails(
        ["sample", "x", "--checkpoint", "/nonexistent/ckpt"], 1)


def test_checkpoint_without_config(ckpt_copy, cli_fails):
    (ckpt_copy / "config.json").unlink()
    assert "has no config.json" in cli_fails(["sample", "x", "--checkpoint", str(ckpt_copy), "-q"], 1)


@pytest.mark.parametrize("name, text", [("config.json", "{not json"), ("config.json", '{"depth": "four"}'),
                                        ("sampling.json", "{not json"), ("sampling.json", '{"steps": -3}'),
                                        ("sampling.json", "[50, 7]")])
def test_corrupt_json_names_the_file(ckpt_copy, name, text, cli_fails):
    (ckpt_copy / name).write_text(text)
    err = cli_fails(["sample", "x", "--checkpoint", str(ckpt_copy), "--backend", "torch", "-q"], 1)
    assert str(ckpt_copy / name) in err


def test_truncated_safetensors_names_the_file(ckpt_copy, cli_fails):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = cli_fails(["sample", "x", "--checkpoint", str(ckpt_copy), "--backend", "torch", "-q"], 1)
    assert str(f) in err


def test_flipped_byte_in_the_weights_names_the_file(ckpt_copy, tmp_path, cli_fails):
    """A byte flipped in the tensor data still parses; the checkpoint's checksums catch it."""
    f = ckpt_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01  # tensor data, not the header: the file still parses
    f.write_bytes(bytes(data))
    err = cli_fails(["sample", "x", "--checkpoint", str(ckpt_copy), "--backend", "torch", "-q", "-o",
                  str(tmp_path / "x.png")], 1)
    assert not (tmp_path / "x.png").exists()
    assert str(f) in err or "model.safetensors" in err


def test_device_cuda_without_cuda(cli_fails):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert "CUDA is not available" in cli_fails(["sample", "x", "--device", "cuda"], 2)
    assert "--device: " in cli_fails(["sample", "x", "--device", "gpu0"], 2)


def test_train_device_cuda_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    r = _run("train", "--preset", "tiny", "--steps", "1", "--device", "cuda", "--out", str(tmp_path / "r"), "--quiet")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr  # as `crossflow sample --device cuda`
    assert r.stderr.startswith("crossflow train: error: ") and "cuda" in r.stderr.lower()


def test_train_validation_error_is_a_usage_error(tmp_path):
    """A value the training config refuses: one line, exit 2."""
    r = _run("train", "--preset", "tiny", "--steps", "0", "--out", str(tmp_path / "r"), timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("crossflow train: error: ") and "steps" in r.stderr


def test_train_unknown_flag_is_one_line(tmp_path):
    """argparse's own errors in the training parser: one line naming the flag, exit 2 (no usage block)."""
    r = _run("train", "--preset", "tiny", "--no-such-flag", "--out", str(tmp_path / "r"), timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("crossflow train: error: ") and "--no-such-flag" in r.stderr


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("CROSSFLOW_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        cli.main(["sample", "x", "--checkpoint", "/nonexistent/ckpt"])


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every way a verb loads a model raises AssertionError (not a user error: it escapes `cli.main` as itself)."""
    from crossflow.pipelines.image import ImagePipeline
    from crossflow.models.model import CrossFlow
    from crossflow.pipelines.text_to_image import CrossFlowPipeline
    from crossflow.pipelines.caption import CaptionPipeline

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    for cls in (CrossFlow, CrossFlowPipeline, CaptionPipeline, ImagePipeline):
        monkeypatch.setattr(cls, "from_pretrained", loaded)


def _digit_png(path, size=16, mode="L") -> str:
    Image.new(mode, (size, size)).save(path)
    return str(path)


@pytest.mark.parametrize("argv, code, match", [
    (["sample", "x", "-o", "{locked}/a.png"], 2, "the folder {locked} is not writable"),
    (["sample", "x", "-o", "{file}/a.png"], 2, "{file} is a file, not a folder"),
    (["eval", "--json", "{locked}/r.json"], 2, "the folder {locked} is not writable"),
    (["upscale", "{four}", "-o", "{locked}/up.png"], 2, "the folder {locked} is not writable"),
    (["caption", "{tmp}/missing.png"], 1, "no such image file: {tmp}/missing.png"),
    (["caption", "{tmp}"], 1, "{tmp} is a directory, not an image file"),
    (["caption", "{png}", "{truncated}"], 1, "{truncated}: cannot read the image (image file is truncated"),
    (["upscale", "{tmp}"], 1, "{tmp} is a directory"),
    (["upscale", "{png}"], 1, "{png} is 16x16 already"),
    (["vary", "{tmp}/missing.png"], 1, "no such image file"),
    (["caption", "{png}", "--device", "cuda"], 2, "CUDA is not available"),
    (["sample", "x", "--n", "1000"], 2, "--n: the grid of 1000 images would be 71992x64 px"),
    (["sample", "x", "y", "--n", "200", "--upscale", "16"], 2, "--n: the grid of 400 images"),
    (["interpolate", "x", "y", "--frames", "5000"], 2, "--frames: the grid of 5002 images"),
    (["upscale", "{four}", "--n", "3000"], 2, "--n: the grid of 3000 images"),
])
def test_inputs_outputs_and_options_are_checked_before_the_model_loads(argv, code, match, tmp_path, monkeypatch,
                                                                      no_model_loads, cli_fails):
    """What a user got wrong is said at once, before any weights load (formerly: after the model, or after sampling
    in words about a hidden temporary file)."""
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    (tmp_path / "file.txt").write_text("x")
    truncated = tmp_path / "truncated.png"
    Image.fromarray((torch.rand(16, 16) * 255).to(torch.uint8).numpy()).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    names = dict(tmp=tmp_path, locked=locked, file=tmp_path / "file.txt", truncated=truncated,
                 png=_digit_png(tmp_path / "d.png"), four=_digit_png(tmp_path / "four.png", 4))
    assert match.format(**names) in cli_fails([a.format(**names) for a in argv], code)


def test_train_checks_its_preset_before_loading_the_trainer():
    code = ("import sys\nfrom crossflow import cli\n"
            "try:\n    cli.main(['train', '--preset', 'bogus'])\nexcept SystemExit as e:\n    print(e.code)\n"
            f"print(sorted(m for m in {HEAVY + ('crossflow.training.train',)!r} if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.stderr.startswith("crossflow train: error: unknown CrossFlow config 'bogus'"), r.stderr
    assert r.stdout.split("\n")[:2] == ["2", "[]"], r.stdout


def test_train_help_does_not_import_the_trainer():
    """`crossflow train --help` answers from the light parser (crossflow.training.train_config): no trainer, torch,
    kernels."""
    code = ("import sys\nfrom crossflow import cli\n"
            "try:\n    cli.main(['train', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            f"print(sorted(m for m in {HEAVY + ('crossflow.training.train',)!r} if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--lr-schedule" in r.stdout and r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_help_texts_agree_with_the_code():
    from crossflow.pipelines.base import default_checkpoint

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for verb, preset in (("caption", "digits-caption"), ("upscale", "digits-sr"), ("sample", "digits")):
        shipped = json.loads((Path(default_checkpoint(preset)) / "sampling.json").read_text())
        text = " ".join(sub[verb].format_help().split())
        assert f"the shipped model's: {shipped['guidance_scale']:g}; without one, its preset's, else 7" in text, (verb, text)
        assert f"the shipped model's: {shipped['steps']}; without one, its preset's, else 50" in text, (verb, text)
    text = " ".join(sub["eval"].format_help().split())
    assert "(default: the shipped weights of --preset)" in text and "shipped digits model" not in text
    for verb in ("sample", "interpolate"):  # every positional argument explains itself
        assert all(a.help for a in sub[verb]._actions if not a.option_strings), verb
    from crossflow.training.train_config import build_parser

    warmup = next(a.help for a in build_parser()._actions if "--warmup-steps" in a.option_strings)
    assert "then --lr-schedule" in warmup and "constant" not in warmup  # the digits recipe warms up into a cosine


# ---------------------------------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------------------------------


def test_small_models_sample_on_one_thread_large_ones_keep_the_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    small = torch.nn.Module()
    small.flow = torch.nn.Linear(100, 100)
    large = torch.nn.Module()
    large.flow = torch.nn.Linear(1, cli.SMALL_FLOW_WORK, device="meta")  # counted, never allocated
    cpu, before = torch.device("cpu"), torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cli._cap_threads(large, cpu, None)
        assert torch.get_num_threads() == 2
        cli._cap_threads(small, cpu, None, images=cli.SMALL_FLOW_WORK // 10_000)  # a big batch of a small model
        assert torch.get_num_threads() == 2
        cli._cap_threads(small, torch.device("cuda"), None)  # GPU work: CPU threads left alone
        assert torch.get_num_threads() == 2
        cli._cap_threads(small, cpu, 2)  # --threads wins
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # so does the user's environment
        cli._cap_threads(small, cpu, None)
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        cli._cap_threads(small, cpu, None)
        assert torch.get_num_threads() == 1
        cli._restore_threads()  # what main does on the way out: no leak into the calling process
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_package_exports_resolve_lazily():
    """`import crossflow` imports nothing heavy (checked above); each public name still resolves on first use."""
    import crossflow

    for name in crossflow.__all__:
        assert getattr(crossflow, name) is not None, name
    assert set(crossflow.__all__) <= set(dir(crossflow))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        crossflow.nope  # noqa: B018


def test_startup_benchmark_runs(tmp_path):
    """benchmarks/cli_startup.py end to end on its cheapest case (the timings themselves are not checked)."""
    from benchmarks import cli_startup

    out = tmp_path / "startup.json"
    res = cli_startup.main(["--before", str(REPO), "--runs", "2", "--warmup", "0", "--cases", "help", "--out",
                            str(out)])
    assert json.loads(out.read_text()) == res
    assert res["machine"]["nproc"] >= 1 and len(res["machine"]["loadavg_start"]) == 3
    for tree in ("before", "after"):
        stats = res["results"]["help"][tree]
        assert stats["n"] == 2 and all(r["returncode"] == 0 for r in stats["runs"])
        assert stats["min_s"] <= stats["median_s"] <= stats["max_s"]


def test_cold_sample_imports_no_compiler_stack_and_no_transformers(tmp_path):
    """The default `crossflow sample` (MiniLM text side, a DiT flow, CPU) needs torch, our modules and `tokenizers`
    only: triton (~0.25 s; none of its kernels can run on a CPU-only build without the interpreter), transformers
    (~2 s with its torch._dynamo / torch.distributed imports), torch._dynamo (pulled by init ops on the meta device)
    and torch._inductor (pulled by registering Triton custom ops) must stay out of a cold start."""
    png = tmp_path / "one.png"
    code = ("import sys\nfrom crossflow import cli\n"
            f"rc = cli.main(['sample', 'a handwritten seven', '--steps', '2', '-q', '-o', {str(png)!r}])\n"
            "import torch\nheavy = ['transformers', 'diffusers']\n"
            "if not torch.backends.cuda.is_built():  # a CUDA build loads triton and registers its ops (inductor)\n"
            "    heavy += ['triton', 'torch._dynamo', 'torch._inductor']\n"
            "print(rc, sorted(m for m in heavy if m in sys.modules))\n")
    env = _env()
    env.pop("TRITON_INTERPRET", None)  # a user's machine: the test session's interpreter switch would register ops
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0 []", r.stdout
    assert png.stat().st_size > 0


# verb arguments, checkpoint, what the message says the checkpoint is for
_MIXUPS = [
    (["vary", "IMG"], "digits-sr", "super-resolution checkpoint (preset digits-sr), for `crossflow upscale`"),
    (["upscale", "IMG"], "digits-vary", "image-variation checkpoint (preset digits-vary), for `crossflow vary IMAGE`"),
    (["sample", "a seven"], "digits-caption",
     "image-to-text checkpoint (preset digits-caption), for `crossflow caption`"),
    (["caption", "IMG"], "digits", "text-to-image checkpoint (preset digits), for `crossflow sample`"),
    (["vary", "--text", "a seven"], "digits-vary", "image-variation checkpoint"),
    (["eval", "--preset", "digits-sr"], "digits-vary", "image-variation checkpoint"),
]


@pytest.mark.parametrize("argv, preset, match", _MIXUPS, ids=[f"{a[0]}-{p}" for a, p, _ in _MIXUPS])
def test_a_checkpoint_for_another_verb_is_refused_at_once(argv, preset, match, cli_fails, tmp_path):
    from crossflow.pipelines.base import default_checkpoint

    Image.new("L", (8, 8)).save(tmp_path / "d.png")
    argv = [str(tmp_path / "d.png") if a == "IMG" else a for a in argv]
    assert match in cli_fails([*argv, "--checkpoint", default_checkpoint(preset)], 2)  # main: exit 0, or a late error


def test_the_task_check_reads_config_json_only_and_infers_an_unrecorded_task(tmp_path):
    """Before anything heavy is imported (in well under a second); a checkpoint written before config.json recorded
    its task gets the one its pairing implies."""
    from crossflow.checkpoint import write_checksums
    from crossflow.pipelines.base import default_checkpoint

    old = Path(shutil.copytree(default_checkpoint("digits-sr"), tmp_path / "old-sr"))
    cfg = json.loads((old / "config.json").read_text())
    del cfg["task"], cfg["preset"]
    (old / "config.json").write_text(json.dumps(cfg))
    write_checksums(old, ["config.json", "model.safetensors", "sampling.json"])
    Image.new("L", (8, 8)).save(tmp_path / "d.png")
    code = ("import sys\nfrom crossflow import cli\n"
            f"try:\n    cli.main(['vary', {str(tmp_path / 'd.png')!r}, '--checkpoint', {str(old)!r}])\n"
            "except SystemExit as e:\n    print(e.code)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["2", "[]"], (r.stdout, r.stderr)
    assert r.stderr.startswith(f"crossflow: error: {old} is a super-resolution checkpoint, for `crossflow upscale`")


def test_a_trained_checkpoint_samples_with_its_presets_settings(tiny_digits_run):
    from crossflow.config import SAMPLING
    from crossflow.pipelines.text_to_image import CrossFlowPipeline

    assert json.loads((tiny_digits_run / "sampling.json").read_text()) == SAMPLING["digits"]  # main: no sampling.json
    assert CrossFlowPipeline.from_pretrained(tiny_digits_run).sampling["guidance_scale"] == 1.5


def test_arithmetic_whose_terms_cancel_is_refused(cli_fails, tmp_path):
    err = cli_fails(["arithmetic", "seven", "-", "seven", "-o", str(tmp_path / "a.png"), "--backend", "torch"], 1)
    assert "the terms cancel out" in err and not (tmp_path / "a.png").exists()  # main: all-black images, exit 0


def test_a_full_disk_while_writing_the_image_is_one_line_naming_it(monkeypatch, tmp_path, cli_fails):
    import errno

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "a.png"
    err = cli_fails(["sample", "a seven", "-o", str(out), "--backend", "torch", "-q"], 1)
    assert err == f"crossflow: error: [Errno 28] No space left on device: '{out}'\n" and not os.listdir(tmp_path)


def test_a_checkpoint_older_than_manifests_samples_with_a_one_line_warning(ckpt_copy, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from crossflow.checkpoint import read_safetensors

    _, meta = read_safetensors(ckpt_copy / "model.safetensors")
    del meta["manifest"]  # as saved before checkpoints had a manifest
    save_file(load_file(ckpt_copy / "model.safetensors"), ckpt_copy / "model.safetensors", metadata=meta)
    (ckpt_copy / "checksums.sha256").unlink()
    cli.main(["sample", "x", "--checkpoint", str(ckpt_copy), "-o", str(tmp_path / "a.png"), "--backend", "torch",
              "--steps", "2", "-q"])
    err = capsys.readouterr().err
    assert err.startswith("crossflow: warning: ") and err.count("\n") == 1 and "loaded unverified" in err, err


def test_a_run_trained_before_sampling_json_gets_its_presets_settings(ckpt_copy):
    from crossflow.checkpoint import write_checksums
    from crossflow.config import SAMPLING
    from crossflow.pipelines.text_to_image import CrossFlowPipeline

    (ckpt_copy / "sampling.json").unlink()  # a digits run trained on main: no sampling.json, no preset recorded
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    del cfg["preset"], cfg["task"]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    write_checksums(ckpt_copy, ["config.json", "model.safetensors"])
    # its config is the digits preset's: its settings, not the sampler's 50 steps at guidance 7
    assert CrossFlowPipeline.from_pretrained(ckpt_copy).sampling == {"official_grid": False, **SAMPLING["digits"]}
