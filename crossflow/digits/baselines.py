"""The simple baselines an expert tries first on the shipped digit tasks (issue 22, item 5), each trained on the same
training split the models train on and judged on the same held-out 20 % by the same judges.

  * text-to-image (`digits`): a random real training image of the prompted digit; the mean training image of the
    digit. Judged by `crossflow.digits.eval.evaluate` (accuracy, diversity, speckle) and by the realism score.
  * super-resolution (`digits-sr`, 4x4 -> 8x8): ridge regression (alpha 1), k-nearest-neighbours (k = 5, uniform
    weights), a small MLP (two hidden layers of 256, ReLU, Adam, seed 0, at most 500 epochs), each mapping the 16
    pixels of the 4x4 to the 64 of the 8x8 (clamped to [-1, 1]). Judged by `eval.evaluate_upscale` (the PSNR and
    classifier of `crossflow eval --preset digits-sr`), on the held-out digits shifted by 1 px (`digits.shift`), and by
    the realism score of the outputs.
  * captioning (`digits-caption`): an RBF SVC (C = 10, gamma "scale") on the 16x16 pixels, naming its digit in a fixed
    sentence ("a handwritten {word}"); the same SVC trained on the training images plus SHIFT_COPIES copies of each
    shifted uniformly in [-2, 2]^2 at 8x8. Judged by `parse_caption` on the clean held-out images and on every
    held-out image at every shift with max(|dy|, |dx|) = 1 and = 2 (`caption_accuracy`, shared with the models; the
    rings hold the diagonal shifts too: (2, 2) moves a digit 2.8 px, a third of the 8x8 frame).
  * variation (`digits-vary`): the nearest training images (L2 on the 8x8 pixels) of the input, overall (what a
    retrieval system can do) and within the input's true class (an oracle: the label is not an input). Judged by
    `eval.evaluate_variation` (label kept, distance to the input) and by the realism score.

Every function returns a dict of numbers; `run_all(preset)` gives all of a preset's. scikit-learn is imported inside
the functions. Data and judges are the digits wing's own (`data`, `eval`), so models and baselines meet the same ones.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from crossflow.digits.data import TRAIN_TEMPLATES, caption, downsample, load_digits, load_native, parse_caption
from crossflow.digits.eval import (bicubic, caption_accuracy, evaluate, evaluate_upscale, evaluate_variation, predict,
                                  psnr, train_classifier)
from crossflow.digits.realism import realism
from crossflow.digits.shift import augment, shifted_set, upsample16

PRESETS = ("digits", "digits-caption", "digits-sr", "digits-vary")
TEMPLATE = TRAIN_TEMPLATES[0]  # "a handwritten {w}": the captioning baseline's fixed sentence
SHIFT_COPIES = 4  # the shift-augmented SVC: each training image plus 4 shifted copies
SEED = 0


# ---------------------------------------------------------------------------------------------------------------------
# super-resolution
# ---------------------------------------------------------------------------------------------------------------------


def sr_models() -> dict[str, Any]:
    """The unfitted super-resolution regressors, by name."""
    from sklearn.linear_model import Ridge
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.neural_network import MLPRegressor

    return {"ridge": Ridge(alpha=1.0), "knn5": KNeighborsRegressor(n_neighbors=5),
            "mlp": MLPRegressor(hidden_layer_sizes=(256, 256), random_state=SEED, max_iter=500)}


def fit_upscaler(model: Any, split: str = "train") -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` fitted on `split`'s (4x4, 8x8) pairs -> an `evaluate_upscale` callable (B, 1, 4, 4) -> (B, 1, 8, 8)."""
    x, _ = load_native(split)
    model.fit(downsample(x).flatten(1).numpy(), x.flatten(1).numpy())

    def upscale(low: torch.Tensor) -> torch.Tensor:
        out = model.predict(low.detach().float().cpu().flatten(1).numpy())
        return torch.as_tensor(out, dtype=torch.float32).view(len(low), 1, 8, 8).clamp(-1, 1)

    return upscale


@torch.no_grad()
def judge_upscaler(upscale: Callable[[torch.Tensor], torch.Tensor], shift: int = 1) -> dict[str, Any]:
    """`evaluate_upscale`'s numbers, the realism of the outputs, and PSNR / accuracy on the held-out digits at every
    shift of ring `shift` (bicubic beside it; `true_8x8_accuracy`: the classifier on the shifted real 8x8)."""
    res = evaluate_upscale(upscale)
    real, y = load_native("test")
    res["realism"] = realism(upscale(downsample(real)))
    xs, ys, _ = shifted_set(real, y, shift)
    low = downsample(xs)
    out, base = upscale(low), bicubic(low)
    res[f"shift{shift}"] = {"psnr_db": float(psnr(out, xs).mean()), "psnr_bicubic_db": float(psnr(base, xs).mean()),
                            "accuracy": float((predict(out) == ys).double().mean()),
                            "true_8x8_accuracy": float((predict(xs) == ys).double().mean()), "images": len(ys)}
    return res


def sr_baselines() -> dict[str, Any]:
    """Ridge, kNN and MLP super-resolution, trained on the training split, judged on the held-out split."""
    return {name: judge_upscaler(fit_upscaler(m)) for name, m in sr_models().items()}


# ---------------------------------------------------------------------------------------------------------------------
# captioning
# ---------------------------------------------------------------------------------------------------------------------


def svc_captioner(shift_copies: int = 0, k: int = 2, seed: int = SEED) -> Callable[[torch.Tensor], list[str]]:
    """An RBF SVC on the 16x16 training pixels (+ `shift_copies` copies of each training image shifted uniformly in
    [-k, k]^2, seeded) -> images (B, 1, 16, 16) -> captions in the fixed sentence TEMPLATE."""
    from sklearn.svm import SVC

    if shift_copies == 0:
        clf, _ = train_classifier()
    else:
        x8, y = load_native("train")
        g = torch.Generator().manual_seed(seed)
        xs = [upsample16(x8)] + [augment(x8, k, g, size=16)[0] for _ in range(shift_copies)]
        clf = SVC(C=10.0, gamma="scale").fit(torch.cat(xs).flatten(1).numpy(), y.repeat(len(xs)).numpy())

    def caption_fn(images: torch.Tensor) -> list[str]:
        pred = clf.predict(images.detach().float().cpu().clamp(-1, 1).flatten(1).numpy())
        return [caption(TEMPLATE, int(p)) for p in pred]

    caption_fn.classifier = clf  # for the tests: what it was trained on (its support vectors)
    return caption_fn


def caption_baselines() -> dict[str, Any]:
    return {"svc_template": caption_accuracy(svc_captioner()),
            "svc_shift_augmented_template": {**caption_accuracy(svc_captioner(SHIFT_COPIES)),
                                             "shift_copies": SHIFT_COPIES, "copy_shift_range": 2}}


# ---------------------------------------------------------------------------------------------------------------------
# variation
# ---------------------------------------------------------------------------------------------------------------------


def nearest_training(same_class: bool = False) -> Callable[..., torch.Tensor]:
    """An `evaluate_variation` callable: each input's n nearest training images (L2 on the 8x8 pixels), nearest first;
    `same_class`: among the training images of the input's true digit (an oracle, the label is given)."""
    xtr, ytr = load_native("train")
    xte, yte = load_native("test")
    flat_tr = xtr.flatten(1).double()

    def vary(images: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
        d = torch.cdist(images.flatten(1).double(), flat_tr)
        if same_class:  # the labels of held-out inputs, looked up by identity
            hit = (images.flatten(1)[:, None] == xte.flatten(1)[None]).all(-1)
            if not bool(hit.any(1).all()):
                raise ValueError("nearest_training(same_class=True) knows the labels of held-out digits only")
            labels = yte[hit.float().argmax(1)]
            d = d.masked_fill(labels[:, None] != ytr[None], float("inf"))
        idx = d.topk(n, dim=1, largest=False).indices  # (B, n)
        return xtr[idx.flatten()]

    return vary


def vary_baselines(n: int = 4) -> dict[str, Any]:
    real, _ = load_native("test")
    out = {}
    for name, same in (("nearest_training", False), ("nearest_training_same_class_oracle", True)):
        vary = nearest_training(same)
        res = evaluate_variation(vary, n=n)
        res["realism"] = realism(vary(real, 1))  # the nearest one, in the order of the inputs
        out[name] = res
    return out


# ---------------------------------------------------------------------------------------------------------------------
# text-to-image
# ---------------------------------------------------------------------------------------------------------------------


class RetrievalPipe:
    """A stand-in for `CrossFlowPipeline` in `digits.evaluate`: prompt -> its digit (`parse_caption`) -> real training
    images of that digit, drawn at random (seeded), or the digit's mean training image (`mode="mean"`). Output like
    the pipeline's "pt": (B, 1, 16, 16) in [0, 1]; every image it returns is kept in `self.images` ([-1, 1])."""

    def __init__(self, mode: str = "random") -> None:
        if mode not in ("random", "mean"):
            raise ValueError(f"mode must be 'random' or 'mean', got {mode!r}")
        self.mode = mode
        self.x, self.y = load_digits("train")
        self.images: list[torch.Tensor] = []

    def __call__(self, prompts: list[str], num_images_per_prompt: int = 1, seed: int = 0, output_type: str = "pt",
                 **_: Any) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        out = []
        for p in prompts:
            k = parse_caption(p)
            pool = self.x[self.y == k]
            if self.mode == "mean":
                out.append(pool.mean(0, keepdim=True).expand(num_images_per_prompt, -1, -1, -1))
            else:
                out.append(pool[torch.randint(len(pool), (num_images_per_prompt,), generator=g)])
        imgs = torch.cat(out)
        self.images.append(imgs)
        return (imgs + 1) / 2


def t2i_baselines(per_prompt: int = 10) -> dict[str, Any]:
    out = {}
    for mode in ("random", "mean"):
        pipe = RetrievalPipe(mode)
        res = evaluate(pipe, per_prompt=per_prompt)
        res["realism"] = realism(torch.cat(pipe.images))
        out[f"training_image_{mode}"] = res
    return out


def run_all(preset: str) -> dict[str, Any]:
    """All baselines of `preset` (one of PRESETS): {baseline name: its numbers}."""
    fns = {"digits": t2i_baselines, "digits-caption": caption_baselines, "digits-sr": sr_baselines,
           "digits-vary": vary_baselines}
    if preset not in fns:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    return fns[preset]()
