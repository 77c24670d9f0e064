"""A lean BERT encoder for the text side's small default (MiniLM): `last_hidden_state` from a local BERT directory with
nothing but torch, safetensors and the `tokenizers` library.

Why not transformers here: with transformers 5, `from transformers import BertModel` alone imports torch._dynamo and
torch.distributed.tensor (about 2 s on a 2-core CPU), more than the rest of a 64x64 `crossflow sample` together. A
6-layer BERT is a few matmuls, so the embedded default runs here; transformers stays the path for every other model
(CLIP, T5, hub ids, BERT variants this class does not cover, `TextEncoder(..., lean=False)`) and is this module's
oracle in the tests (same token ids, same hidden states within fp32 rounding).

Covered: `model_type == "bert"`, absolute position embeddings, the exact-erf GELU, encoder only (no cross-attention),
weights in `model.safetensors` (with or without a ``bert.`` prefix), a `tokenizer.json`. `unsupported(path)`
names what is missing otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F


def _config(path: Path) -> dict | None:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None


def unsupported(path: str | Path, cfg: dict | None = None) -> str | None:
    """None when `LeanBert` can load `path` (whose parsed `config.json` is `cfg`, read here when not given), else why
    not (the caller then uses transformers)."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a local directory"
    cfg = _config(path) if cfg is None else cfg
    if cfg is None:
        return f"{path / 'config.json'} is missing or not JSON"
    checks = {
        "model_type": (cfg.get("model_type"), "bert"),
        "position_embedding_type": (cfg.get("position_embedding_type", "absolute"), "absolute"),
        "hidden_act": (cfg.get("hidden_act"), "gelu"),
        "is_decoder": (bool(cfg.get("is_decoder", False)), False),
        "add_cross_attention": (bool(cfg.get("add_cross_attention", False)), False),
    }
    for key, (got, want) in checks.items():
        if got != want:
            return f"config {key} is {got!r}, the lean encoder covers {want!r}"
    for name in ("model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            return f"{path / name} is missing"
    return None


class LeanTokenizer:
    """The directory's `tokenizer.json` (the same Rust tokenizer transformers' fast BERT tokenizer wraps), called like
    a transformers tokenizer for the two ways `TextEncoder` calls one."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_truncation()
        self._tok.no_padding()
        pad = self._tok.padding or {}
        self._pad_id, self._pad_token = pad.get("pad_id", 0), pad.get("pad_token", "[PAD]")

    def __call__(self, prompts: list[str], padding: str | bool = False, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None, verbose: bool = True) -> dict:
        tok = self._tok
        if truncation:
            tok.enable_truncation(max_length)
        if padding == "max_length":
            tok.enable_padding(length=max_length, pad_id=self._pad_id, pad_token=self._pad_token)
        try:
            enc = tok.encode_batch(list(prompts))
        finally:
            tok.no_truncation()
            tok.no_padding()
        ids = [e.ids for e in enc]
        mask = [e.attention_mask for e in enc]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask)}
        return {"input_ids": ids, "attention_mask": mask}


class _Layer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.attn_out = (nn.Linear(d, d) for _ in range(4))
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.ffn_in, self.ffn_out = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, L, D = h.shape
        q, k, v = (lin(h).view(B, L, self.heads, D // self.heads).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # keep (B, 1, 1, L): True = attend
        h = self.attn_norm(h + self.attn_out(a.transpose(1, 2).reshape(B, L, D)))
        return self.ffn_norm(h + self.ffn_out(F.gelu(self.ffn_in(h))))


class LeanBert(nn.Module):
    """`LeanBert.from_pretrained(dir)(input_ids, attention_mask).last_hidden_state` as BertModel's, in eval mode."""

    # Our parameter names -> the checkpoint's, per layer (BertModel's layout).
    _LAYER_KEYS = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                   "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                   "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}

    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        if d % cfg["num_attention_heads"]:
            raise ValueError(f"hidden_size {d} is not a multiple of num_attention_heads {cfg['num_attention_heads']}")
        self.config = SimpleNamespace(**cfg)
        self.word = nn.Embedding(cfg["vocab_size"], d)
        self.position = nn.Embedding(cfg["max_position_embeddings"], d)
        self.token_type = nn.Embedding(cfg.get("type_vocab_size", 2), d)
        self.emb_norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(_Layer(d, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
                                    for _ in range(cfg["num_hidden_layers"]))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> "LeanBert":
        from safetensors.torch import load_file

        from crossflow.checkpoint import skip_random_init

        path = Path(path)
        cfg = _config(path)
        why = unsupported(path, cfg)
        if why:
            raise ValueError(f"LeanBert cannot load {path}: {why}")
        with skip_random_init():
            model = cls(cfg)
        sd = load_file(str(path / "model.safetensors"))
        prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
        # A key the checkpoint lacks is left out here, so the strict load names it (the pooler is not needed).
        model.load_state_dict({ours: sd[prefix + theirs] for ours, theirs in model._key_map().items()
                               if prefix + theirs in sd}, strict=True)
        model.eval().requires_grad_(False)
        return model.to(dtype) if dtype is not None else model

    def _key_map(self) -> dict[str, str]:
        keys = {"word.weight": "embeddings.word_embeddings.weight",
                "position.weight": "embeddings.position_embeddings.weight",
                "token_type.weight": "embeddings.token_type_embeddings.weight",
                "emb_norm.weight": "embeddings.LayerNorm.weight", "emb_norm.bias": "embeddings.LayerNorm.bias"}
        for i in range(len(self.layers)):
            for ours, theirs in self._LAYER_KEYS.items():
                for p in ("weight", "bias"):
                    keys[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        return keys

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        B, L = input_ids.shape
        if L > self.position.num_embeddings:
            raise ValueError(f"{L} tokens exceed the {self.position.num_embeddings} position embeddings")
        pos = torch.arange(L, device=input_ids.device)
        h = self.emb_norm(self.word(input_ids) + self.position(pos) + self.token_type.weight[0])
        keep = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool())[:, None, None, :]
        for layer in self.layers:
            h = layer(h, keep)
        return SimpleNamespace(last_hidden_state=h)

