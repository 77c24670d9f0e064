"""T5 caption cleaning: the official `libs/t5.py` (`T5Embedder.clean_caption`, DeepFloyd IF's), applied twice to every
caption before the T5 tokenizer (`preprocess_t5`), in training feature extraction and at sampling alike. Standard
library only."""

from __future__ import annotations

import html
import html.entities
import re
import unicodedata
import urllib.parse
from html.parser import HTMLParser
from typing import Any

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
