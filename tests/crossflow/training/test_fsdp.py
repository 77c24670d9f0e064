"""`crossflow.train --fsdp` (FSDP2, `crossflow.training.distributed`): two gloo processes under torchrun train as one
process does on the same two per-rank batches, and checkpoints load in either mode. DiMR's blocks are FSDP units.

The one-process reference runs both ranks' batches of every step in one process (`Trainer.batch_loss(step, rank)`;
each rank's batch, noise and t are seeded by (seed, step, rank)) and averages the losses: the global batch of the
2-process run. Two processes must match it to fp32 reduction error (the shards reduce in another order)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from crossflow import checkpoint as ckpt
from crossflow.training import distributed as fsdp
from crossflow.models.model import CrossFlow
from crossflow.training.train import Trainer, TrainConfig, main

REPO = Path(__file__).resolve().parents[3]
ARGS = dict(preset="tiny", batch_size=4, lr=3e-3, warmup_steps=5, ema_decay=0.9, log_every=1, backend="torch",
            quiet=True, seed=7, keep_checkpoints=0)
TOL = dict(rtol=1e-4, atol=1e-6)  # a few fp32 roundings of different reduction orders, through 4 Adam steps
# Adam divides by the gradient's own size: where the exact gradient is ~0 (the attention key bias, which the softmax
# cancels; a few weights of a batch) the computed one is rounding noise in either run, and the updates that noise
# makes may differ by up to lr per step. So: every entry within the sum of the lrs applied (warm-up over 5 steps),
# and all but 0.1 % of each tensor within TOL (all of the key bias is noise). A real difference (a gradient not
# averaged, a state on the wrong parameter) moves whole tensors.
LR_SUM, NOISE_ONLY = sum(ARGS["lr"] * s / ARGS["warmup_steps"] for s in range(1, 5)), "W_K.bias"


def _torchrun(out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items() if k != "quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "crossflow.train", "--out", str(out), "--quiet", "--fsdp", *flags, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _log(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def _checkpoint(out: Path, step: int) -> dict[str, torch.Tensor]:
    return ckpt.read_training_checkpoint(ckpt.checkpoint_path(out, step))[0]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        diff, ref = (a[k].double() - b[k].double()).abs(), b[k].double().abs()
        off = diff > TOL["atol"] + TOL["rtol"] * ref
        assert diff.max().item() <= LR_SUM if diff.numel() else True, (k, diff.max().item())
        allowed = off.numel() if k.endswith(NOISE_ONLY) else int(1e-3 * off.numel())
        assert off.sum().item() <= allowed, (k, off.sum().item(), off.numel(), diff.max().item())


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_checkpoints_load_either_way(tmp_path):
    out_f, out_r, out_m = tmp_path / "fsdp", tmp_path / "ref", tmp_path / "mixed"
    _torchrun(out_f, "--steps=4", "--ckpt-every=2")

    # The one-process reference: both ranks' batches per step, loss averaged (DDP's and FSDP's gradient).
    tr = Trainer(TrainConfig(out=str(out_r), steps=4, ckpt_every=2, **ARGS))
    one = tr.batch_loss

    def both(step: int, rank: int):
        (l0, p0), (l1, p1) = (one(step, r) for r in (0, 1))
        return (l0 + l1) / 2, {k: (p0[k] + p1[k]) / 2 for k in p0}

    tr.batch_loss = both
    ref_loss, ref_ckpt = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same BLAS sums, else Adam amplifies their noise
    try:
        for step in range(1, 5):
            tr.step = step
            ref_loss[step] = tr.train_step(step)["loss"].item()
            if step == 2:  # the same state saved in the one-process format, for an FSDP resume below
                path = tr.save_checkpoint()
                ref_ckpt = ckpt.read_training_checkpoint(path)[0]
                out_m.mkdir()
                (out_m / "checkpoints").mkdir()
                (out_m / "checkpoints" / path.name).write_bytes(path.read_bytes())
        ema_ref = {k: v.clone() for k, v in tr.ema.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
        tr.close()

    # Same losses, and at step 2 the same model, EMA and AdamW state in the one-process file format.
    log = _log(out_f)
    assert sorted(log) == [1, 2, 3, 4]
    assert log[1]["loss"] == pytest.approx(ref_loss[1], rel=1e-6)  # same weights, same batches: same forward
    for step in (2, 3, 4):
        assert log[step]["loss"] == pytest.approx(ref_loss[step], rel=1e-5), step
    got = _checkpoint(out_f, 2)
    _close({k: v for k, v in got.items() if not k.startswith("log/")}, ref_ckpt)
    final = CrossFlow.from_pretrained(out_f / "final")  # the EMA, loadable without FSDP
    _close(final.state_dict(), ema_ref)

    # An FSDP checkpoint resumes in one process (world size 2 -> 1: the data stream changes, it warns) ...
    tr = Trainer(TrainConfig(out=str(out_f), steps=5, ckpt_every=5, resume=True, **ARGS))
    try:
        saved = _checkpoint(out_f, 4)
        assert tr.step == 4 and all(torch.equal(v, saved[f"model/{k}"]) for k, v in tr.model.state_dict().items())
        assert torch.isfinite(tr.train_step(5)["loss"])
    finally:
        tr.close()
    # ... and a one-process checkpoint resumes under FSDP: steps 3, 4 replay the FSDP run's.
    _torchrun(out_m, "--steps=4", "--ckpt-every=2", "--resume")
    mixed = _log(out_m)
    for step in (3, 4):
        assert mixed[step]["loss"] == pytest.approx(log[step]["loss"], rel=1e-5), step
    _close(_checkpoint(out_m, 4), _checkpoint(out_f, 4))


def test_fsdp_needs_torchrun(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--fsdp", "--backend", "torch"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "fsdp shards over the processes of a torchrun launch" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_dimr_blocks_are_fsdp_units_and_train_sharded(tmp_path, torch_backend, perturb):
    # Each DiMR block is one unit with its own time-dependent norm parameters; sharded (on a 1-process gloo mesh: the
    # hooks, the DTensor parameters and gradients, the all-gathers in the forward and in the checkpointed backward's
    # recomputation) the multi-scale forward and every gradient equal the unsharded module's.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from crossflow.models.dimr import ConvNeXtBlock, DiMRConfig, DiMRFlow, TransformerBlock

    torch.manual_seed(0)
    net = perturb(DiMRFlow(DiMRConfig.from_name("dimr-tiny")), std=0.05, everywhere=True)  # TD params off their init
    units = fsdp.fsdp_units(net)
    assert [id(u) for u in units] == [id(b) for s in net.stages for b in s.blocks]
    assert [type(u) for u in units] == [TransformerBlock] * 3 + [ConvNeXtBlock] * 6
    assert fsdp.unsharded_params(net) == []
    ref = copy.deepcopy(net)
    x, t, ind = torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 0])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        fsdp.shard(net, init_device_mesh("cpu", (1,)))
        net.gradient_checkpointing = ref.gradient_checkpointing = True
        assert all(isinstance(p, DTensor) for p in net.parameters())
        outs, outs_ref = net(x, t, ind, return_all=True), ref(x, t, ind, return_all=True)
        for o, r in zip(outs, outs_ref, strict=True):
            torch.testing.assert_close(o, r, rtol=0, atol=0)
        sum((o * torch.arange(o.numel()).view_as(o).sin()).sum() for o in outs).backward()
        sum((o * torch.arange(o.numel()).view_as(o).sin()).sum() for o in outs_ref).backward()
        for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
            g, h = p.grad.full_tensor(), q.grad  # fp32 sums in another order: ~3e-7 of the largest entry measured
            torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5 * h.abs().max().item(), msg=name)
    finally:
        dist.destroy_process_group()
