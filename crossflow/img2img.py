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
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F

from crossflow.data import IndexedPairs

NATIVE = 8  # the originals' resolution: the target of both tasks
IMAGE_TASKS = ("super-resolution", "image-variation")  # `config.TASKS` of an image -> image model
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


def _batched(fn: Callable[..., torch.Tensor], x: torch.Tensor, batch_size: int, progress: bool = False,
             **kw) -> torch.Tensor:
    from crossflow.progress import progress as progress_bar

    bar, out = progress_bar(len(x), "eval", "img", enabled=progress), []
    for i in range(0, len(x), batch_size):
        out.append(fn(x[i : i + batch_size], **kw).detach().float().cpu())
        bar.update(min(batch_size, len(x) - i))
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def evaluate_upscale(upscale: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 512,
                     limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Judge `upscale(low (B, 1, 4, 4) in [-1, 1]) -> (B, 1, 8, 8) in [-1, 1]` on the held-out split (the first
    `limit` images when given): PSNR against the real 8x8 and the 8x8 classifier's accuracy, beside bicubic's."""
    real, y = load_native("test")
    if limit is not None:
        real, y = real[:limit], y[:limit]
    low = downsample(real)
    out = _batched(upscale, low, batch_size, progress)
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
                       limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Judge `vary(images (B, 1, 8, 8), n=n, seed=seed) -> (B * n, 1, 8, 8)` (an input's n variations adjacent) on
    the held-out split: the share of variations the 8x8 classifier labels as the input's digit, and their mean L2
    distance to the input (and to each other) over the mean distance between two real digits of the same class."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2 (the spread between variations needs pairs), got {n!r}")
    real, y = load_native("test")
    ref = same_class_distance(real, y)  # over the whole held-out split, whatever `limit`
    if limit is not None:
        real, y = real[:limit], y[:limit]
    out = _batched(vary, real, batch_size, progress, n=n, seed=seed)
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


# ---------------------------------------------------------------------------------------------------------------------
# Training data (the trainer's "digits-sr" and "digits-vary" data sets: an image "source", the target "latent")
# ---------------------------------------------------------------------------------------------------------------------

VARY_NEIGHBOURS = 20  # a variation's target: one of the source's 20 nearest same-class training digits


def _check_pairing(cfg: Any, what: str, source_size: int) -> None:
    want = dict(source="image", target="image", source_shape=(1, source_size, source_size),
                latent_shape=(1, NATIVE, NATIVE), autoencoder="identity")
    got = {k: getattr(cfg, k, None) for k in want}
    got = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in got.items()}
    if got != want:
        bad = {k: got[k] for k in want if got[k] != want[k]}
        raise ValueError(f"the {what} data set needs a config with {want}; this one has {bad}")


class UpscalePairs(IndexedPairs):
    """(4x4 source, real 8x8 target) pairs from the training split. Sample i is image i mod N: no randomness."""

    STREAM = "digits-sr"  # only the shift augmentation draws from it

    def __init__(self, cfg: Any, seed: int = 0, size: int | None = None, augment_shift: int = 0) -> None:
        _check_pairing(cfg, "digits-sr", LOW)
        self.images, self.labels = load_native("train")
        self.low = downsample(self.images)
        self.augment_shift = _shift_option(augment_shift)  # > 0: the 8x8 moved first, its 4x4 made from it
        super().__init__(len(self.labels), seed, size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.item(i)
        if self.augment_shift:
            image = _shift_one(self, i, self.images[j])
            return {"source": downsample(image[None])[0], "latent": image, "label": self.labels[j]}
        return {"source": self.low[j], "latent": self.images[j], "label": self.labels[j]}


def _shift_option(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < NATIVE:
        raise ValueError(f"augment_shift must be an int in [0, {NATIVE}) (pixels at 8x8), got {k!r}")
    return k


def _shift_one(ds: IndexedPairs, i: int, *images: torch.Tensor) -> torch.Tensor:
    """8x8 images (1, 8, 8) of sample i, all moved by one shift uniform in [-k, k]^2 drawn from the sample's own
    generator (STREAM + "-shift", seed, i), separate from the data set's stream: (len(images), 1, 8, 8)."""
    from crossflow.data import stable_seed
    from crossflow.digits_shift import random_shifts, shift

    g = torch.Generator().manual_seed(stable_seed(ds.STREAM + "-shift", ds.seed, i))
    dy, dx = random_shifts(1, ds.augment_shift, g)[0].tolist()
    out = shift(torch.stack(images), dy, dx)
    return out[0] if len(images) == 1 else out


def neighbours(x: torch.Tensor, y: torch.Tensor, k: int = VARY_NEIGHBOURS) -> torch.Tensor:
    """For each image, the indices of its k nearest (L2) other images of the same class: (N, k) long."""
    flat = x.flatten(1).double()
    d = torch.cdist(flat, flat)
    d.masked_fill_((y[:, None] != y[None]) | torch.eye(len(y), dtype=torch.bool), float("inf"))
    if int((y[:, None] == y[None]).sum(1).min()) <= k:
        raise ValueError(f"neighbours: every class needs more than {k} + 1 images")
    return d.topk(k, dim=1, largest=False).indices


class VariationPairs(IndexedPairs):
    """(a digit, the same digit in another hand) pairs from the training split: the source is image i mod N, the
    target one of its VARY_NEIGHBOURS nearest other training digits of the same class, drawn from (seed, i)."""

    STREAM = "digits-vary"

    def __init__(self, cfg: Any, seed: int = 0, size: int | None = None, augment_shift: int = 0) -> None:
        _check_pairing(cfg, "digits-vary", NATIVE)
        self.images, self.labels = load_native("train")
        self.near = neighbours(self.images, self.labels)
        self.augment_shift = _shift_option(augment_shift)  # > 0: source and target moved by the same shift
        super().__init__(len(self.labels), seed, size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j, g = self.item(i), self.generator(i)
        other = int(self.near[j, int(torch.randint(self.near.shape[1], (1,), generator=g))])
        if self.augment_shift:
            src, tgt = _shift_one(self, i, self.images[j], self.images[other])
            return {"source": src, "latent": tgt, "label": self.labels[j]}
        return {"source": self.images[j], "latent": self.images[other], "label": self.labels[j]}


# ---------------------------------------------------------------------------------------------------------------------
# Inference: images in, images out, through the shared model and samplers
# ---------------------------------------------------------------------------------------------------------------------


LIGHT_GROUND = 0.6  # a border this bright on average (fraction of white): dark ink on a light ground, so inverted


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


def read_images(paths: Any) -> list:
    """Image files -> PIL images, each opened and decoded now (a missing or unreadable file: an error naming it)."""
    return [open_image(path) for path in paths]


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


def verdict(res: dict[str, Any]) -> str:
    """One line: an `evaluate_upscale` or `evaluate_variation` result against its bars."""
    if "psnr_db" in res:
        return (f"PSNR {res['psnr_db']:.2f} dB = bicubic {res['psnr_bicubic_db']:.2f} dB {res['psnr_gain_db']:+.2f} dB "
                f"(target >= +{SR_PSNR_GAIN_DB:g}), classifier accuracy {res['accuracy']:.1%} (target >= "
                f"{SR_ACCURACY:.0%}; bicubic {res['accuracy_bicubic']:.1%})")
    lo, hi = VARY_DISTANCE
    return (f"label kept {res['label_kept']:.1%} (target >= {VARY_LABEL_KEPT:.0%}), distance to the input "
            f"{res['distance_to_input']:.2f}x the same-class real distance (target {lo:g}..{hi:g})")


class ImagePipeline:
    """Images -> images with an image-source, image-target CrossFlow: super-resolution (`digits-sr`) and image
    variation (`digits-vary`).

    images (B, 1, H, W) in [-1, 1], or PIL images -> resized to the source size (`resize`) -> image VE sample z0 (the
    only randomness: `seed` / `generator`) -> sampler (Euler + indicator CFG, `FastSampler` by default) -> z1 ->
    autoencoder decode. A PIL input is read as a grey image with white ink on black (the digits' convention: 0 is
    the background) unless `invert=True`.
    """

    def __init__(self, model: torch.nn.Module, autoencoder: Any, sampler: Any | None = None) -> None:
        from crossflow.fast_sampler import FastSampler

        cfg = model.config
        if cfg.source != "image" or cfg.target != "image":
            raise ValueError(f"ImagePipeline needs an image -> image model, got {cfg.source} -> {cfg.target}")
        self.model, self.autoencoder = model, autoencoder
        self.sampler = sampler if sampler is not None else FastSampler()

    @classmethod
    def from_pretrained(cls, directory: str, device: torch.device | str | None = None, sampler: Any | None = None,
                        tasks: tuple[str, ...] = IMAGE_TASKS) -> "ImagePipeline":
        """Load a `save_pretrained` directory; without `sampler`, a FastSampler with its `sampling.json` settings. A
        checkpoint of a task other than `tasks` is refused before anything loads."""
        from crossflow.autoencoder import build_autoencoder
        from crossflow.config import check_task
        from crossflow.fast_sampler import FastSampler
        from crossflow.model import CrossFlow
        from crossflow.pipeline import sampling_defaults

        check_task(directory, tasks, "ImagePipeline" + (f" for {tasks[0]}" if len(tasks) == 1 else ""))
        if sampler is None:
            sampler = FastSampler(**sampling_defaults(directory))
        model = CrossFlow.from_pretrained(directory).eval()
        pipe = cls(model, build_autoencoder(model.config), sampler)
        if device is not None:
            pipe.model.to(device)
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampler settings a call uses when it passes none (`steps`, `guidance_scale`, `official_grid`)."""
        from crossflow.pipeline import sampler_settings

        return sampler_settings(self.sampler)

    def _sources(self, images: Any, invert: bool) -> torch.Tensor:
        size = self.model.config.source_size
        if isinstance(images, torch.Tensor):
            x = resize(_check_images(images, "ImagePipeline"), size)
        else:
            if not isinstance(images, (list, tuple)) or not images:
                raise ValueError("images must be a (B, 1, H, W) tensor in [-1, 1] or a non-empty list of PIL images")
            x = torch.cat([resize(t, size) for t in from_pil(images)])
        return -x if invert else x

    @torch.no_grad()
    def __call__(self, images: Any, num_images_per_image: int = 1, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pt", invert: bool = False,
                 progress: bool = False) -> Any:
        """B images -> B * num_images_per_image outputs (an input's outputs adjacent): "pt" (B', 1, H, W) in [-1, 1]
        (CPU, float32), "pil" a list of PIL images, "latent" z1. steps / guidance_scale: None = the sampler's."""
        from crossflow.pipeline import to_pil

        if output_type not in ("pt", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'pil' or 'latent', got {output_type!r}")
        n = num_images_per_image
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_image must be an int >= 1, got {n!r}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        dtype = next(self.model.parameters()).dtype
        x = self._sources(images, invert).to(self.device, dtype).repeat_interleave(n, dim=0)
        z0, _, _ = self.model.encode_image(x, generator=generator)
        if progress:
            from tqdm.auto import tqdm

            with tqdm(total=steps or getattr(self.sampler, "steps", None), desc="sampling", unit="step",
                      disable=None, leave=False) as bar:
                z1 = self.sampler(self.model, z0, steps=steps, guidance_scale=guidance_scale, callback=bar.update)
        else:
            z1 = self.sampler(self.model, z0, steps=steps, guidance_scale=guidance_scale)
        if output_type == "latent":
            return z1
        out = self.autoencoder.decode(z1).float().clamp(-1, 1).cpu()
        return to_pil(out) if output_type == "pil" else out

    def upscale(self, low: torch.Tensor, **kw) -> torch.Tensor:
        """`evaluate_upscale`'s callable: (B, 1, 4, 4) -> (B, 1, 8, 8), seed 0 unless given."""
        return self(low, seed=kw.pop("seed", 0), **kw)

    def vary(self, images: torch.Tensor, n: int, seed: int = 0, **kw) -> torch.Tensor:
        """`evaluate_variation`'s callable: (B, 1, 8, 8) -> (B * n, 1, 8, 8)."""
        return self(images, num_images_per_image=n, seed=seed, **kw)
