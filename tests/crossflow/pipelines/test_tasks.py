"""The source -> target pairing (`CrossFlowConfig.source` / `.target`) and the image -> text task built on it: config
checks, the model's parts, loss and gradients, the caption grammar and its vocabulary, the caption pipeline and text
variation through the shared samplers and kernels, the trainer on caption data."""

import pytest
import torch

import crossflow_kernels
from crossflow import config as config_mod
from crossflow.training import train
from crossflow.config import CrossFlowConfig
from crossflow.fast_sampler import FastSampler
from crossflow.models.model import CrossFlow
from crossflow.sampling import EulerSampler, invert
from crossflow.pipelines.caption import CaptionPipeline
from crossflow.vocab import VOCABS, WordVocab, get_vocab, tokenize
from crossflow.digits import data

# image (1, 8, 8) -> text latent (4, 8, 8) on the `tiny` sizes; the Text VE reads (7, 32) token embeddings
TINY_CAPTION = dict(source="image", target="text", source_size=8, image_ve_width=8, decoder_width=32, decoder_heads=2,
                    decoder_prefix=2, decoder_depth=1)


def tiny_caption() -> CrossFlowConfig:
    return CrossFlowConfig.from_name("tiny", **TINY_CAPTION)


def caption_batch(cfg: CrossFlowConfig, b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = get_vocab(cfg.vocab)
    caps = [data.caption(data.TRAIN_TEMPLATES[i % 12], i % 10) for i in range(b)]
    return {"source": torch.rand(b, *cfg.source_shape, generator=g) * 2 - 1,
            "text_emb": torch.randn(b, cfg.text_len, cfg.text_dim, generator=g),
            "text_mask": torch.arange(cfg.text_len).expand(b, -1) < 5,
            "tokens": torch.stack([vocab.encode(c, cfg.max_words) for c in caps])}


# ---- config


@pytest.mark.parametrize("change, message", [
    (dict(source="audio"), "source must be one of"),
    (dict(target="depth"), "target must be one of"),
    (dict(source="text", target="text"), "source 'text' with target 'text' is not built"),
    (dict(target="text", autoencoder="CompVis/stable-diffusion-v1-4/vae"), "target 'text' has no image autoencoder"),
    (dict(rec_weight=-1.0), "rec_weight must be >= 0"),
    (dict(decoder_width=30, decoder_heads=4), "decoder_width 30 must be divisible by decoder_heads 4"),
    (dict(source_size=0), "source_size must be an int >= 1"),
    (dict(vocab=""), "vocab must be a non-empty string"),
])
def test_pairing_fields_are_validated(change, message):
    with pytest.raises(ValueError, match=message):
        CrossFlowConfig.from_name("digits", **change)


def test_a_config_without_pairing_fields_is_text_to_image_with_its_old_parts():
    """A config.json written before the pairing fields existed (the digits weights shipped until 2026-12-02) loads as
    text -> image, and the model has exactly the parts (and state-dict keys) it had."""
    old = {k: v for k, v in CrossFlowConfig().to_dict().items() if k not in (
        "source", "target", "source_channels", "source_size", "image_ve_width", "vocab", "max_words", "decoder_width",
        "decoder_depth", "decoder_heads", "decoder_prefix", "rec_weight")}
    cfg = CrossFlowConfig.from_dict(old)
    assert (cfg.source, cfg.target) == ("text", "image") and cfg == CrossFlowConfig()
    model = CrossFlow(CrossFlowConfig.from_name("tiny"))
    assert {k.split(".")[0] for k in model.state_dict()} == {"text_ve", "flow", "image_encoder", "logit_scale"}
    cap = CrossFlow(tiny_caption())
    assert {k.split(".")[0] for k in cap.state_dict()} == {
        "text_ve", "image_ve", "flow", "image_encoder", "logit_scale", "text_decoder"}
    with pytest.raises(ValueError, match="source is 'text', not image"):
        model.encode_image(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="target is 'image', not text"):
        model.decode_text(torch.zeros(1, 4, 8, 8))


def test_digits_caption_preset_is_registered_with_its_recipe_and_data():
    cfg = CrossFlowConfig.from_name("digits-caption")
    assert (cfg.source, cfg.target, cfg.source_shape) == ("image", "text", (1, 16, 16))
    assert train.RECIPES["digits-caption"]["data"] == "digits-caption" and "digits-caption" in train.DATASETS


# ---- model


@pytest.mark.usefixtures("torch_backend")
def test_image_to_text_loss_trains_every_part_and_never_moves_the_target(perturb):
    cfg = tiny_caption()
    model = perturb(CrossFlow(cfg))
    b = caption_batch(cfg)
    loss, parts = model(b["text_emb"], b["text_mask"], None, torch.Generator().manual_seed(0), source=b["source"],
                        tokens=b["tokens"])
    assert loss.isfinite() and {"fm", "clip", "kl", "rec", "kl_text"} <= set(parts)
    expected = parts["fm"] + parts["clip"] + cfg.kl_weight * (parts["kl"] + parts["kl_text"]) + parts["rec"]
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    for name in ("image_ve", "text_ve", "text_decoder", "flow"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    # The flow's target (the caption's mu) is detached: without the decoder's and the KL's terms, no gradient
    # reaches the Text VE.
    model = perturb(CrossFlow(cfg.replace(rec_weight=0.0, kl_weight=0.0)))
    loss, _ = model(b["text_emb"], b["text_mask"], None, torch.Generator().manual_seed(0), source=b["source"],
                    tokens=b["tokens"])
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.text_ve.parameters())


def test_image_to_text_forward_names_what_is_missing():
    cfg = tiny_caption()
    model, b = CrossFlow(cfg), caption_batch(cfg)
    with pytest.raises(ValueError, match="needs the source images"):
        model(b["text_emb"], b["text_mask"], None, tokens=b["tokens"])
    with pytest.raises(ValueError, match="needs the caption"):
        model(b["text_emb"], b["text_mask"], None, source=b["source"])
    with pytest.raises(ValueError, match="ImageVE: expected source images"):
        model(b["text_emb"], b["text_mask"], None, source=b["source"][:, :, :4], tokens=b["tokens"])


def test_image_to_text_loss_is_the_same_on_both_kernel_backends(perturb):
    """The pairing goes through the kernels seam: the Triton path (interpreted on the CPU) matches torch's."""
    cfg = tiny_caption()
    model, b = perturb(CrossFlow(cfg)), caption_batch(cfg, b=2)
    out = {}
    for backend in ("torch", "triton"):
        with crossflow_kernels.use_backend(backend):
            out[backend] = model(b["text_emb"], b["text_mask"], None, torch.Generator().manual_seed(1),
                                 source=b["source"], tokens=b["tokens"])[0].detach()
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-4, atol=1e-4)


# ---- caption grammar and vocabulary


def test_every_caption_of_the_grammar_round_trips_and_parses_to_its_digit():
    vocab = get_vocab("digits")
    assert len(vocab) == len(data.caption_words()) + 1 and vocab.words[0] == "<end>"
    # the model's word list (vocab.VOCABS, no data set imported) is the grammar's, word for word
    assert list(VOCABS["digits"]) == data.caption_words()
    for t in data.ALL_TEMPLATES:
        for k in range(10):
            text = data.caption(t, k)
            ids = vocab.encode(text, 8)
            assert vocab.decode(ids.tolist()) == text and data.parse_caption(text) == k
            assert data.caption_template(text) == t
    assert data.parse_caption("Number Seven , written by hand") == 7  # case and spacing are not wording
    for soup in ("seven seven", "a handwritten", "the digit 7 7", "a handwritten eleven", ""):
        assert data.parse_caption(soup) is None
    assert tokenize("number seven, written") == ["number", "seven", ",", "written"]


def test_vocab_refuses_unknown_and_too_long_texts():
    vocab = WordVocab(["a", "b"])
    with pytest.raises(ValueError, match=r"words \['c'\]"):
        vocab.encode("a c", 4)
    with pytest.raises(ValueError, match="has 3 words; the decoder holds at most 2"):
        vocab.encode("a b a", 2)
    assert vocab.decode([1, 2, 0, 1]) == "a b"  # cut at the first end token
    with pytest.raises(ValueError, match="unknown vocab 'nope'"):
        get_vocab("nope")


def test_digit_captions_pair_an_image_with_a_caption_of_its_digit():
    cfg = CrossFlowConfig.from_name("digits-caption")
    ds = data.DigitCaptions(cfg, seed=3, size=20)
    vocab = get_vocab(cfg.vocab)
    for i in (0, 7):
        item = ds[i]
        assert item["source"].shape == (1, 16, 16) and item["text_emb"].shape == (cfg.text_len, cfg.text_dim)
        assert item["tokens"].shape == (cfg.max_words,)
        assert data.parse_caption(vocab.decode(item["tokens"].tolist())) == int(item["label"])
    assert torch.equal(ds[5]["tokens"], ds[5]["tokens"])
    with pytest.raises(ValueError, match="needs an image source"):
        data.DigitCaptions(CrossFlowConfig.from_name("digits"))


# ---- sampling: captions and text variation through the shared samplers


def test_invert_runs_the_flow_backwards():
    """A constant velocity c: the backward flow from z1 ends at z1 - c, and the forward sampler brings it back."""
    c = torch.randn(1, 4, 8, 8)

    def model(x, t, indicator):
        return c.expand_as(x)

    z1 = torch.randn(3, 4, 8, 8)
    z0 = invert(model, z1, steps=4)
    torch.testing.assert_close(z0, z1 - c)
    torch.testing.assert_close(EulerSampler(steps=4, guidance_scale=1.0)(model, z0), z1)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        invert(model, z1, steps=0)


@pytest.mark.usefixtures("torch_backend")  # the pipeline's plumbing; the model's Triton path: the backend test above
def test_caption_pipeline_shapes_seeds_and_words(perturb):
    cfg = tiny_caption()
    model = perturb(CrossFlow(cfg)).eval()
    pipe = CaptionPipeline(model, FastSampler(steps=3, guidance_scale=2.0))
    images = torch.rand(2, *cfg.source_shape) * 2 - 1
    caps = pipe(images, 3, seed=0)
    assert len(caps) == 6 and all(isinstance(c, str) for c in caps)
    words = set(get_vocab(cfg.vocab).words)
    assert all(w in words for c in caps for w in tokenize(c))
    assert pipe(images, 3, seed=0) == caps
    with pytest.raises(ValueError, match="expected images"):
        pipe(images[:, :, :4])
    with pytest.raises(ValueError, match="int >= 1"):
        pipe(images, 0)
    with pytest.raises(ValueError, match="needs an image -> text model"):
        CaptionPipeline(CrossFlow(CrossFlowConfig.from_name("tiny")))


@pytest.mark.usefixtures("torch_backend")
def test_text_variation_shapes_and_seeds(perturb):
    cfg = tiny_caption()
    model = perturb(CrossFlow(cfg)).eval()

    def encoder(texts):  # a stand-in for the frozen LM: (B, L, D) embeddings and a mask
        g = torch.Generator().manual_seed(len(texts[0]))
        return torch.randn(len(texts), cfg.text_len, cfg.text_dim, generator=g), torch.ones(len(texts), cfg.text_len)

    pipe = CaptionPipeline(model, FastSampler(steps=3), text_encoder=encoder)
    out = pipe.vary_text(["a handwritten seven", "the digit 3"], 2, seed=1)
    assert len(out) == 4 and out == pipe.vary_text(["a handwritten seven", "the digit 3"], 2, seed=1)
    with pytest.raises(ValueError, match="non-empty"):
        pipe.vary_text(["  "])


# ---- training


class _TinyCaptions(torch.utils.data.Dataset):
    def __init__(self, cfg, seed, size):
        self.batch = caption_batch(cfg, b=8, seed=seed)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def test_trainer_trains_an_image_to_text_preset(tmp_path, monkeypatch):
    monkeypatch.setitem(config_mod.CONFIGS, "tiny-caption", {**config_mod.CONFIGS["tiny"], **TINY_CAPTION})
    monkeypatch.setitem(train.DATASETS, "tiny-captions", _TinyCaptions)
    tc = train.TrainConfig(out=str(tmp_path / "run"), preset="tiny-caption", data="tiny-captions", steps=2,
                           batch_size=4, log_every=1, backend="torch", quiet=True)
    log = train.train(tc)
    assert len(log) == 2 and all({"rec", "kl_text", "fm"} <= set(r) for r in log)
    pipe = CaptionPipeline.from_pretrained(tmp_path / "run" / "final", sampler=FastSampler(steps=2))
    with crossflow_kernels.use_backend("torch"):
        assert len(pipe(torch.zeros(1, 1, 8, 8), 2, seed=0)) == 2


# ---- the shipped digits-caption model and its verbs


@pytest.mark.slow
def test_shipped_caption_model_names_held_out_digits():
    """A small eval of the committed weights (the README's numbers come from `crossflow eval --preset
    digits-caption`)."""
    from crossflow.pipelines.base import default_checkpoint

    pipe = CaptionPipeline.from_pretrained(default_checkpoint("digits-caption"))
    xte, yte = data.load_digits("test")
    idx = torch.arange(0, len(yte), 6)  # 60 held-out images, every digit
    with crossflow_kernels.use_backend("torch"):  # speed on CPU; the kernels are tested on their own
        caps = pipe(xte[idx], 1, steps=20, seed=0)
        varied = pipe.vary_text([data.caption(t, 7) for t in data.ALL_TEMPLATES[:4]], 2, steps=20, seed=0)
    parsed = [data.parse_caption(c) for c in caps]
    assert sum(p == int(y) for p, y in zip(parsed, yte[idx])) >= 0.9 * len(idx), caps
    assert sum(p is not None for p in parsed) >= 0.95 * len(idx), caps
    assert sum(data.parse_caption(v) == 7 for v in varied) >= 7, varied


def test_caption_and_vary_text_verbs(tmp_path, capsys):
    from crossflow import cli
    from crossflow.pipelines.image_io import to_pil

    xte, yte = data.load_digits("test")
    png = tmp_path / "digit.png"
    to_pil(xte[:1])[0].save(png)
    cli.main(["caption", str(png), "--n", "2", "--steps", "10", "--backend", "torch", "-q"])
    lines = capsys.readouterr().out.splitlines()  # one image: the captions alone
    assert len(lines) == 2 and all(data.parse_caption(c) == int(yte[0]) for c in lines), lines
    j = int(torch.nonzero(yte != yte[0])[0])  # another digit
    other = tmp_path / "other.png"
    to_pil(xte[j : j + 1])[0].save(other)
    cli.main(["caption", str(png), str(other), "--n", "2", "--steps", "10", "--backend", "torch", "-q"])
    lines = capsys.readouterr().out.splitlines()  # several: each caption labelled with its image
    assert [line.split(": ", 1)[0] for line in lines] == [str(png)] * 2 + [str(other)] * 2, lines
    assert [data.parse_caption(line.split(": ", 1)[1]) for line in lines] == [int(yte[0])] * 2 + [int(yte[j])] * 2
    cli.main(["vary", "--text", "a handwritten seven", "--n", "3", "--steps", "10", "--backend", "torch", "-q"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(data.parse_caption(c) == 7 for c in lines), lines


def test_caption_and_vary_errors(tmp_path, cli_fails):
    from crossflow.pipelines.base import default_checkpoint

    assert "not both" in cli_fails(["vary"], 2)
    assert "not both" in cli_fails(["vary", "x.png", "--text", "a seven"], 2)
    assert "text variations are printed" in cli_fails(["vary", "--text", "a seven", "-o", "v.png"], 2)
    assert "no such image file" in cli_fails(["caption", str(tmp_path / "missing.png")], 1)
    (tmp_path / "bad.png").write_text("not an image")
    assert "not an image file" in cli_fails(["caption", str(tmp_path / "bad.png")], 1)
    png = tmp_path / "ok.png"
    from PIL import Image

    Image.new("L", (16, 16)).save(png)
    err = cli_fails(["caption", str(png), "--checkpoint", default_checkpoint()], 2)  # found before anything loads
    assert "is a text-to-image checkpoint (preset digits)" in err
    assert "`crossflow caption` needs an image-to-text" in err


@pytest.mark.usefixtures("torch_backend")
def test_a_loaded_caption_model_decodes_as_the_saved_one(tmp_path, perturb):
    """Loading builds the model on the meta device: nothing the decoder needs may live in an unsaved buffer (its causal
    mask once did, and loaded models decoded garbage)."""
    cfg = tiny_caption()
    model = perturb(CrossFlow(cfg)).eval()
    model.save_pretrained(tmp_path)
    loaded = CrossFlow.from_pretrained(tmp_path).eval()
    z, tokens = torch.randn(4, *cfg.latent_shape), caption_batch(cfg)["tokens"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_decoder(z, tokens), model.text_decoder(z, tokens))
    assert loaded.decode_text(z) == model.decode_text(z)


def test_caption_reads_a_16_bit_or_transparent_file_as_its_8_bit_twin(tmp_path, capsys):
    """16-bit PNGs were binarised and ink drawn in the alpha channel vanished; now both caption as the 8-bit file,
    with one stderr line saying what was converted."""
    import numpy as np
    from PIL import Image

    from crossflow import cli
    from crossflow.pipelines.image_io import to_pil
    from crossflow.pipelines.image_io import load_images

    xte, _ = data.load_digits("test")
    g8 = np.asarray(to_pil(xte[3:4])[0])
    rgba = np.zeros((*g8.shape, 4), np.uint8)
    rgba[..., 3] = g8
    files = {"8.png": Image.fromarray(g8), "16.png": Image.fromarray(g8.astype(np.uint16) * 257),
             "alpha.png": Image.fromarray(rgba, "RGBA")}
    for name, im in files.items():
        im.save(tmp_path / name)
    paths = [str(tmp_path / n) for n in files]
    x = load_images(paths, 1, 16)
    assert torch.equal(x[1], x[0]) and torch.equal(x[2], x[0])
    captions = []
    for i, p in enumerate(paths):
        cli.main(["caption", p, "--steps", "5", "--backend", "torch", "-q"])
        out = capsys.readouterr()
        captions.append(out.out)
        assert out.err.count("\n") == (i > 0) and out.err.startswith(f"crossflow: note: {p}: " if i else ""), out.err
    assert captions[1] == captions[0] and captions[2] == captions[0], captions


def test_readme_shell_blocks_paste_as_they_are_and_the_caption_example_prints_what_it_shows(tmp_path, capsys,
                                                                                          monkeypatch):
    """Every ```bash block of the README is commands only (no `$ ` prompts, no output lines), and the captioning
    example (make digit7.png from scikit-learn's digits, caption it, reword a text) prints the ```text block after
    it."""
    import re
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from crossflow import cli

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    programs = ("crossflow ", "python ", "pip ", "OMP_NUM_THREADS=1 crossflow ", "bash ", "torchrun ")
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    for line in (ln for b in blocks for ln in b.splitlines() if ln.strip()):
        assert line.startswith(programs), line
    block, shown = re.search(r"```bash\n(python -c \"from sklearn.*?)```\n.*?```text\n(.*?)```", readme, re.S).groups()
    make, *verbs = block.splitlines()
    subprocess.run([sys.executable, *shlex.split(make)[1:]], cwd=tmp_path, check=True, timeout=120)
    monkeypatch.chdir(tmp_path)
    printed = []
    for line in verbs:
        cli.main(shlex.split(line)[1:] + ["--backend", "torch"])
        printed += capsys.readouterr().out.splitlines()
    assert printed == shown.splitlines()
