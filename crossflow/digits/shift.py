"""Shifted digits: translations at the digits' native 8x8 resolution, for augmentation and for evaluation (issue 22).

Conventions (every function here):
  * images are (N, 1, 8, 8) float in [-1, 1] (`crossflow.digits.data.load_native`); -1 is the background (0 ink);
  * a shift (dy, dx) moves the content dy pixels DOWN and dx pixels RIGHT (numpy's row/column order); what enters
    at the opposite border is the background value BACKGROUND, never the pixels that left (no wrap-around);
  * the 16x16 images are made from the shifted 8x8 exactly as `crossflow.digits.data.load_digits` makes its 16x16 data
    (`upsample16`: bilinear, align_corners False, on the [0, 1] grey scale): an unshifted image comes back
    bit-identical to the data set's.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

NATIVE = 8
BACKGROUND = -1.0  # the digits' background (grey level 0) in [-1, 1]


def _check8(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1 or not x.dtype.is_floating_point:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected grey images (N, 1, H, W) in [-1, 1], got {got}")
    return x


def shift(images: torch.Tensor, dy: int, dx: int, fill: float = BACKGROUND) -> torch.Tensor:
    """All images moved by the same integer (dy, dx): down by dy, right by dx; the uncovered border is `fill`. Any
    size works (it is a pure translation); for the digits, call it on the 8x8 originals."""
    x = _check8(images, "shift")
    dy, dx = int(dy), int(dx)
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        x[..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out


def shift_each(images: torch.Tensor, shifts: torch.Tensor, fill: float = BACKGROUND) -> torch.Tensor:
    """Image i moved by shifts[i] = (dy, dx): (N, 1, H, W), (N, 2) int -> (N, 1, H, W)."""
    x = _check8(images, "shift_each")
    shifts = torch.as_tensor(shifts, dtype=torch.long)
    if shifts.shape != (len(x), 2):
        raise ValueError(f"shift_each: expected shifts ({len(x)}, 2), got {tuple(shifts.shape)}")
    out = torch.empty_like(x)
    for s in torch.unique(shifts, dim=0):
        sel = (shifts == s).all(1)
        out[sel] = shift(x[sel], int(s[0]), int(s[1]), fill)
    return out


def upsample16(images8: torch.Tensor, size: int = 16) -> torch.Tensor:
    """8x8 digits in [-1, 1] -> size x size, bilinear in [0, 1] ink (`crossflow.digits.data.load_digits(size=size)` makes
    its data with it)."""
    x = _check8(images8, "upsample16")
    return F.interpolate((x + 1) / 2, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


def shift16(images8: torch.Tensor, dy: int, dx: int, size: int = 16) -> torch.Tensor:
    """The 16x16 (or `size`) data of the 8x8 digits shifted by (dy, dx) at 8x8: shift first, then resample."""
    return upsample16(shift(images8, dy, dx), size)


def random_shifts(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) integer shifts, dy and dx each uniform in [-k, k], from `generator` (k = 0: all zeros, no draw)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if k == 0:
        return torch.zeros(n, 2, dtype=torch.long)
    return torch.randint(-k, k + 1, (n, 2), generator=generator)


def augment(images8: torch.Tensor, k: int, generator: torch.Generator, size: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-shift augmentation: every image moved by its own shift uniform in [-k, k]^2 (seeded `generator`).
    Returns (images, shifts (N, 2)); images at 8x8, or resampled to `size` (16: the text-to-image/caption data)."""
    x = _check8(images8, "augment")
    s = random_shifts(len(x), k, generator)
    out = shift_each(x, s)
    return (out if size is None or size == x.shape[-1] else upsample16(out, size)), s


def ring(k: int, subset: str = "all") -> list[tuple[int, int]]:
    """The shifts with max(|dy|, |dx|) == k, in a fixed order (row-major over dy, dx): "all" (8k of them), or
    "compass" (the 8 shifts in {-k, 0, k}^2 other than (0, 0): four straight, four diagonal). k = 0: [(0, 0)]."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if subset not in ("all", "compass"):
        raise ValueError(f"subset must be 'all' or 'compass', got {subset!r}")
    if k == 0:
        return [(0, 0)]
    vals = range(-k, k + 1) if subset == "all" else (-k, 0, k)
    return [(dy, dx) for dy, dx in itertools.product(vals, vals) if max(abs(dy), abs(dx)) == k]


def shifted_set(images8: torch.Tensor, labels: torch.Tensor, k: int, subset: str = "all"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every image at every shift of `ring(k, subset)`: (images (M*N, 1, 8, 8), labels (M*N,), shifts (M*N, 2)),
    shift-major (the N images at the first shift, then at the second, ...). Resample with `upsample16` for 16x16."""
    x = _check8(images8, "shifted_set")
    if labels.shape != x.shape[:1]:
        raise ValueError(f"shifted_set: labels {tuple(labels.shape)} do not match images {tuple(x.shape)}")
    shifts = ring(k, subset)
    imgs = torch.cat([shift(x, dy, dx) for dy, dx in shifts])
    s = torch.tensor(shifts, dtype=torch.long).repeat_interleave(len(x), dim=0)
    return imgs, labels.repeat(len(shifts)), s
