"""The Text Variational Encoder: frozen-LM token embeddings -> (mu, logvar) with exactly the image latent's size.

Mirrors the official `libs/model/trans_autoencoder.py` (`TransEncoder`, built with `last_norm=False` by the DiT model)
layer for layer and name for name, so an official `context_encoder.*` state dict loads after a prefix rename:

    emb (B, L, Dt) * text_scale
    -> [Compressor Dt -> 1024]                      (T5 only: Linear, LayerNorm, ReLU, Linear)
    -> ve_layers x post-LN EncoderLayer             (MHA with separate W_Q/W_K/W_V/W_O, key-padding mask, no positions)
    -> ve_reductions x EncoderReductionLayer        (the same layer, then a per-token Linear d -> d/2)
    -> flatten ALL L tokens (padding included)      (B, L * d_out)
    -> Linear to 2 * latent_numel, or the Adaptor   (mu | logvar)

Deviations, both numerically negligible or training-only:
  * Attention goes through `crossflow_kernels.attention`, which has no attention-probability dropout. We apply the same
    dropout rate to the attention output (the concatenated heads, before W_O) instead. Identical in eval mode.
  * Masked keys get probability exactly 0 (the official fills scores with -1e9, i.e. exp underflows to 0 as well). A row
    with *no* valid key returns zeros here and a uniform average there; tokenizers always emit >= 1 valid token.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import crossflow_kernels
from crossflow.config import CrossFlowConfig


class LayerNorm(nn.Module):
    """The official custom LayerNorm: g * (x - mean) / (std + eps) + b, with the *unbiased* std and eps outside the
    square root (not `nn.LayerNorm`). Statistics in fp32."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.ones(size))
        self.b = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf - xf.mean(-1, keepdim=True)) / (xf.std(-1, keepdim=True) + self.eps)
        return self.g * y.to(x.dtype) + self.b


def key_arguments(mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The attention keyword for a (B, L) bool key-padding mask: `key_lengths` (int32 (B,)) when every row is a prefix
    of real tokens (the tokenizers pad on the right), so the kernel stops at each row's length and reads no byte mask;
    else the mask itself. One host sync per Text VE forward decides; under torch.compile the mask is kept."""
    if mask is None:
        return {}
    if torch.compiler.is_compiling():
        return {"key_padding_mask": mask}
    lengths = mask.sum(-1, dtype=torch.int32)
    prefix = torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
    return {"key_lengths": lengths} if bool(torch.equal(prefix, mask)) else {"key_padding_mask": mask}


class MultiHeadAttention(nn.Module):
    """Self-attention with separate biased q/k/v/o projections; scale 1/sqrt(d_k)."""

    def __init__(self, d_model: int, head_num: int, dropout: float = 0.1):
        super().__init__()
        self.head_num, self.d_k = head_num, d_model // head_num
        self.W_Q = nn.Linear(d_model, d_model)
        self.W_K = nn.Linear(d_model, d_model)
        self.W_V = nn.Linear(d_model, d_model)
        self.W_O = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)  # on the attention output: our kernel has no probability dropout

    def forward(self, x: torch.Tensor, keys: dict[str, torch.Tensor]) -> torch.Tensor:
        """keys: `attention`'s key_padding_mask or key_lengths keyword (see `key_arguments`), or {}."""
        B, L, D = x.shape
        q = self.W_Q(x).view(B, L, self.head_num, self.d_k).transpose(1, 2)  # (B, H, L, Dk)
        k = self.W_K(x).view(B, L, self.head_num, self.d_k).transpose(1, 2)
        v = self.W_V(x).view(B, L, self.head_num, self.d_k).transpose(1, 2)
        o = crossflow_kernels.attention(q, k, v, **keys)  # (B, H, L, Dk)
        return self.W_O(self.dropout(o.transpose(1, 2).reshape(B, L, D)))  # (B, L, D)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1):
        super().__init__()
        self.ffn_1 = nn.Linear(d_model, d_ff)
        self.ffn_2 = nn.Linear(d_ff, d_model)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_2(self.dropout(self.act(self.ffn_1(x))))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer: t = LN(x + drop(MHA(x))); y = LN(t + drop(FF(t))). With `reduce`, the official
    `EncoderReductionLayer`: the same, then a per-token Linear(d -> d/2)."""

    def __init__(self, d_model: int, head_num: int, d_ff: int, dropout: float = 0.1, reduce: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, head_num, dropout)
        self.feed_forward = FeedForward(d_model, d_ff, dropout)
        self.norm1, self.norm2 = LayerNorm(d_model), LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.reduction = nn.Linear(d_model, d_model // 2) if reduce else None

    def forward(self, x: torch.Tensor, keys: dict[str, torch.Tensor]) -> torch.Tensor:
        t = self.norm1(x + self.dropout1(self.attn(x, keys)))  # (B, L, d)
        y = self.norm2(t + self.dropout2(self.feed_forward(t)))  # (B, L, d)
        return self.reduction(y) if self.reduction is not None else y  # (B, L, d or d/2)


class Compressor(nn.Module):
    """T5 widths: Linear(Dt -> d) -> LayerNorm (torch's, affine) -> ReLU -> Linear(d -> d)."""

    def __init__(self, input_dim: int, tar_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, tar_dim)
        self.ln_fc1 = nn.LayerNorm(tar_dim)
        self.fc2 = nn.Linear(tar_dim, tar_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.ln_fc1(self.fc1(x))))


class Adaptor(nn.Module):
    """The official 512 px head: 2 x (Linear + LayerNorm + ReLU) to a grid*grid map, 3 convs, flatten to `tar_dim`.

    Official: grid 64 (hidden 4096), conv widths 32/64, output channels tar_dim / 4096 (8 for 32768). `grid` is a
    parameter here only so tests can build a tiny one; the layer is otherwise the official one.
    """

    def __init__(self, input_dim: int, tar_dim: int, grid: int = 64):
        super().__init__()
        hidden = grid * grid
        if tar_dim % hidden:
            raise ValueError(f"Adaptor: tar_dim {tar_dim} must be a multiple of grid**2 = {hidden}")
        self.grid, self.tar_dim = grid, tar_dim
        self.fc1 = nn.Linear(input_dim, hidden)
        self.ln_fc1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.ln_fc2 = nn.LayerNorm(hidden)
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.ln_conv1 = nn.LayerNorm([32, grid, grid])
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.ln_conv2 = nn.LayerNorm([64, grid, grid])
        self.conv3 = nn.Conv2d(64, tar_dim // hidden, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.ln_fc1(self.fc1(x)))  # (B, grid*grid)
        x = torch.relu(self.ln_fc2(self.fc2(x)))
        x = x.view(-1, 1, self.grid, self.grid)  # (B, 1, grid, grid)
        x = torch.relu(self.ln_conv1(self.conv1(x)))  # (B, 32, grid, grid)
        x = torch.relu(self.ln_conv2(self.conv2(x)))  # (B, 64, grid, grid)
        return self.conv3(x).reshape(-1, self.tar_dim)  # (B, tar_dim)


class TextVE(nn.Module):
    """Text Variational Encoder. `forward(emb (B, L, Dt), mask (B, L) bool) -> (mu, logvar)`, each (B, latent_numel).

    `cfg.text_scale` (10 for T5) is applied here, to the incoming embeddings, and nowhere else.
    """

    def __init__(self, cfg: CrossFlowConfig):
        super().__init__()
        self.config = cfg
        d = cfg.ve_width
        self.compressor = Compressor(cfg.text_dim, d) if cfg.ve_compress_dim else None
        self.layers = nn.ModuleList(
            [EncoderLayer(d, cfg.ve_heads, cfg.ve_ff, cfg.ve_dropout) for _ in range(cfg.ve_layers)]
        )
        self.reduction_layers = nn.ModuleList()
        for _ in range(cfg.ve_reductions):
            self.reduction_layers.append(EncoderLayer(d, cfg.ve_heads, cfg.ve_ff, cfg.ve_dropout, reduce=True))
            d //= 2
        out = 2 * cfg.latent_numel
        if cfg.ve_adaptor:
            self.adaptor = Adaptor(cfg.ve_flat_dim, out, cfg.ve_adaptor_grid)
        else:
            self.linear = nn.Linear(cfg.ve_flat_dim, out)

    def _check(self, emb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        cfg = self.config
        if not isinstance(emb, torch.Tensor) or emb.dim() != 3 or tuple(emb.shape[1:]) != (cfg.text_len, cfg.text_dim):
            got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"TextVE: expected emb (B, text_len, text_dim) = (B, {cfg.text_len}, {cfg.text_dim}), "
                             f"got {got}")
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (emb.shape[0], cfg.text_len):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"TextVE: expected mask (B, L) = {(emb.shape[0], cfg.text_len)}, got {got}")
        return (mask if mask.dtype == torch.bool else mask != 0).to(emb.device)  # tokenizers give int masks

    def forward(self, emb: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys = key_arguments(self._check(emb, mask))
        x = emb.to(next(self.parameters()).dtype)  # fp32 features into a half-precision VE
        if self.config.text_scale != 1.0:
            x = x * self.config.text_scale
        if self.compressor is not None:
            x = self.compressor(x)  # (B, L, ve_width)
        for layer in self.layers:
            x = layer(x, keys)  # (B, L, ve_width)
        for layer in self.reduction_layers:
            x = layer(x, keys)  # (B, L, d/2)
        x = x.reshape(x.shape[0], -1)  # (B, L * ve_out_width), padding tokens included
        out = self.adaptor(x) if self.config.ve_adaptor else self.linear(x)  # (B, 2 * latent_numel)
        mu, logvar = out.chunk(2, dim=-1)
        return mu, logvar
