"""save_pretrained / load_pretrained / atomic_write: round trips, corrupted files, failed writes."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import crossflow.checkpoint as ckpt
import kernels
from crossflow.checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write, load_pretrained, save_pretrained
from crossflow.config import CrossFlowConfig
from crossflow.model import CrossFlow

TINY = CrossFlowConfig.from_name("tiny")


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.use_backend("torch"):
        yield


def _model(seed=0):
    torch.manual_seed(seed)
    m = CrossFlow(TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-zero everywhere: a load that skips a tensor shows
    return m.eval()


def _digest(directory):
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in sorted(os.listdir(directory))}


def _outputs(m):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, TINY.text_len, TINY.text_dim, generator=g)
    mask = torch.ones(2, TINY.text_len, dtype=torch.bool)
    z0, _, _ = m.encode_text(emb, mask, generator=torch.Generator().manual_seed(1))
    return z0, m.velocity(z0, torch.tensor([0.2, 0.7]), torch.tensor([0, 1])), m.image_encoder(z0)


def test_round_trip_gives_equal_outputs(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left behind
    assert json.loads((tmp_path / CONFIG_NAME).read_text()) == TINY.to_dict()
    m2 = CrossFlow.from_pretrained(tmp_path, map_location="cpu").eval()
    assert m2.config == TINY
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    for a, b in zip(_outputs(m), _outputs(m2), strict=True):
        assert torch.equal(a, b)


def test_half_precision_checkpoint_keeps_its_dtype(tmp_path):
    save_pretrained(_model().to(torch.bfloat16), tmp_path)
    assert load_pretrained(tmp_path).flow.x_embedder.proj.weight.dtype == torch.bfloat16


def test_truncated_file_raises_and_other_checkpoints_are_untouched(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    save_pretrained(_model(0), good)
    save_pretrained(_model(1), bad)
    before = _digest(good)
    w = bad / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{w}: corrupted or truncated"):
        load_pretrained(bad)
    w.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_pretrained(bad)
    assert _digest(good) == before
    load_pretrained(good)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_pretrained(_model(0), tmp_path)
    before = _digest(tmp_path)

    def broken_save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(_model(1), tmp_path)
    assert _digest(tmp_path) == before  # same files, same bytes, no temp file left
    monkeypatch.undo()
    for a, b in zip(_outputs(_model(0)), _outputs(load_pretrained(tmp_path).eval()), strict=True):
        assert torch.equal(a, b)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_pretrained(tmp_path / "nope")
    save_pretrained(_model(), tmp_path)
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_pretrained(tmp_path)


def test_config_mismatch_and_bad_keys_raise(tmp_path):
    m = _model()
    save_pretrained(m, tmp_path)
    cfg_path = tmp_path / CONFIG_NAME
    cfg_path.write_text(TINY.replace(depth=3).to_json())
    with pytest.raises(ValueError, match="disagrees with the config stored in model.safetensors.*'depth': \\(2, 3\\)"):
        load_pretrained(tmp_path)
    cfg_path.write_text('{"depth": "two"}')
    with pytest.raises(ValueError, match="invalid CrossFlow config"):
        load_pretrained(tmp_path)
    # weights written by someone else (no config in the metadata): keys are checked one by one
    cfg_path.write_text(TINY.to_json())
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    sd["flow.extra.weight"] = torch.zeros(2)
    del sd["flow.blocks.1.mlp.fc2.bias"]
    sd["logit_scale"] = torch.zeros(3)
    save_file(sd, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError) as e:
        load_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing keys ['flow.blocks.1.mlp.fc2.bias']" in msg
    assert "unexpected keys ['flow.extra.weight']" in msg
    assert "logit_scale: checkpoint (3,) vs model ()" in msg


def test_atomic_write(tmp_path):
    target = tmp_path / "sub" / "state.pt"
    atomic_write(target, lambda p: torch.save({"step": 1}, p))
    assert torch.load(target, weights_only=True) == {"step": 1}

    def fail(p):
        with open(p, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, fail)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert os.listdir(target.parent) == ["state.pt"]
