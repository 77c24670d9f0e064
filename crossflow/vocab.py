"""Words of a caption grammar: tokenizing, a fixed word vocabulary, and the word lists of the trained caption decoders
(a leaf: the data sets and the text decoder both use it, and the model needs no data set to know its words)."""

from __future__ import annotations

import re
from typing import Sequence

import torch

END = "<end>"

# vocab name (`CrossFlowConfig.vocab`) -> its words. A trained decoder has one output row per word (in `WordVocab`'s
# order), so a list never changes once weights use it. digits: every word of the digits caption grammar
# (`crossflow.digits.data.caption_words()`, which a test keeps equal to this list).
VOCABS: dict[str, tuple[str, ...]] = {
    "digits": (",", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "a", "an", "by", "digit", "drawing", "eight",
               "five", "four", "hand", "handwritten", "image", "nine", "number", "numeral", "of", "one", "pen",
               "picture", "scanned", "seven", "six", "someone", "the", "three", "two", "with", "written", "wrote",
               "zero"),
}


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


def get_vocab(name: str) -> WordVocab:
    """The `WordVocab` of `VOCABS[name]`; ValueError for an unknown name."""
    if name not in VOCABS:
        raise ValueError(f"unknown vocab {name!r}; choose one of {sorted(VOCABS)}")
    return WordVocab(VOCABS[name])
