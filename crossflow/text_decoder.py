"""The decoder half of the text autoencoder (text target): a text latent -> the caption's words.

Text autoencoder = the Text VE (encoder: frozen-LM token embeddings -> mu, logvar) + `TextDecoder` (here). The flow of
an image -> text pairing ends at the Text VE's mu of a caption; the decoder turns a latent back into words.

Vocabulary: a word-level vocabulary of the task's caption grammar (`VOCABS`; digits: 40 words), not the MiniLM
tokenizer's 30,522 word pieces. The encoder still reads MiniLM embeddings, so any prompt can be encoded; the decoder
only ever says words of the grammar, and its output layer is 41 x 128 instead of 30,522 x 128 (4 M parameters, more
than the whole flow). Id 0 is the end/padding token.

Decoder: non-autoregressive. The latent becomes `decoder_prefix` tokens (one Linear), `max_words` learned position
queries follow, `decoder_depth` bidirectional post-LN layers (the Text VE's `EncoderLayer`, attention through
`kernels.attention`, which has no causal mask) mix them, and a Linear reads each query's word. Captions are short
and fully determined by the latent, so one parallel pass suffices; argmax per position, cut at the first end token.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.nn as nn

from crossflow.config import CrossFlowConfig
from crossflow.text_ve import EncoderLayer

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


def _digits_words() -> list[str]:
    from crossflow.digits import caption_words  # the grammar lives with its data

    return caption_words()


# vocab name (CrossFlowConfig.vocab) -> its word list
VOCABS: dict[str, Callable[[], list[str]]] = {"digits": _digits_words}


def get_vocab(name: str) -> WordVocab:
    if name not in VOCABS:
        raise ValueError(f"unknown vocab {name!r}; choose one of {sorted(VOCABS)}")
    return WordVocab(VOCABS[name]())


class TextDecoder(nn.Module):
    """`forward(z (B, latent_numel) or (B, C, H, W)) -> word logits (B, max_words, vocab)`; `decode(z)` -> texts."""

    def __init__(self, cfg: CrossFlowConfig):
        super().__init__()
        self.config = cfg
        self.vocab = get_vocab(cfg.vocab)
        D, P = cfg.decoder_width, cfg.decoder_prefix
        self.prefix = nn.Linear(cfg.latent_numel, P * D)
        self.queries = nn.Parameter(torch.randn(cfg.max_words, D) * 0.02)
        self.layers = nn.ModuleList(
            [EncoderLayer(D, cfg.decoder_heads, 4 * D, dropout=0.0) for _ in range(cfg.decoder_depth)])
        self.head = nn.Linear(D, len(self.vocab))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not isinstance(z, torch.Tensor) or z.dim() < 2 or z[0].numel() != cfg.latent_numel:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"TextDecoder: expected text latents (B, {cfg.latent_numel}) or (B, "
                             f"{', '.join(map(str, cfg.latent_shape))}), got {got}")
        B, P, D = z.shape[0], cfg.decoder_prefix, cfg.decoder_width
        z = z.reshape(B, -1).to(self.prefix.weight.dtype)
        x = torch.cat([self.prefix(z).view(B, P, D), self.queries.expand(B, -1, -1)], dim=1)  # (B, P + W, D)
        for layer in self.layers:
            x = layer(x, None)
        return self.head(x[:, P:])  # (B, max_words, vocab)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> list[str]:
        """Text latents -> one text each (argmax per position, cut at the first END)."""
        ids = self(z).argmax(-1).cpu()
        return [self.vocab.decode(row.tolist()) for row in ids]
