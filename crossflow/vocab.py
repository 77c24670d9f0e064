"""Words of a caption grammar: tokenizing, and a fixed word vocabulary (a leaf: the data sets and the text decoder
both use it)."""

from __future__ import annotations

import re
from typing import Sequence

import torch

END = "<end>"


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: "Number seven, written" -> [number, seven, ",", written]."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def detokenize(words: Sequence[str]) -> str:
    """The inverse of `tokenize` for the grammar's captions (punctuation attaches to the previous word)."""
    return re.sub(r" ([^\w\s])", r"\1", " ".join(words))


class WordVocab:
    """A fixed word list; id 0 is END (also the padding after the last word)."""

    def __init__(self, words: Sequence[str]):
        self.words = (END, *sorted(set(words) - {END}))
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_words: int) -> torch.Tensor:
        """Text -> (max_words,) long ids, END-padded. ValueError for an unknown word or a too-long text."""
        words = tokenize(text)
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ValueError(f"words {unknown} of {text!r} are not in the vocabulary")
        if len(words) > max_words:
            raise ValueError(f"{text!r} has {len(words)} words; the decoder holds at most {max_words}")
        ids = torch.zeros(max_words, dtype=torch.long)
        ids[: len(words)] = torch.tensor([self.index[w] for w in words], dtype=torch.long)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, up to the first END."""
        words = []
        for i in ids:
            if int(i) == 0:
                break
            words.append(self.words[int(i)])
        return detokenize(words)
