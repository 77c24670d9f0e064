"""The README's pictures of the image -> image tasks, from the shipped weights, on held-out digits (one per class):

    python benchmarks/img2img_figures.py sr     # docs/digits_sr.png: rows 4x4 input, bicubic, two CrossFlow samples,
                                                # the mean of 32 (`crossflow eval`'s posterior mean), real 8x8
    python benchmarks/img2img_figures.py vary   # docs/digits_vary.png: per row the input, then 6 variations
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import crossflow_kernels
from crossflow.cli import GRID_GAP, save_grid
from crossflow.pipelines.image_io import to_pil
from crossflow.pipelines.base import default_checkpoint
from crossflow.digits import data
from crossflow.pipelines import image as img2img
from crossflow.digits import eval as judge

DOCS = Path(__file__).resolve().parents[1] / "docs"


def held_out_examples() -> torch.Tensor:
    """The first held-out image of each digit 0..9: (10, 1, 8, 8) in [-1, 1]."""
    real, y = data.load_native("test")
    return torch.stack([real[int(torch.nonzero(y == k)[0])] for k in range(10)])


def main(task: str) -> None:
    torch.set_num_threads(1)
    real = held_out_examples()
    with crossflow_kernels.use_backend("torch"):
        if task == "sr":
            pipe = img2img.ImagePipeline.from_pretrained(default_checkpoint("digits-sr"))
            low = data.downsample(real)
            two = pipe.images(low, num_images_per_image=2, seed=0).view(10, 2, 1, 8, 8)
            rows = [torch.nn.functional.interpolate(low, size=8, mode="nearest"), judge.bicubic(low), two[:, 0],
                    two[:, 1], pipe.posterior_mean(low, judge.POSTERIOR_SAMPLES, seed=0), real]
            out, n_rows = DOCS / "digits_sr.png", 6
        elif task == "vary":
            pipe = img2img.ImagePipeline.from_pretrained(default_checkpoint("digits-vary"))
            var = pipe.vary(real, n=6).view(10, 6, 1, 8, 8)
            rows = [torch.cat([real[:, None], var], dim=1).flatten(0, 1)]
            out, n_rows = DOCS / "digits_vary.png", 10
        else:
            raise SystemExit(f"usage: {sys.argv[0]} sr|vary")
    save_grid(to_pil(torch.cat(rows)), rows=n_rows, out=str(out), upscale=8, gap=GRID_GAP)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
