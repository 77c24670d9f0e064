"""The `crossflow` command end to end on tiny settings: train (digits data, 2 steps), sample, interpolate, eval."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from crossflow import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # The digits recipe with a 2-step budget: real data, real MiniLM, the real trainer; --backend torch for speed
    # (the kernels themselves are covered by tests/kernels).
    cli.main(["train", "--preset", "digits", "--out", str(out), "--steps", "2", "--batch-size", "4",
              "--backend", "torch", "--quiet", "--log-every", "1"])
    assert (out / "final" / "model.safetensors").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    return out / "final"


def test_cli_sample_writes_a_png_grid(tiny_digits_run, tmp_path):
    png = tmp_path / "grid.png"
    cli.main(["sample", "a handwritten seven", "the digit 3", "-o", str(png), "--n", "3", "--steps", "2",
              "--checkpoint", str(tiny_digits_run), "--backend", "torch", "--upscale", "2"])
    im = Image.open(png)
    assert im.size == (3 * 16 * 2, 2 * 16 * 2) and im.mode == "L"


def test_cli_interpolate_writes_a_strip(tiny_digits_run, tmp_path):
    png = tmp_path / "strip.png"
    cli.main(["interpolate", "a handwritten one", "a handwritten seven", "-o", str(png), "--frames", "3",
              "--steps", "2", "--checkpoint", str(tiny_digits_run), "--backend", "torch", "--upscale", "1"])
    assert Image.open(png).size == (5 * 16, 16)


def test_cli_eval_reports_accuracy_and_diversity(tiny_digits_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    cli.main(["eval", "--checkpoint", str(tiny_digits_run), "--per-prompt", "2", "--steps", "2", "--backend",
              "torch", "--json", str(out), "--quiet"])
    res = json.loads(out.read_text())
    assert 0.0 <= res["accuracy"] <= 1.0 and res["diversity"] > 0
    assert res["samples"] == 10 * 4 * 2 and res["classifier_accuracy_on_real"] > 0.95
    assert "accuracy" in capsys.readouterr().out  # the summary line (an untrained model FAILs the targets)


def test_cli_entry_point_subprocess(tiny_digits_run, tmp_path):
    png = tmp_path / "one.png"
    env = dict(os.environ, KERNELS_BACKEND="torch")
    r = subprocess.run([sys.executable, "-m", "crossflow.cli", "sample", "a handwritten two", "-o", str(png),
                        "--steps", "2", "--checkpoint", str(tiny_digits_run)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert png.is_file() and "wrote" in r.stdout


@pytest.mark.parametrize("argv, match", [
    (["sample", "x", "--checkpoint", "/nonexistent/ckpt"], "no checkpoint at /nonexistent/ckpt"),
    (["sample", "x", "--steps", "0"], "--steps must be positive"),
    (["sample", "x", "--backend", "fast"], "--backend must be one of"),
    (["eval", "--preset", "tiny"], "digits preset only"),
])
def test_cli_bad_arguments(argv, match):
    with pytest.raises(SystemExit, match=match):
        cli.main(argv)


def test_cli_sample_needs_a_prompt(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sample"])
    assert "PROMPT" in capsys.readouterr().err
