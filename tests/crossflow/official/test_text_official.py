"""The text side of the released checkpoints (official `libs/clip.py`, `libs/t5.py`), offline: tiny random CLIP and T5
text models built from transformers configs and saved to a temporary directory, with real CLIP / T5 tokenizers on
tiny vocabularies; and the official T5 caption cleaning on examples.

The cleaning examples' expected strings were produced by the official `T5Embedder.text_preprocessing` (ftfy 6.1.1,
beautifulsoup4 4.15) and agree with ours; so did 20,000 random strings drawn from the characters and fragments its
rules act on. The one documented difference: ftfy repairs mojibake ("â€œhelloâ€\x9d" -> '"hello"'), ours does not.
"""

import json

import pytest
import torch

from crossflow.encoders.caption_clean import clean_caption, preprocess_t5
from crossflow.encoders.text_encoder import TextEncoder, resolve_dtype

transformers = pytest.importorskip("transformers")
L = 12
WORDS = "a cat on the mat dog photo of red blue".split()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {t: i for i, t in enumerate([*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"])}
    merges = []  # each word merged left to right: "c a", "ca t</w>"
    for w in WORDS:
        cur, *rest = [*w[:-1], w[-1] + "</w>"]
        for nxt in rest:
            merges.append(f"{cur} {nxt}")
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    tok.save_pretrained(d)
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=L, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.CLIPTextModel(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *(("▁" + w, -1.0) for w in WORDS),
              *((c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz▁")]
    transformers.T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(d)
    cfg = transformers.T5Config(vocab_size=len(pieces), d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    torch.manual_seed(0)
    transformers.T5EncoderModel(cfg).save_pretrained(d)
    return str(d)


def test_clip_is_the_last_layer_after_the_final_norm_without_the_mask(clip_dir):
    enc = TextEncoder(clip_dir, max_length=L)
    assert enc.kind == "clip" and enc.dim == 32 and not enc.clean_captions
    assert next(enc.model.parameters()).dtype == torch.float32
    prompts = ["a photo of a red cat", "dog"]
    emb, mask = enc(prompts)
    assert emb.shape == (2, L, 32) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [8, 3]  # BOS + 6 words + EOS, then padding
    ids = enc.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = enc.model(input_ids=ids["input_ids"], output_hidden_states=True)
        masked = enc.model(**ids).last_hidden_state
    final_norm = getattr(enc.model, "text_model", enc.model).final_layer_norm  # (transformers < 5: under text_model)
    torch.testing.assert_close(emb, final_norm(out.hidden_states[-1]), rtol=0, atol=0)  # the last layer, normed
    assert not torch.allclose(emb, final_norm(out.hidden_states[-2]), atol=1e-3)  # not the penultimate one
    # Run without the mask (official): the same real tokens (causal attention), other padding slots.
    torch.testing.assert_close(emb[mask], masked[mask], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(emb[~mask], masked[~mask], atol=1e-3)
    upper, _ = enc(["A Photo of a RED cat", "DOG"])  # the CLIP tokenizer lower-cases; no cleaning applied
    torch.testing.assert_close(upper, emb, rtol=0, atol=0)


def test_t5_cleans_captions_runs_in_bf16_with_the_mask_and_does_not_scale(t5_dir):
    enc = TextEncoder(t5_dir, max_length=L)
    assert enc.kind == "t5" and enc.dim == 16 and enc.clean_captions
    # The official's dtype by default; transformers may keep the modules a model names fp32 (T5's `wo`, from 5.0 on).
    keep = set(getattr(enc.model, "_keep_in_fp32_modules", None) or ())
    dtypes = {n: p.dtype for n, p in enc.model.named_parameters()}
    assert all(d == torch.bfloat16 or keep & set(n.split(".")) for n, d in dtypes.items()), dtypes
    assert sum(d == torch.bfloat16 for d in dtypes.values()) > len(dtypes) // 2
    raw = "A <b>RED</b> cat on https://example.com/mat the MAT"
    assert preprocess_t5(raw) == "a red cat on the mat"
    emb, mask = enc([raw, "dog"])
    assert emb.shape == (2, L, 16) and emb.dtype == torch.float32
    assert mask.sum(1).tolist() == [7, 2]  # ▁a ▁red ▁cat ▁on ▁the ▁mat </s> / ▁dog </s>
    ids = enc.tokenizer(["a red cat on the mat", "dog"], padding="max_length", max_length=L, return_tensors="pt")
    with torch.no_grad():
        ref = enc.model(**ids).last_hidden_state.float()  # with the mask, unscaled: x10 is the Text VE's job
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    assert mask.equal(ids["attention_mask"].bool())
    # Cleaning off: the tokenizer sees the raw caption (upper case is unknown to this vocabulary).
    plain = TextEncoder(t5_dir, max_length=L, clean_captions=False, dtype="fp32")
    assert {p.dtype for p in plain.model.parameters()} == {torch.float32}
    assert not plain(["A RED cat"])[0].allclose(plain(["a red cat"])[0], atol=1e-3)
    with pytest.raises(ValueError, match="text encoder dtype must be"):
        TextEncoder(t5_dir, dtype="int8")


def test_text_scale_is_applied_once_by_the_text_ve():
    # The official multiplies T5 features by 10 before the VE (`extract_train_feature.py`, `demo_t2i.py`); CLIP's not.
    from crossflow.config import CrossFlowConfig
    from crossflow.models.dimr import OFFICIAL_CHECKPOINTS
    from crossflow.models.text_ve import TextVE

    assert {n: c["crossflow_fields"]["text_scale"] for n, c in OFFICIAL_CHECKPOINTS.items()} == {
        "dimr-256-clip": 1.0, "dimr-256-t5": 10.0, "dimr-512-clip": 1.0, "dimr-512-t5": 10.0}
    cfg = CrossFlowConfig.from_name("tiny")
    torch.manual_seed(0)
    ve1 = TextVE(cfg).eval()
    ve10 = TextVE(cfg.replace(text_scale=10.0)).eval()
    ve10.load_state_dict(ve1.state_dict())
    emb, mask = torch.randn(2, cfg.text_len, cfg.text_dim), torch.ones(2, cfg.text_len, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(ve10(emb, mask), ve1(10 * emb, mask), rtol=1e-5, atol=1e-5)


def test_dtype_resolution():
    assert resolve_dtype(None, "t5") == resolve_dtype("auto", "t5") == torch.bfloat16
    assert resolve_dtype("auto", "clip") == resolve_dtype("auto", "auto") == torch.float32
    assert resolve_dtype("fp16", "t5") == resolve_dtype(torch.float16, "clip") == torch.float16
    for bad in ("float64", torch.float64, 3):
        with pytest.raises(ValueError, match="text encoder dtype"):
            resolve_dtype(bad, "t5")


# (caption, the official `text_preprocessing` output): each line exercises one rule or a few
CLEANED = [
    ("A photo of a CAT sitting on a mat", "a photo of a cat sitting on a mat"),  # lower-case
    ("Visit https://www.example.com/path?x=1 for more", "visit ?x=1 for more"),  # URLs (scheme, then domain + path)
    ("see www.site.org/page and http://foo.bar/baz", "see and foo. bar baz"),
    ("<p>Hello <b>World</b></p> &amp; friends &quot;quoted&quot;", 'hello world friends "quoted"'),  # HTML
    ("&lt;script&gt;alert(1)&lt;/script&gt; <script>bad()</script> text", ""),
    ("<!-- comment --> visible <style>p{}</style> <![CDATA[cdata]]>", "visible cdata"),
    ("@user check this out #123 #12345678 1234567", "check this out"),  # @names, #ids, long numbers
    ("中文 字符 mixed with english 漢字", "mixed with english"),  # CJK
    ("em—dash – en-dash ― bar", "em dash en dash bar"),  # dashes, then more than 3 of them
    ("“smart quotes” and ‘single’ «guillemets»", "smart quotes\" and 'single' \"guillemets"),  # quotes
    ("ip 192.168.0.1 here", "ip here"),
    ("file name image.jpg and photo.PNG and doc.pdf", "file name and and"),  # file names
    ("***AUSVERKAUFT*** ~~~ [test] {x} (y) |z| a\\b a/b", "ausverkauft test x y z a b a b"),  # punctuation
    ("this-is-my-cute-cat_photo", "this is my cute cat photo"),  # more than 3 - or _
    ("free shipping worldwide free shipping download free click here click for details", "click here"),
    ("jc6640 jc6640vc 6640vc231 j2d1a2a3 1920x1080 3.5×2", ""),  # product ids, sizes
    ("page 12 of the book", "of the book"),
    ("hello , world . foo:bar , baz", "hello , world foo:bar , baz"),
    ("'quoted caption'", "quoted caption"), ("-leading dash", "leading dash"), ("trailing plus+", "trailing plus"),
    (".hidden", ""),
    ("ﬁne ﬂowers ＦＵＬＬＷＩＤＴＨ　ｓｐａｃｅ", "fine flowers fullwidth space"),  # ligatures, width (ftfy)
    ("line1\r\nline2\u2028line3", "line1 line2 line3"),
    ("ctrl\x07chars\x1b[31mred\x1b[0m", "ctrlchars 31mred 0m"),  # control characters ("[" is gone first)
    ("a+cat%20on+a%20mat", "a cat on a mat"),  # URL-quoted
    ("<person> with a dog", "person with a dog"),
    ("&#147;windows quotes&#148; &#233;t&#xE9; &#128512;", "\"windows quotes\" été 😀"),  # numeric entities
    ("&EACUTE; &Eacute; &eacute; &foo; &amp;amp;amp;", "é é é foo ;amp;"),
    ("price is $5.99... really.... ok", "price is $5.99 really ok"),
    ("multiple     spaces\tand\ttabs\n newlines", "multiple spaces and tabs newlines"),
    ("a\\nb literal backslash n", "a b literal backslash n"),
    ("", ""),
]


@pytest.mark.parametrize("caption,expected", CLEANED)
def test_t5_caption_cleaning_as_the_official(caption, expected):
    assert preprocess_t5(caption) == expected


def test_clean_caption_is_one_pass_and_the_official_runs_two():
    for caption, once, twice in (("- -cat", "-cat", "cat"), ("' 'cat' '", "'cat'", "cat")):  # official outputs
        assert clean_caption(caption) == once and preprocess_t5(caption) == twice
