"""Image I/O of the pipelines: files and PIL images in, tensors (B, C, H, W) in [-1, 1] and PIL images out.

    open_image(path)                  one file, decoded now; errors name the file
    to_grey(im)                       any PIL mode -> 8-bit grey, ink bright on a dark ground (the digits' convention)
    read_grey(paths, size)            files -> grey PIL images and one line per file saying what was converted
    load_images(items, channels, size)  files or PIL images -> (N, channels, size, size) in [-1, 1]: the one loader
    from_pil / to_pil / resize        PIL <-> tensors, and any grey batch to a size
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F


LIGHT_GROUND = 0.6  # a border this bright on average (fraction of white): dark ink on a light ground, so inverted


def check_images(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1 or not x.dtype.is_floating_point:
        got = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected grey images (B, 1, H, W), floating point in [-1, 1], got {got}")
    return x


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Any grey image batch to size x size: area average when shrinking, bicubic (clamped) when enlarging."""
    x = check_images(x, "resize")
    if x.shape[-2:] == (size, size):
        return x
    if x.shape[-1] >= size and x.shape[-2] >= size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def open_image(path: Any):
    """One image file, opened and decoded now; an error names the file (missing, a folder, unreadable, truncated)."""
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not an image file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image file: {path}") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, EOFError) as e:  # e.g. "image file is truncated"
        raise ValueError(f"{path}: cannot read the image ({e})") from None


def to_grey(im: Any, invert_light_ground: bool = True) -> tuple[Any, list[str]]:
    """A PIL image of any mode -> (an 8-bit grey "L" image with the ink bright on a dark ground, as the digits models
    read it; what was converted, in words). 16- and 32-bit grey is scaled to 8 bits (`convert("L")` would clip it to
    black and white); transparent pixels are the ground and opaque ones the ink (ink drawn in the alpha channel);
    colour becomes grey (ITU-R 601 luma, as `convert("L")`); with `invert_light_ground`, an image whose border is
    light on average (>= LIGHT_GROUND) is inverted. An 8-bit grey image with a dark border comes back unchanged."""
    import numpy as np
    from PIL import Image

    notes: list[str] = []
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        full = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if full > 255:
            notes.append("16-bit grey scaled to 8 bits")
        grey, alpha = np.clip(a * (255.0 / full), 0, 255), None
    else:
        alpha = np.asarray(im.getchannel("A"), dtype=np.float64) / 255 if "A" in im.getbands() else None
        if im.mode not in ("1", "L", "LA", "La"):
            rgb = np.asarray(im.convert("RGB"))
            if (rgb != rgb[..., :1]).any():
                notes.append("colour converted to grey")
        grey = np.asarray(im.convert("L"), dtype=np.float64)
    if alpha is not None and alpha.min() < 1:
        # the ink is where the drawing is opaque: over a ground of the other brightness, dark ink made bright
        ink = float((grey * alpha).sum() / alpha.sum()) if alpha.sum() > 0 else 255.0
        if ink < 127.5:
            grey = 255 - grey
        grey = alpha * grey
        notes.append("ink read from the transparency" + (" (dark ink made bright)" if ink < 127.5 else ""))
    if invert_light_ground:
        ring = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
        if ring.mean() >= LIGHT_GROUND * 255:
            grey = 255 - grey
            notes.append("inverted (dark ink on a light ground; the model reads bright ink on a dark one)")
    if not notes and im.mode == "L":
        return im, notes
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L"), notes


def read_grey(paths: Any, size: int, max_size: int | None = None) -> tuple[list, list[str]]:
    """Image files -> (8-bit grey PIL images as `to_grey` reads them, one line per file saying what was converted,
    resizing to `size` x `size` included). `max_size`: an image with a side at or above it is refused (ValueError
    naming the file), for a model that makes images of that size out of smaller ones."""
    images, lines = [], []
    for path in paths:
        im, notes = to_grey(open_image(path))
        h, w = im.height, im.width
        if max_size is not None and max(h, w) >= max_size:
            raise ValueError(f"{path} is {h}x{w} already: this model makes {max_size}x{max_size} images out of "
                             f"{size}x{size} ones, so it would only make the image smaller and blurrier; give an "
                             f"image under {max_size}x{max_size} px (`crossflow vary` redraws an 8x8 digit)")
        if (h, w) != (size, size):
            notes.append(f"resized from {h}x{w} to {size}x{size}")
        if notes:
            lines.append(f"{path}: " + ", ".join(notes))
        images.append(im)
    return images, lines


def from_pil(images: Any) -> list[torch.Tensor]:
    """PIL images (any mode and size; read as `to_grey` reads them, without its inversion) -> a list of
    (1, 1, H, W) tensors in [-1, 1]; sizes may differ, so `ImagePipeline` resizes each."""
    import numpy as np

    grey = [to_grey(im, invert_light_ground=False)[0] for im in images]
    return [torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)[None, None] for im in grey]


def to_pil(images: torch.Tensor) -> list:
    """(B, C, H, W) images in [-1, 1] -> PIL images: 1 channel -> mode "L", 3 channels -> "RGB"."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"to_pil: expected (B, 1 | 3, H, W) images, got {tuple(images.shape)}")
    u8 = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    u8 = u8.permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    if images.shape[1] == 1:
        u8 = u8[..., 0]  # (B, H, W): uint8 2-D arrays become mode "L", (H, W, 3) ones "RGB"
    return [Image.fromarray(a) for a in u8]


def load_images(paths: Sequence[Any], channels: int, size: int) -> torch.Tensor:
    """Image files (or PIL images) -> (N, channels, size, size) float32 in [-1, 1] (bilinear resize). One channel:
    files are read as `img2img.to_grey` reads them (16-bit scaled, ink in the alpha channel, a light ground inverted),
    PIL images as `convert("L")`; three: RGB. OSError/ValueError name the file that cannot be read."""
    import numpy as np
    from PIL import Image

    out = []
    for p in paths:
        im = p if isinstance(p, Image.Image) else open_image(p)
        if channels == 1 and not isinstance(p, Image.Image):
            im = to_grey(im)[0]
        im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).view(size, size, channels)
        out.append(t.permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)
