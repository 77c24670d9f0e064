"""The training data sets by name (`crossflow train --data NAME`) and how a collated batch feeds `CrossFlow.forward`.

NAME -> builder(model config, seed, size). Every data set yields the format of `crossflow.data` (plus, for the other
pairings, "source" images and caption "tokens": see `batch_inputs`). Builders import their module when called, so
scikit-learn and the text encoder load only for the data sets that need them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from crossflow.data import SyntheticPairs


def _digits(cfg: Any, seed: int, size: int, **augment: Any) -> Dataset:
    from crossflow.digits.data import DigitPairs  # scikit-learn and the text encoder load only when asked for

    return DigitPairs(cfg, seed=seed, size=size, **augment)


def _digits_caption(cfg: Any, seed: int, size: int, **augment: Any) -> Dataset:
    from crossflow.digits.data import DigitCaptions

    return DigitCaptions(cfg, seed=seed, size=size, **augment)


def _digits_sr(cfg: Any, seed: int, size: int, **augment: Any) -> Dataset:
    from crossflow.digits.data import UpscalePairs

    return UpscalePairs(cfg, seed=seed, size=size, **augment)


def _digits_vary(cfg: Any, seed: int, size: int, **augment: Any) -> Dataset:
    from crossflow.digits.data import VariationPairs

    return VariationPairs(cfg, seed=seed, size=size, **augment)


DATASETS: dict[str, Callable[[Any, int, int], Dataset]] = {
    "synthetic": lambda cfg, seed, size: SyntheticPairs(cfg, n=size, seed=seed), "digits": _digits,
    "digits-caption": _digits_caption, "digits-sr": _digits_sr, "digits-vary": _digits_vary}
AUGMENTABLE = ("digits", "digits-caption", "digits-sr", "digits-vary")  # builders taking augment_shift/_prob


def batch_inputs(batch: dict[str, torch.Tensor]) -> tuple[tuple, dict[str, torch.Tensor]]:
    """A collated batch -> (positional, keyword) arguments of `CrossFlow.forward` without the generator:
    (text_emb, text_mask, latent, image) and the other pairings' "source" / "tokens" when the data set has them."""
    args = (batch.get("text_emb"), batch.get("text_mask"), batch.get("latent"), batch.get("image"))
    return args, {k: batch[k] for k in ("source", "tokens") if k in batch}
