"""Training datasets. Every dataset yields dicts in one format, so the trainer does not care where pairs come from:

    {"text_emb": (L, D) float32 token embeddings, "text_mask": (L,) bool (True = real token),
     "latent": (C, H, W) float32 image latent (already scaled, i.e. what the flow ends at)}

The trainer's `--data` names a dataset of `crossflow.training.datasets.DATASETS`: `SyntheticPairs` from here, or the
digits of the embedded default (`crossflow.digits.data.DigitPairs`, same format). This module imports no other part of
`crossflow`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import Dataset


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings, identical across processes and Python versions
    (unlike `hash()` of a str, which is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class IndexedPairs(Dataset):
    """Base of the data sets built on a fixed split of `base` items: `size` samples (default `base`), sample i drawn
    from item i mod `base` and, when it needs randomness, from its own generator seeded by (STREAM, seed, i), so a
    sample is a pure function of (seed, i): reproducible across processes and data-loader workers, and resumable."""

    STREAM = ""  # names the random stream; changing it changes every drawn sample of the data set

    def __init__(self, base: int, seed: int = 0, size: int | None = None) -> None:
        if base < 1:
            raise ValueError(f"{type(self).__name__}: the split is empty")
        self.base, self.seed = base, seed
        self.n = size if size is not None else base

    def __len__(self) -> int:
        return self.n

    def item(self, i: int) -> int:
        """The split item that sample i is built on."""
        return i % self.base

    def generator(self, i: int) -> torch.Generator:
        """Sample i's own random generator."""
        return torch.Generator().manual_seed(stable_seed(self.STREAM, self.seed, i))


class SyntheticPairs(Dataset):
    """Text/latent pairs with a learnable relation, for tests and smoke runs.

    K classes. Class k has a fixed random image prototype (C, H, W) and a fixed random token code (L, D). A sample of
    class k = (its code on the first `length` tokens + token noise, zeros on the padding; the prototype + small
    latent noise), with `length` drawn in [L/2, L]. A text latent that identifies the class determines the image up
    to the small noise, so training visibly lowers the flow and contrastive losses. Sample `i` is a pure function
    of (seed, i): the data are reproducible and never held in memory.
    """

    def __init__(
        self, cfg: Any, n: int = 4096, seed: int = 0, num_classes: int = 10, text_noise: float = 0.1,
        latent_noise: float = 0.1,
    ) -> None:
        if n < 1 or num_classes < 1:
            raise ValueError(f"SyntheticPairs: need n >= 1 and num_classes >= 1, got n={n}, num_classes={num_classes}")
        self.n, self.seed, self.num_classes = n, seed, num_classes
        self.text_noise, self.latent_noise = text_noise, latent_noise
        self.text_len, self.text_dim = cfg.text_len, cfg.text_dim
        self.latent_shape = tuple(cfg.latent_shape)
        g = torch.Generator().manual_seed(stable_seed("synthetic-prototypes", seed))
        self.prototypes = torch.randn(num_classes, *self.latent_shape, generator=g)  # (K, C, H, W)
        self.codes = torch.randn(num_classes, self.text_len, self.text_dim, generator=g)  # (K, L, D)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"SyntheticPairs: index {i} out of range for {self.n} samples")
        i %= self.n
        g = torch.Generator().manual_seed(stable_seed("synthetic-sample", self.seed, i))
        k = i % self.num_classes
        lo = max(1, self.text_len // 2)
        length = int(torch.randint(lo, self.text_len + 1, (1,), generator=g))
        mask = torch.arange(self.text_len) < length  # (L,)
        emb = self.codes[k] + self.text_noise * torch.randn(self.text_len, self.text_dim, generator=g)
        emb = emb * mask[:, None]  # padding tokens are zero, as a padded LM output would be after masking
        latent = self.prototypes[k] + self.latent_noise * torch.randn(self.latent_shape, generator=g)
        return {"text_emb": emb, "text_mask": mask, "latent": latent, "label": torch.tensor(k)}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of samples into a batch dict (B, ...)."""
    return {key: torch.stack([it[key] for it in items]) for key in items[0]}
