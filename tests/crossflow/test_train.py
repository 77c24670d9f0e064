"""Training: loss goes down, exact resume, DDP (2 gloo processes), checkpoint errors.

Every run here uses the torch kernel backend (`backend="torch"`): a training step of the tiny model through the
Triton CPU interpreter costs ~10 s, so a run of tens of steps would take minutes. The Triton kernels' gradients
inside the full loss are covered by test_flow.py (default backend)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crossflow.model import CrossFlow
from crossflow.train import TrainConfig, list_checkpoints, main, param_groups, train

REPO = Path(__file__).resolve().parents[2]


def _cfg(out, **kw) -> TrainConfig:
    base = dict(out=str(out), preset="tiny", batch_size=8, lr=3e-3, warmup_steps=5, ema_decay=0.9, log_every=1,
                backend="torch", quiet=True, seed=7)
    return TrainConfig(**{**base, **kw})


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_short_run_lowers_the_loss(tmp_path):
    # Measured on 4 seeds (80 steps, batch 16, lr 3e-3): last-20 / first-20 mean = 0.51-0.53 for the total loss
    # (the raw CLIP logit scale keeps the contrastive term >~ 1.3 at batch 16) and 0.42-0.45 for the flow term.
    hist = train(_cfg(tmp_path, steps=80, batch_size=16, ckpt_every=1000))
    assert [r["step"] for r in hist] == list(range(1, 81))
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean("loss", hist[-20:]) < 0.65 * mean("loss", hist[:20])
    assert mean("fm", hist[-20:]) < 0.6 * mean("fm", hist[:20])
    # The run's products: a log line per step, the final checkpoint, and the EMA weights as a loadable model.
    assert len(_log(tmp_path)) == 80 and [s for s, _ in list_checkpoints(tmp_path)] == [80]
    ema = CrossFlow.from_pretrained(tmp_path / "final")
    ckpt = load_file(str(list_checkpoints(tmp_path)[-1][1]))
    for k, v in ema.state_dict().items():
        assert torch.equal(v, ckpt[f"ema/{k}"])


def test_resume_replays_the_uninterrupted_run_exactly(tmp_path):
    n = 4
    full, split = tmp_path / "full", tmp_path / "split"
    train(_cfg(full, steps=2 * n, ckpt_every=n))
    train(_cfg(split, steps=n, ckpt_every=n))
    with open(split / "log.jsonl", "a") as f:  # a crashed run's tail past the checkpoint: must be dropped on resume
        f.write(json.dumps({"step": n + 1, "loss": 123.0}) + "\n")
    train(_cfg(split, steps=2 * n, ckpt_every=n, resume=True))
    a, b = _log(full), _log(split)
    assert [r["step"] for r in b] == list(range(1, 2 * n + 1))
    for key in ("loss", "fm", "clip", "kl", "lr", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    fa, fb = load_file(str(full / "final" / "model.safetensors")), load_file(str(split / "final" / "model.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    ca, cb = load_file(str(list_checkpoints(full)[-1][1])), load_file(str(list_checkpoints(split)[-1][1]))
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)  # model, EMA and AdamW state


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_checkpoint_is_a_clear_error_and_changes_nothing(tmp_path, damage):
    train(_cfg(tmp_path, steps=2, ckpt_every=2))
    ckpt = list_checkpoints(tmp_path)[-1][1]
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64 + data[64:])
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="corrupted"):
        train(_cfg(tmp_path, steps=4, ckpt_every=2, resume=True))
    assert _snapshot(tmp_path) == before


def test_existing_run_needs_resume(tmp_path):
    train(_cfg(tmp_path, steps=1))
    with pytest.raises(ValueError, match="--resume"):
        train(_cfg(tmp_path, steps=2))


@pytest.mark.parametrize("argv,match", [
    (["--preset", "nope"], "unknown CrossFlow config"),
    (["--steps", "0"], "steps"),
    (["--data", "imagenet"], "unknown data"),
    (["--backend", "cuda"], "backend"),
    (["--ema-decay", "1.0"], "ema_decay"),
])
def test_bad_cli_arguments_raise_value_error(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        main(["--out", str(tmp_path), *argv])
    assert not any(tmp_path.iterdir())


def test_weight_decay_groups():
    from crossflow.config import CrossFlowConfig

    model = CrossFlow(CrossFlowConfig.from_name("tiny"))
    decay, plain = param_groups(model, 0.03)
    assert decay["weight_decay"] == 0.03 and plain["weight_decay"] == 0.0
    ids = {id(p) for p in plain["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    assert "logit_scale" in names and "flow.y_embedder.embedding_table.weight" in names
    assert all(n.endswith(("bias", "logit_scale", "embedding_table.weight")) or p.ndim < 2
               for n, p in model.named_parameters() if id(p) in ids)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "crossflow.train", "--preset", "tiny", "--steps", "3", "--batch-size", "4", "--out", str(out),
           "--backend", "torch", "--quiet", "--log-every", "1", "--seed", "7", "--dump-weights-hash", str(out / "hash")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    h0, h1 = (json.loads((out / f"hash.rank{r}").read_text()) for r in (0, 1))
    assert h0["step"] == h1["step"] == 3
    assert h0["model"] == h1["model"] and h0["ema"] == h1["ema"]
    assert (out / "final" / "model.safetensors").is_file() and len(_log(out)) == 3
    # Rank 1 draws other data than rank 0: the logged (rank-mean) step-1 loss differs from a 1-process run's.
    single = train(_cfg(tmp_path / "single", steps=1, batch_size=4, lr=1e-4, warmup_steps=100, ema_decay=0.9999))
    assert single[0]["loss"] != _log(out)[0]["loss"]


def test_synthetic_pairs_format_and_determinism():
    from crossflow.config import CrossFlowConfig
    from crossflow.data import SyntheticPairs, build_dataset

    cfg = CrossFlowConfig.from_name("tiny")
    ds = build_dataset("synthetic", cfg, seed=3, size=50)
    item = ds[7]
    assert item["text_emb"].shape == (cfg.text_len, cfg.text_dim) and item["text_emb"].dtype == torch.float32
    assert item["text_mask"].dtype == torch.bool and item["text_mask"][0] and item["latent"].shape == cfg.latent_shape
    assert torch.equal(item["text_emb"][~item["text_mask"]], torch.zeros_like(item["text_emb"][~item["text_mask"]]))
    again = SyntheticPairs(cfg, n=50, seed=3)[7]
    assert all(torch.equal(item[k], again[k]) for k in item)  # a pure function of (seed, index)
    assert not torch.equal(item["latent"], SyntheticPairs(cfg, n=50, seed=4)[7]["latent"])
    with pytest.raises(IndexError):
        ds[50]
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("nope", cfg)
