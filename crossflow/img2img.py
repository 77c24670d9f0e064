"""Image -> image on the real 8x8 digits: super-resolution (4x4 -> 8x8) and image variation (a digit -> the same
digit in another hand). Data and the numbers that judge them; the model is the shared CrossFlow.

Resolution: both tasks work at 8x8, the resolution of scikit-learn's originals. The text-to-image data are bilinear
upsamples of them to 16x16, which adds no information (8x8 -> 16x16 super-resolution would be degenerate), so the
target here is the real 8x8 digit itself. The 4x4 input is its 2x2 area average (`downsample`).

Judges, all on the held-out 20 % (the split of `crossflow.digits`, images never seen in training):
  * PSNR against the real 8x8 on the [0, 1] grey scale, per image, averaged; the baseline is bicubic upsampling of the
    same 4x4 (about 13.4 dB);
  * an independent classifier: an RBF SVC trained on the real 8x8 training split (99.7 % on real held-out 8x8); the
    same kind of classifier trained on the 4x4 images gives the scale of what the 4x4 input allows;
  * variation: the label kept, and the L2 distance to the input against the mean distance between two real held-out
    digits of the same class (not copies: at least 0.4 of it; the same digit: at most 1.0).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

NATIVE = 8  # the originals' resolution: the target of both tasks
LOW = 4  # super-resolution input
SR_PSNR_GAIN_DB = 2.0  # acceptance: PSNR >= bicubic + 2 dB
SR_ACCURACY = 0.88  # ... and the 8x8 classifier labels >= 88 % of outputs correctly
VARY_LABEL_KEPT = 0.95  # variation: the classifier keeps the label for >= 95 %
VARY_DISTANCE = (0.4, 1.0)  # ... at a mean distance to the input of 0.4x to 1.0x the same-class real distance


def load_native(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The real 8x8 digits (N, 1, 8, 8) in [-1, 1] and labels (N,), split as `crossflow.digits.load_images`."""
    from crossflow.digits import load_images

    return load_images(split, size=NATIVE)


def _check_images(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1 or not x.dtype.is_floating_point:
        got = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected grey images (B, 1, H, W), floating point in [-1, 1], got {got}")
    return x


def downsample(x: torch.Tensor, size: int = LOW) -> torch.Tensor:
    """Area average to size x size: (B, 1, H, W) -> (B, 1, size, size); 8 -> 4 is the mean of each 2x2 block."""
    x = _check_images(x, "downsample")
    return F.interpolate(x, size=(size, size), mode="area")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Any grey image batch to size x size: area average when shrinking, bicubic (clamped) when enlarging."""
    x = _check_images(x, "resize")
    if x.shape[-2:] == (size, size):
        return x
    if x.shape[-1] >= size and x.shape[-2] >= size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def bicubic(x: torch.Tensor, size: int = NATIVE) -> torch.Tensor:
    """The baseline: bicubic upsampling (align_corners=False), clamped to [-1, 1]."""
    x = _check_images(x, "bicubic")
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def psnr(pred: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on the [0, 1] grey scale (images given in [-1, 1]; pred clamped): (B,)."""
    if pred.shape != real.shape:
        raise ValueError(f"psnr: pred {tuple(pred.shape)} and real {tuple(real.shape)} differ")
    a, b = (pred.double().clamp(-1, 1) + 1) / 2, (real.double() + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@functools.lru_cache(maxsize=4)
def classifier(size: int = NATIVE):
    """An RBF SVC (C = 10, gamma "scale", as `crossflow.digits.train_classifier`) trained on the real training
    split at size x size (8: the originals; 4: their area averages). Returns (classifier, held-out accuracy)."""
    from sklearn.svm import SVC

    xtr, ytr = load_native("train")
    xte, yte = load_native("test")
    if size != NATIVE:
        xtr, xte = resize(xtr, size), resize(xte, size)
    clf = SVC(C=10.0, gamma="scale").fit(xtr.flatten(1).numpy(), ytr.numpy())
    return clf, float((clf.predict(xte.flatten(1).numpy()) == yte.numpy()).mean())


def predict(x: torch.Tensor, size: int = NATIVE) -> torch.Tensor:
    """The size x size classifier's labels for images (B, 1, size, size) in [-1, 1] (clamped): (B,) long."""
    x = _check_images(x, "predict")
    if x.shape[-2:] != (size, size):
        raise ValueError(f"predict: the {size}x{size} classifier needs {size}x{size} images, got {tuple(x.shape)}")
    clf, _ = classifier(size)
    return torch.as_tensor(clf.predict(x.detach().float().cpu().clamp(-1, 1).flatten(1).numpy()))


def same_class_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance between two different real images of each class: (10,) float64, from images x (N, ...)."""
    flat = x.flatten(1).double()
    d = torch.cdist(flat, flat)
    out = torch.zeros(10, dtype=torch.float64)
    for k in range(10):
        idx = torch.nonzero(y == k).flatten()
        n = len(idx)
        if n < 2:
            raise ValueError(f"same_class_distance: class {k} has {n} image(s); pairs need two")
        out[k] = d[idx][:, idx].sum() / (n * (n - 1))
    return out


def _batched(fn: Callable[..., torch.Tensor], x: torch.Tensor, batch_size: int, **kw) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size], **kw).detach().float().cpu() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def evaluate_upscale(upscale: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 512,
                     limit: int | None = None) -> dict[str, Any]:
    """Judge `upscale(low (B, 1, 4, 4) in [-1, 1]) -> (B, 1, 8, 8) in [-1, 1]` on the held-out split (the first
    `limit` images when given): PSNR against the real 8x8 and the 8x8 classifier's accuracy, beside bicubic's."""
    real, y = load_native("test")
    if limit is not None:
        real, y = real[:limit], y[:limit]
    low = downsample(real)
    out = _batched(upscale, low, batch_size)
    if out.shape != real.shape:
        raise ValueError(f"evaluate_upscale: upscale returned {tuple(out.shape)} for {tuple(low.shape)}; expected "
                         f"{tuple(real.shape)}")
    base = bicubic(low)
    res = {
        "psnr_db": float(psnr(out, real).mean()),
        "psnr_bicubic_db": float(psnr(base, real).mean()),
        "accuracy": float((predict(out) == y).double().mean()),
        "accuracy_bicubic": float((predict(base) == y).double().mean()),
        "accuracy_4x4_classifier": float((predict(low, LOW) == y).double().mean()),
        "classifier_accuracy_on_real": classifier(NATIVE)[1],
        "images": len(y),
    }
    res["psnr_gain_db"] = res["psnr_db"] - res["psnr_bicubic_db"]
    res["passed"] = bool(res["psnr_gain_db"] >= SR_PSNR_GAIN_DB and res["accuracy"] >= SR_ACCURACY)
    return res


@torch.no_grad()
def evaluate_variation(vary: Callable[..., torch.Tensor], n: int = 4, seed: int = 0, batch_size: int = 128,
                       limit: int | None = None) -> dict[str, Any]:
    """Judge `vary(images (B, 1, 8, 8), n=n, seed=seed) -> (B * n, 1, 8, 8)` (an input's n variations adjacent) on
    the held-out split: the share of variations the 8x8 classifier labels as the input's digit, and their mean L2
    distance to the input (and to each other) over the mean distance between two real digits of the same class."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2 (the spread between variations needs pairs), got {n!r}")
    real, y = load_native("test")
    ref = same_class_distance(real, y)  # over the whole held-out split, whatever `limit`
    if limit is not None:
        real, y = real[:limit], y[:limit]
    out = _batched(vary, real, batch_size, n=n, seed=seed)
    if out.shape != (len(real) * n, *real.shape[1:]):
        raise ValueError(f"evaluate_variation: vary returned {tuple(out.shape)} for {len(real)} images x n={n}; "
                         f"expected {(len(real) * n, *real.shape[1:])}")
    out = out.clamp(-1, 1)
    yy = y.repeat_interleave(n)
    groups = out.flatten(1).double().view(len(real), n, -1)
    to_input = (groups - real.flatten(1).double()[:, None]).norm(dim=-1)  # (B, n)
    spread = torch.cdist(groups, groups).sum((1, 2)) / (n * (n - 1))  # (B,) mean distance between two variations
    res = {
        "label_kept": float((predict(out) == yy).double().mean()),
        "distance_to_input": float(to_input.mean(1).sum() / ref[y].sum()),
        "distance_between_variations": float(spread.sum() / ref[y].sum()),
        "same_class_real_distance": float(ref[y].mean()),
        "classifier_accuracy_on_real": classifier(NATIVE)[1],
        "images": len(y),
        "variations_per_image": n,
    }
    lo, hi = VARY_DISTANCE
    res["passed"] = bool(res["label_kept"] >= VARY_LABEL_KEPT and lo <= res["distance_to_input"] <= hi)
    return res
