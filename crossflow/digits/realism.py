"""Realism of generated digits: a classifier two-sample test (issue 22, item 3).

Can a fixed classifier tell real held-out digits from generated ones? Its cross-validated accuracy is the score:
0.5 = indistinguishable (the classifier guesses), 1.0 = every image's origin is told apart.

Protocol (fixed, so that numbers are comparable across models, runs and machines):
  * feature space: the 8x8 pixels in [-1, 1] (clamped), flattened (64 values). 8x8 images are used as they are;
    larger ones (the 16x16 text-to-image and caption data) are area-averaged to 8x8 first (`image_io.resize`, the mean
    of each 2x2 block), the same transform for the real and the generated images;
  * counts: equal, min(N_real, N_generated) of each; the larger set is subsampled without replacement by a generator
    seeded with `seed` (default 0);
  * classifier: an RBF SVC (C = 10, gamma "scale", the house's digit classifier) on the raw features;
  * 5-fold cross-validation over PAIRS: real[i] and generated[i] always fall in the same fold (folds of the pair
    indices, shuffled, random_state = `seed`), so every fold holds as many real as generated images (stratified) and
    an output made from a held-out image (super-resolution, variation: pass them in the order of their inputs) is
    never judged by a classifier that saw its own source. Without this, a near copy in the training folds pulls each
    test image to the wrong side (measured: real vs real + N(0, 0.05) noise scored 0.17, below chance). The score is
    the mean held-out accuracy over the folds, reported with its standard deviation over the folds.
The real reference is the held-out 20 % (359 images; the split of `crossflow.digits.data`) at the generated images'
resolution (`load_digits("test", size=H)`: the 8x8 originals, or their 16x16 data), put through the same transform:
a 16x16 digit reduced to 8x8 is not the 8x8 original (bilinear up then area down blurs it: 1.0 against the originals),
so each resolution is judged against real digits made as its data are.
scikit-learn is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import torch

from crossflow.digits.data import load_digits
from crossflow.pipelines.image_io import resize

FEATURE_SIZE = 8
FOLDS = 5
PROTOCOL = ("8x8 pixels in [-1, 1] (larger images area-averaged to 8x8), equal counts, RBF SVC (C=10, gamma=scale), "
            "5-fold CV over (real[i], generated[i]) pairs (shuffled, seed 0); accuracy 0.5 = indistinguishable")


def features(images: torch.Tensor) -> Any:
    """(N, 1, H, W) in [-1, 1] -> (N, 64) float64 numpy: the fixed feature space."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"features: expected grey images (N, 1, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    x = resize(images.detach().float().cpu().clamp(-1, 1), FEATURE_SIZE)
    return x.flatten(1).double().numpy()


def _subsample(x: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    return x if len(x) == n else x[torch.randperm(len(x), generator=g)[:n].sort().values]


def two_sample_accuracy(real: torch.Tensor, generated: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """The classifier two-sample test of `real` against `generated` (both (N, 1, H, W) in [-1, 1]): {"accuracy": mean
    held-out accuracy over the folds, "std": its standard deviation over the folds, "per_class": images per side,
    "folds", "protocol"}."""
    import numpy as np
    from sklearn.model_selection import KFold
    from sklearn.svm import SVC

    n = min(len(real), len(generated))
    if n < 2 * FOLDS:
        raise ValueError(f"two_sample_accuracy: need at least {2 * FOLDS} images on each side, got {len(real)} real "
                         f"and {len(generated)} generated")
    g = torch.Generator().manual_seed(seed)
    a, b = features(_subsample(real, n, g)), features(_subsample(generated, n, g))
    x, y = np.concatenate([a, b]), np.repeat([0, 1], n)
    accs = []
    for tr, te in KFold(FOLDS, shuffle=True, random_state=seed).split(np.arange(n)):
        tr, te = np.concatenate([tr, tr + n]), np.concatenate([te, te + n])  # pair i: rows i and n + i
        clf = SVC(C=10.0, gamma="scale").fit(x[tr], y[tr])
        accs.append(float((clf.predict(x[te]) == y[te]).mean()))
    return {"accuracy": float(np.mean(accs)), "std": float(np.std(accs)), "per_class": n, "folds": FOLDS,
            "protocol": PROTOCOL}


def realism(generated: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """`two_sample_accuracy` of the real held-out digits, at the resolution of `generated` (N, 1, H, H), against it."""
    if not isinstance(generated, torch.Tensor) or generated.dim() != 4 or generated.shape[-1] != generated.shape[-2]:
        raise ValueError("realism: expected square grey images (N, 1, H, H)")
    real, _ = load_digits("test", size=int(generated.shape[-1]))
    return two_sample_accuracy(real, generated, seed)


def real_halves(seed: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out digits (size x size) split into two disjoint halves, stratified by digit (the score's null: about
    0.5)."""
    real, y = load_digits("test", size=size)
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(len(y), dtype=torch.bool)
    for k in range(10):
        idx = torch.nonzero(y == k).flatten()
        first[idx[torch.randperm(len(idx), generator=g)[: len(idx) // 2]]] = True
    return real[first], real[~first]
