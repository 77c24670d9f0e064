"""Training the DiMR flow network (`crossflow.training` with a `dimr-*` preset): the loss falls on the digits data, and
a resumed run replays the uninterrupted one exactly."""

from __future__ import annotations

import pytest
import torch


def _train_cfg(out, **kw):
    from crossflow.training.train import TrainConfig

    base = dict(out=str(out), preset="dimr-tiny", batch_size=8, lr=3e-3, warmup_steps=3, ema_decay=0.9, log_every=1,
                backend="torch", quiet=True, seed=11)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_dimr_digits_training_lowers_the_loss(tmp_path, one_thread):
    """The digits data with the DiMR flow (`dimr-digits`): 30 AdamW steps lower the multi-scale flow-matching term."""
    from crossflow.training.train import train

    hist = train(_train_cfg(tmp_path, preset="dimr-digits", data="digits", data_size=256, steps=30, batch_size=8,
                            lr=1e-3, warmup_steps=5, ckpt_every=1000))
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean("fm", hist[-8:]) < 0.7 * mean("fm", hist[:8]), [round(r["fm"], 3) for r in hist]
    assert mean("loss", hist[-10:]) < mean("loss", hist[:10])


def test_dimr_resume_replays_the_uninterrupted_run_exactly(tmp_path, one_thread):
    from safetensors.torch import load_file

    from crossflow.checkpoint import list_checkpoints
    from crossflow.training.train import train

    full, split = tmp_path / "full", tmp_path / "split"
    a = train(_train_cfg(full, steps=6, ckpt_every=3))
    train(_train_cfg(split, steps=3, ckpt_every=3))
    b = train(_train_cfg(split, steps=6, ckpt_every=3, resume=True))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(a[3:]) == strip(b)
    ca, cb = load_file(str(list_checkpoints(full)[-1][1])), load_file(str(list_checkpoints(split)[-1][1]))
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)  # model, EMA and AdamW state
