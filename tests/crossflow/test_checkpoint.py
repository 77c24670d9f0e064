"""save_pretrained / load_pretrained / atomic_write / checksums: round trips, corrupted files, failed writes."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import crossflow.checkpoint as ckpt
from crossflow.checkpoint import (
    CHECKSUMS_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write,
    clean_stale_tmp,
    save_pretrained,
    verify_checksums,
)
from crossflow.config import CrossFlowConfig
from crossflow.models.model import CrossFlow, load_pretrained

TINY = CrossFlowConfig.from_name("tiny")
pytestmark = pytest.mark.usefixtures("torch_backend")


@pytest.fixture
def make_model(perturb):
    def make(seed=0):
        torch.manual_seed(seed)
        return perturb(CrossFlow(TINY), std=0.05, everywhere=True).eval()  # a load that skips a tensor shows

    return make


def _digest(directory):
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in sorted(os.listdir(directory))}


def _outputs(m):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, TINY.text_len, TINY.text_dim, generator=g)
    mask = torch.ones(2, TINY.text_len, dtype=torch.bool)
    z0, _, _ = m.encode_text(emb, mask, generator=torch.Generator().manual_seed(1))
    return z0, m.velocity(z0, torch.tensor([0.2, 0.7]), torch.tensor([0, 1])), m.image_encoder(z0)


def test_round_trip_gives_equal_outputs(make_model, tmp_path):
    m = make_model()
    m.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CHECKSUMS_NAME, CONFIG_NAME, WEIGHTS_NAME]  # no temp files left behind
    assert verify_checksums(tmp_path) == [CONFIG_NAME, WEIGHTS_NAME]
    want = {**TINY.to_dict(), "task": "text-to-image", "preset": None}
    assert json.loads((tmp_path / CONFIG_NAME).read_text()) == want
    m2 = CrossFlow.from_pretrained(tmp_path, map_location="cpu").eval()
    assert m2.config == TINY
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    for a, b in zip(_outputs(m), _outputs(m2), strict=True):
        assert torch.equal(a, b)


def test_half_precision_checkpoint_keeps_its_dtype(make_model, tmp_path):
    save_pretrained(make_model().to(torch.bfloat16), tmp_path)
    assert load_pretrained(tmp_path).flow.x_embedder.proj.weight.dtype == torch.bfloat16


def test_truncated_file_raises_and_other_checkpoints_are_untouched(make_model, tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    save_pretrained(make_model(0), good)
    save_pretrained(make_model(1), bad)
    before = _digest(good)
    w = bad / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{w}: corrupted"):
        load_pretrained(bad)
    (bad / CHECKSUMS_NAME).unlink()  # without checksums, safetensors' own checks still name the file
    with pytest.raises(ValueError, match=f"{w}: corrupted or truncated"):
        load_pretrained(bad)
    w.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_pretrained(bad)
    assert _digest(good) == before
    load_pretrained(good)


def test_failed_save_leaves_the_previous_checkpoint_intact(make_model, tmp_path, monkeypatch):
    save_pretrained(make_model(0), tmp_path)
    before = _digest(tmp_path)

    def broken_save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(make_model(1), tmp_path)
    assert _digest(tmp_path) == before  # same files, same bytes, no temp file left
    monkeypatch.undo()
    for a, b in zip(_outputs(make_model(0)), _outputs(load_pretrained(tmp_path).eval()), strict=True):
        assert torch.equal(a, b)


def test_missing_files_raise(make_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_pretrained(tmp_path / "nope")
    save_pretrained(make_model(), tmp_path)
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_pretrained(tmp_path)


def test_config_mismatch_and_bad_keys_raise(make_model, tmp_path):
    m = make_model()
    save_pretrained(m, tmp_path)
    cfg_path = tmp_path / CONFIG_NAME
    rehash = lambda: ckpt.write_checksums(tmp_path, [WEIGHTS_NAME, CONFIG_NAME])  # noqa: E731 (a hand edit's)
    cfg_path.write_text(TINY.replace(depth=3).to_json())
    rehash()
    with pytest.raises(ValueError, match="disagrees with the config stored in model.safetensors.*'depth': \\(2, 3\\)"):
        load_pretrained(tmp_path)
    cfg_path.write_text('{"depth": "two"}')
    rehash()
    with pytest.raises(ValueError, match="invalid CrossFlow config"):
        load_pretrained(tmp_path)
    # weights written by someone else (no config in the metadata): keys are checked one by one
    cfg_path.write_text(TINY.to_json())
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    sd["flow.extra.weight"] = torch.zeros(2)
    del sd["flow.blocks.1.mlp.fc2.bias"]
    sd["logit_scale"] = torch.zeros(3)
    save_file(sd, str(tmp_path / WEIGHTS_NAME))
    rehash()
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


def test_one_flipped_byte_in_tensor_data_is_caught(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    w = tmp_path / WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-10] ^= 0x01  # the last bytes are tensor data: safetensors itself loads this file without complaint
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{w}: corrupted .*sha256"):
        load_pretrained(tmp_path)
    (tmp_path / CHECKSUMS_NAME).unlink()  # on main: a silent load of wrong weights
    with pytest.raises(ValueError, match=f"{tmp_path}: checksums.sha256 is missing"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("content", [b'{"depth": 2,', b"\xff\xfe not text", b""])
def test_corrupt_config_json_names_the_file(make_model, tmp_path, content):
    make_model().save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=f"{tmp_path / CONFIG_NAME}: corrupted"):
        load_pretrained(tmp_path)
    (tmp_path / CHECKSUMS_NAME).unlink()
    with pytest.raises(ValueError, match=f"{tmp_path / CONFIG_NAME}: invalid CrossFlow config"):
        load_pretrained(tmp_path)


def test_checksum_manifest_errors_name_the_file(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    manifest = tmp_path / CHECKSUMS_NAME
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([*lines, "0" * 64 + "  sampling.json"]) + "\n")
    with pytest.raises(ValueError, match="sampling.json: listed in checksums.sha256 but missing"):
        load_pretrained(tmp_path)
    manifest.write_text("not a checksum line\n")
    with pytest.raises(ValueError, match=f"{manifest}: line 1"):
        load_pretrained(tmp_path)


def test_resave_rewrites_the_checksums(make_model, tmp_path):
    make_model(0).save_pretrained(tmp_path)
    make_model(1).save_pretrained(tmp_path)
    verify_checksums(tmp_path)
    torch.testing.assert_close(load_pretrained(tmp_path).logit_scale, make_model(1).logit_scale)


@pytest.mark.parametrize("preset, task", [("digits", "text-to-image"), ("digits-caption", "image-to-text"),
                                          ("digits-sr", "super-resolution"), ("digits-vary", "image-variation")])
def test_shipped_weights_carry_checksums_their_task_and_their_presets_sampling(preset, task):
    from crossflow.config import SAMPLING
    from crossflow.pipelines.base import default_checkpoint

    d = Path(default_checkpoint(preset))
    assert verify_checksums(d) == [CONFIG_NAME, WEIGHTS_NAME, ckpt.SAMPLING_NAME]
    assert ckpt.read_checkpoint_info(d)[1] == {"task": task, "preset": preset}
    assert json.loads((d / ckpt.SAMPLING_NAME).read_text()) == SAMPLING[preset]  # one source: config.SAMPLING


def test_clean_stale_tmp_removes_only_atomic_write_leftovers(tmp_path):
    stale = [tmp_path / ".step_00000004.safetensors.4242.0123abcd.tmp", tmp_path / ".log.jsonl.7.deadbeef.tmp"]
    keep = [tmp_path / "step_00000004.safetensors", tmp_path / ".lock", tmp_path / "notes.tmp"]
    for f in stale + keep:
        f.write_bytes(b"x")
    assert sorted(clean_stale_tmp(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert clean_stale_tmp(tmp_path / "missing") == []


@pytest.mark.parametrize("keep", [[], [CONFIG_NAME], [WEIGHTS_NAME]], ids=["empty", "no-weights", "no-config"])
def test_a_manifest_must_list_the_weights_and_the_config(make_model, tmp_path, keep):
    make_model().save_pretrained(tmp_path)
    manifest = tmp_path / CHECKSUMS_NAME
    manifest.write_text("".join(ln + "\n" for ln in manifest.read_text().splitlines() if ln.split("  ")[1] in keep))
    with pytest.raises(ValueError, match=f"{manifest} does not list .*{WEIGHTS_NAME if not keep else ''}"):
        load_pretrained(tmp_path)


def test_a_missing_manifest_is_accepted_only_for_checkpoints_older_than_manifests(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    (tmp_path / CHECKSUMS_NAME).unlink()
    with pytest.raises(ValueError, match="checksums.sha256 is missing"):
        load_pretrained(tmp_path)
    # weights as written before manifests existed: no "manifest" key in their metadata -> one warning, loaded
    tensors, meta = ckpt.read_safetensors(tmp_path / WEIGHTS_NAME)
    del meta["manifest"]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata=meta)
    with pytest.warns(ckpt.UnverifiedCheckpointWarning, match="no checksums.sha256 .*loaded unverified") as w:
        load_pretrained(tmp_path)
    assert len(w) == 1 and "\n" not in str(w[0].message)


def test_sampling_settings_are_listed_and_verified(make_model, tmp_path):
    m = make_model()
    m.save_pretrained(tmp_path, sampling={"steps": 20, "guidance_scale": 2.0}, preset="tiny")
    assert verify_checksums(tmp_path) == [CONFIG_NAME, WEIGHTS_NAME, ckpt.SAMPLING_NAME]
    info = ckpt.read_checkpoint_info(tmp_path)[1]
    assert info == {"task": "text-to-image", "preset": "tiny"}
    (tmp_path / ckpt.SAMPLING_NAME).write_text('{"steps": 20, "guidance_scale": 7.0}\n')
    with pytest.raises(ValueError, match="sampling.json: corrupted"):
        load_pretrained(tmp_path)
    m.save_pretrained(tmp_path)  # no settings: the earlier save's file goes (it was for other weights)
    assert ckpt.SAMPLING_NAME not in os.listdir(tmp_path)
    (tmp_path / ckpt.SAMPLING_NAME).write_text('{"steps": 20}\n')  # an unlisted file: used, with a warning
    with pytest.warns(ckpt.UnverifiedCheckpointWarning, match="sampling.json is not listed"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_checkpoint_file_gets_the_same_umask_mode(make_model, tmp_path, umask):
    old = os.umask(umask)
    try:
        make_model().save_pretrained(tmp_path, sampling={"steps": 3})
    finally:
        os.umask(old)
    modes = {n: oct((tmp_path / n).stat().st_mode & 0o777) for n in os.listdir(tmp_path)}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes  # main: model.safetensors 0600, the rest 0644


def test_a_full_disk_is_an_oserror_naming_the_file(make_model, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "_safetensors_save_file", full)
    with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / WEIGHTS_NAME}'") as e:
        make_model().save_pretrained(tmp_path)
    assert e.value.errno == 28
    assert os.listdir(tmp_path) == []  # no temporary file left behind
