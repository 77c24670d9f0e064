"""The decoder half of the text autoencoder (text target): a text latent -> the caption's words.

Text autoencoder = the Text VE (encoder: frozen-LM token embeddings -> mu, logvar) + `TextDecoder` (here). The flow of
an image -> text pairing ends at the Text VE's mu of a caption; the decoder turns a latent back into words.

Vocabulary: a word-level vocabulary of the task's caption grammar (`vocab.VOCABS`; digits: 40 words), not the MiniLM
tokenizer's 30,522 word pieces. The encoder still reads MiniLM embeddings, so any prompt can be encoded; the decoder
only ever says words of the grammar, and its output layer is 41 x 128 instead of 30,522 x 128 (4 M parameters, more
than the whole flow). Id 0 is the end/padding token.

Decoder: autoregressive. The latent becomes `decoder_prefix` tokens (one Linear), the words follow (BOS first), and
`decoder_depth` pre-LN causal layers predict each next word; greedy decoding. Autoregressive, not parallel: a flow
sample lies between the latents of a digit's wordings, and position-wise argmax then mixes two wordings ("a four four
4": 31 % well-formed captions in a first run), while a decoder that reads its own previous words commits to one.
NOTE(seam): the causal attention is torch's `scaled_dot_product_attention`, because `crossflow_kernels.attention` takes
only a key-padding mask; a causal flag there would bring these 2 layers (tokens <= 12) onto the seam."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from crossflow.config import CrossFlowConfig
from crossflow.vocab import get_vocab


class CausalBlock(nn.Module):
    """Pre-LN transformer block with a boolean attention mask (True = may attend)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, T, Dh)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))


class TextDecoder(nn.Module):
    """`forward(z, tokens) -> word logits (B, max_words, vocab)` (teacher forcing: position i sees the latent and
    words < i); `decode(z)` -> texts (greedy, one word per pass, stops at END)."""

    def __init__(self, cfg: CrossFlowConfig):
        super().__init__()
        self.config = cfg
        self.vocab = get_vocab(cfg.vocab)
        D, P, W = cfg.decoder_width, cfg.decoder_prefix, cfg.max_words
        self.prefix = nn.Linear(cfg.latent_numel, P * D)
        self.embed = nn.Embedding(len(self.vocab) + 1, D)  # + BOS (the last id)
        self.pos = nn.Parameter(torch.randn(P + W, D) * 0.02)
        self.layers = nn.ModuleList([CausalBlock(D, cfg.decoder_heads) for _ in range(cfg.decoder_depth)])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, len(self.vocab))

    def _latent(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not isinstance(z, torch.Tensor) or z.dim() < 2 or z[0].numel() != cfg.latent_numel:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"TextDecoder: expected text latents (B, {cfg.latent_numel}) or (B, "
                             f"{', '.join(map(str, cfg.latent_shape))}), got {got}")
        B, P, D = z.shape[0], cfg.decoder_prefix, cfg.decoder_width
        return self.prefix(z.reshape(B, -1).to(self.prefix.weight.dtype)).view(B, P, D)

    def _run(self, prefix: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """prefix (B, P, D), input ids (B, n) -> logits (B, n, V) of the next word at each input."""
        P, n = prefix.shape[1], inputs.shape[1]
        x = torch.cat([prefix, self.embed(inputs)], dim=1) + self.pos[: P + n]
        # prefix tokens see each other; word i sees the prefix and words <= i (its input is word i - 1). Built per
        # call, not a buffer: a model built on the meta device (`CrossFlow.empty`, every load) would hold garbage.
        allowed = torch.ones(P + n, P + n, device=x.device).tril().bool()
        allowed[:P, :P] = True
        for layer in self.layers:
            x = layer(x, allowed)
        return self.head(self.norm(x[:, P:]))

    def forward(self, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        prefix = self._latent(z)
        bos = torch.full_like(tokens[:, :1], len(self.vocab))
        return self._run(prefix, torch.cat([bos, tokens[:, :-1]], dim=1))  # (B, max_words, V)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> list[str]:
        """Text latents -> one text each: greedy, the most likely next word until END (or max_words words)."""
        prefix = self._latent(z)
        ids = torch.full((z.shape[0], 1), len(self.vocab), dtype=torch.long, device=prefix.device)
        for _ in range(self.config.max_words):
            nxt = self._run(prefix, ids)[:, -1].argmax(-1)  # (B,)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if bool((ids[:, 1:] == 0).any(1).all()):
                break
        return [self.vocab.decode(row.tolist()) for row in ids[:, 1:].cpu()]
