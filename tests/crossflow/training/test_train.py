"""Training: loss goes down, exact resume, DDP (2 gloo processes), EMA / warm-up / clipping, no silent failure.

Every run here uses the torch kernel backend (`backend="torch"`): a training step of the tiny model through the
Triton CPU interpreter costs ~10 s, so a run of tens of steps would take minutes. The Triton kernels' gradients
inside the full loss are covered by test_flow.py (default backend)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crossflow.checkpoint import list_checkpoints, lock_directory, read_training_checkpoint
from crossflow.models.model import CrossFlow
from crossflow.training.train import RECIPES, Trainer, TrainConfig, main, param_groups, parse_config, train

REPO = Path(__file__).resolve().parents[3]


def _cfg(out, **kw) -> TrainConfig:
    base = dict(out=str(out), preset="tiny", batch_size=8, lr=3e-3, warmup_steps=5, ema_decay=0.9, log_every=1,
                backend="torch", quiet=True, seed=7)
    return TrainConfig(**{**base, **kw})


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.mark.slow
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


@pytest.mark.parametrize("log_every,ckpt_every", [(1, 4), pytest.param(3, 4, marks=pytest.mark.slow)])
def test_resume_replays_the_uninterrupted_run_exactly(tmp_path, log_every, ckpt_every):
    # (3, 4): the checkpoint at step 4 cuts the log window 4..6; on main the resumed log averaged 5..6 only.
    n = 4
    full, split = tmp_path / "full", tmp_path / "split"
    kw = dict(log_every=log_every, ckpt_every=ckpt_every)
    train(_cfg(full, steps=2 * n, **kw))
    train(_cfg(split, steps=n, **kw))
    with open(split / "log.jsonl", "a") as f:  # a crashed run's tail past the checkpoint: must be dropped on resume
        f.write(json.dumps({"step": n + 1, "loss": 123.0}) + "\n")
    train(_cfg(split, steps=2 * n, resume=True, **kw))
    a, b = _log(full), _log(split)
    assert [r["step"] for r in a] == [s for s in range(1, 2 * n + 1) if s % log_every == 0 or s == 2 * n]
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k != "time"} == {k: v for k, v in rb.items() if k != "time"}
    fa, fb = load_file(str(full / "final" / "model.safetensors")), load_file(str(split / "final" / "model.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    ca, cb = load_file(str(list_checkpoints(full)[-1][1])), load_file(str(list_checkpoints(split)[-1][1]))
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)  # model, EMA and AdamW state


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_corrupted_checkpoint_is_a_clear_error_and_changes_nothing(tmp_path, damage):
    train(_cfg(tmp_path, steps=2, ckpt_every=2))
    ckpt = list_checkpoints(tmp_path)[-1][1]
    data = ckpt.read_bytes()
    flipped = data[:-10] + bytes([data[-10] ^ 1]) + data[-9:]  # one bit of tensor data: safetensors reads it fine
    ckpt.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64 + data[64:], "flip": flipped}[damage])
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
    (["--lr", "inf"], "'lr': inf"),
    (["--ema-decay", "1.0"], "ema_decay"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--backend", "triton", "--device", "cpu"], "backend 'triton' cannot run on cpu"),
])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # as on a plain CPU machine (tests interpret Triton)
    monkeypatch.setattr("crossflow_kernels.interpreting", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("crossflow.train: error: ") and err.count("\n") == 1, err
    assert match in err
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:  # argparse's own checks still apply
        parse_config(["--backend", "cuda"])
    assert e.value.code == 2 and "invalid choice: 'cuda'" in capsys.readouterr().err


def test_one_parser_recipes_are_defaults_and_flags_win(tmp_path, capsys):
    from crossflow import cli

    tc = parse_config(["--preset", "digits"])
    assert tc.out == os.path.join("runs", "digits")
    assert {k: getattr(tc, k) for k in RECIPES["digits"]} == RECIPES["digits"]
    tc = parse_config(["--preset", "digits", "--steps", "5", "--data", "synthetic", "--out", str(tmp_path)])
    assert (tc.steps, tc.data, tc.lr, tc.out) == (5, "synthetic", RECIPES["digits"]["lr"], str(tmp_path))
    assert parse_config(["--preset", "tiny"]).steps == TrainConfig("x").steps
    for name in RECIPES:  # every recipe, its augmentation included, is what a bare `--preset NAME` trains with
        tc = parse_config(["--preset", name])
        assert {k: getattr(tc, k) for k in RECIPES[name]} == RECIPES[name]
    sr = parse_config(["--preset", "digits-sr", "--augment-shift", "0"])  # flags win over a recipe's augmentation
    assert (sr.augment_shift, sr.augment_shift_prob, RECIPES["digits-sr"]["augment_shift"]) == (0, 0.5, 2)
    with pytest.raises(SystemExit) as e:  # `crossflow train` is the same parser under its own name
        cli.main(["train", "--preset", "digits", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: crossflow train") and "(default: 7200)" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--out", str(tmp_path), "--steps", "-1"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("crossflow train: error: TrainConfig")


def test_the_light_parser_names_what_the_trainer_has():
    """crossflow.training.train_config spells out the backends, data sets and schedules so that parsing imports no
    torch."""
    import crossflow_kernels
    from crossflow.training import train_config
    from crossflow.training.datasets import DATASETS
    from crossflow.training.optim import LR_SCHEDULES

    assert train_config.BACKENDS == crossflow_kernels.BACKENDS
    assert sorted(train_config.DATA_NAMES) == sorted(DATASETS)
    parser = train_config.build_parser()
    assert next(a.choices for a in parser._actions if "--lr-schedule" in a.option_strings) == LR_SCHEDULES


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


@pytest.mark.slow
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
    from crossflow.data import SyntheticPairs
    from crossflow.training.train import DATASETS

    cfg = CrossFlowConfig.from_name("tiny")
    ds = DATASETS["synthetic"](cfg, 3, 50)
    item = ds[7]
    assert item["text_emb"].shape == (cfg.text_len, cfg.text_dim) and item["text_emb"].dtype == torch.float32
    assert item["text_mask"].dtype == torch.bool and item["text_mask"][0] and item["latent"].shape == cfg.latent_shape
    assert torch.equal(item["text_emb"][~item["text_mask"]], torch.zeros_like(item["text_emb"][~item["text_mask"]]))
    again = SyntheticPairs(cfg, n=50, seed=3)[7]
    assert all(torch.equal(item[k], again[k]) for k in item)  # a pure function of (seed, index)
    assert not torch.equal(item["latent"], SyntheticPairs(cfg, n=50, seed=4)[7]["latent"])
    with pytest.raises(IndexError):
        ds[50]
    with pytest.raises(ValueError, match="unknown data 'nope'"):
        TrainConfig("x", data="nope")


# ---------------------------------------------------------------------------------------------------------------------
# The update itself: EMA, warm-up, clipping (each test fails when that part of the step is broken)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def trainer(tmp_path, torch_backend):
    made = []

    def make(**kw):
        made.append(Trainer(_cfg(tmp_path / str(len(made)), batch_size=4, **kw)))
        return made[-1]

    yield make
    for t in made:
        t.close()


def test_ema_follows_its_recurrence(trainer):
    tr = trainer(ema_decay=0.75, lr=1e-2)
    params = lambda m: {k: v.detach().clone() for k, v in m.named_parameters()}  # noqa: E731
    ema = params(tr.model)  # the EMA starts at the initial weights
    assert all(torch.equal(v, ema[k]) for k, v in params(tr.ema).items())
    for step in (1, 2, 3):
        tr.train_step(step)
        model, got = params(tr.model), params(tr.ema)
        for k in ema:
            torch.testing.assert_close(got[k], 0.75 * ema[k] + 0.25 * model[k], rtol=1e-5, atol=1e-7, msg=k)
        assert any(not torch.equal(got[k], model[k]) and not torch.equal(got[k], ema[k]) for k in ema)
        ema = got


def test_lr_warms_up_linearly_then_stays(trainer):
    lr, warmup = 1e-2, 4
    tr = trainer(lr=lr, warmup_steps=warmup, grad_clip=0.0)
    before = tr.model.logit_scale.detach().clone()
    for step in range(1, 7):
        expected = lr * min(1.0, step / warmup)
        assert [g["lr"] for g in tr.opt.param_groups] == pytest.approx([expected] * 2, rel=1e-12), step
        tr.train_step(step)
        if step == 1:  # Adam's first update is lr * sign(grad) (m / sqrt(v) = g / |g|): the applied lr, measured
            moved = (tr.model.logit_scale.detach() - before).abs().item()
            assert moved == pytest.approx(expected, rel=1e-3)
    log = train(_cfg(tr.out.parent / "fit", lr=lr, warmup_steps=warmup, steps=6))
    assert [r["lr"] for r in log] == pytest.approx([lr * min(1.0, s / warmup) for s in range(1, 7)], rel=1e-12)


def test_cosine_schedule_warms_up_then_decays_to_zero_at_the_last_step(trainer):
    lr, warmup, steps = 1e-2, 2, 6
    tr = trainer(lr=lr, warmup_steps=warmup, steps=steps, lr_schedule="cosine", grad_clip=0.0)
    # update k (1-based) uses lr * f(k): k / warmup during the warm-up, then a half cosine reaching 0 at k = steps
    expected = [lr * (k / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup))))
                for k in range(1, steps + 1)]
    for k in range(1, steps + 1):
        assert tr.opt.param_groups[0]["lr"] == pytest.approx(expected[k - 1], rel=1e-12, abs=1e-15), k
        tr.train_step(k)
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'"):
        _cfg(tr.out.parent / "bad", lr_schedule="linear")


def test_gradients_are_clipped_before_the_update(trainer):
    # Adam's first moment after step 1 is (1 - beta1) * the gradient it was given: clipped, its norm is grad_clip.
    def applied_grad_norm(tr):
        m = [tr.opt.state[p]["exp_avg"] for g in tr.opt.param_groups for p in g["params"]]
        return (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in m])) / 0.1).item()

    clipped, free = trainer(grad_clip=1e-3), trainer(grad_clip=0.0)
    norm = clipped.train_step(1)["grad_norm"].item()
    assert norm > 100 * 1e-3  # the clip is active
    assert applied_grad_norm(clipped) == pytest.approx(1e-3, rel=1e-4)
    assert free.train_step(1)["grad_norm"].item() == pytest.approx(norm, rel=1e-6)  # same seed, same gradient
    assert applied_grad_norm(free) == pytest.approx(norm, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# No silent failure: non-finite steps, a second trainer, stale temporary files
# ---------------------------------------------------------------------------------------------------------------------


def _poison(monkeypatch, calls: set[int]) -> None:
    """Make the loss of the forward calls numbered in `calls` (1-based) NaN."""
    orig, n = CrossFlow.forward, [0]

    def forward(self, *args, **kw):
        n[0] += 1
        loss, parts = orig(self, *args, **kw)
        return (loss * float("nan"), parts) if n[0] in calls else (loss, parts)

    monkeypatch.setattr(CrossFlow, "forward", forward)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, {3})
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--preset", "tiny", "--steps", "6", "--ckpt-every", "2", "--log-every", "1",
              "--batch-size", "4", "--backend", "torch", "--quiet", "--keep-checkpoints", "0"])
    msg = str(e.value.code)  # sys.exit(message): exit status 1, the message on stderr
    assert msg.startswith("crossflow.train: error: non-finite loss or gradient at step 3") and "\n" not in msg
    assert f"last good checkpoint is {tmp_path / 'checkpoints' / 'step_00000002.safetensors'}" in msg
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2] and not (tmp_path / "final").exists()
    tensors, _ = read_training_checkpoint(list_checkpoints(tmp_path)[0][1])
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert [r["step"] for r in _log(tmp_path)] == [1, 2]


def test_skip_nonfinite_skips_a_bounded_number_of_steps(tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 4})
    hist = train(_cfg(tmp_path / "a", steps=5, skip_nonfinite=2))
    assert [r["step"] for r in hist] == [1, 3, 5]  # the skipped steps log nothing
    final = CrossFlow.from_pretrained(tmp_path / "a" / "final")
    assert all(torch.isfinite(v).all() for v in final.state_dict().values())
    _poison(monkeypatch, {2, 4})  # counting from 1 again
    with pytest.raises(RuntimeError, match="at step 4.*no checkpoint was written"):
        train(_cfg(tmp_path / "b", steps=5, skip_nonfinite=1))


def test_a_second_trainer_on_the_same_out_is_refused(tmp_path):
    held = lock_directory(tmp_path)
    try:
        with pytest.raises(RuntimeError, match=f"{tmp_path} is in use by a training run \\(pid {os.getpid()}\\)"):
            train(_cfg(tmp_path, steps=1))
    finally:
        held.close()
    assert not (tmp_path / "log.jsonl").exists()


def test_a_killed_trainer_does_not_leave_its_out_locked(tmp_path):
    # Another process takes the lock as the trainer does (flock on <out>/.lock), then dies by SIGKILL.
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print(1, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"
        with pytest.raises(RuntimeError, match="is in use"):
            train(_cfg(tmp_path, steps=1))
    finally:
        proc.kill()
        proc.wait()
    train(_cfg(tmp_path, steps=1))
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_stale_temporary_files_are_cleaned_on_start(tmp_path):
    train(_cfg(tmp_path, steps=2, ckpt_every=2))
    stale = [tmp_path / "checkpoints" / ".step_00000004.safetensors.999.0a1b2c3d.tmp",
             tmp_path / ".log.jsonl.999.0a1b2c3d.tmp", tmp_path / "final" / ".model.safetensors.999.0a1b2c3d.tmp"]
    for f in stale:
        f.write_bytes(b"half a checkpoint")
    train(_cfg(tmp_path, steps=3, ckpt_every=2, resume=True))
    assert not any(f.exists() for f in stale)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]


def test_a_full_disk_stops_training_in_one_line_and_the_run_resumes(tmp_path, monkeypatch):
    import crossflow.checkpoint as ckpt
    from safetensors import SafetensorError

    argv = ["--out", str(tmp_path), "--preset", "tiny", "--steps", "4", "--ckpt-every", "2", "--log-every", "1",
            "--batch-size", "4", "--backend", "torch", "--quiet"]
    real, calls = ckpt._safetensors_save_file, [0]

    def fills_up(*a, **k):  # the second checkpoint meets a full disk (safetensors' own error type)
        calls[0] += 1
        if calls[0] == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "_safetensors_save_file", fills_up)
    with pytest.raises(SystemExit) as e:  # main: a SafetensorError traceback
        main(argv)
    msg = str(e.value.code)
    assert msg == (f"crossflow.train: error: [Errno 28] No space left on device: "
                   f"'{tmp_path / 'checkpoints' / 'step_00000004.safetensors'}'"), msg
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(ckpt, "_safetensors_save_file", real)
    main([*argv, "--resume"])  # space freed: the run continues from step 2
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4] and (tmp_path / "final" / "model.safetensors").is_file()


def test_out_naming_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "run").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "run"), "--preset", "tiny"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--out" in err and "must be a directory" in err and err.count("\n") == 1, err


def test_the_final_checkpoint_carries_the_presets_sampling_settings_and_task(tmp_path):
    from crossflow.config import SAMPLING, read_checkpoint_info
    from crossflow.pipelines.image import ImagePipeline

    train(_cfg(tmp_path / "sr", preset="digits-sr", data="digits-sr", steps=1, batch_size=4))
    final = tmp_path / "sr" / "final"
    assert json.loads((final / "sampling.json").read_text()) == SAMPLING["digits-sr"]  # main: no sampling.json
    assert read_checkpoint_info(final)[1] == {"task": "super-resolution", "preset": "digits-sr"}
    assert ImagePipeline.from_pretrained(final).sampling == {"method": "euler", **SAMPLING["digits-sr"],
                                                             "official_grid": False}
    train(_cfg(tmp_path / "tiny", steps=1, batch_size=4))  # a preset without recommended settings: the sampler's own
    assert not (tmp_path / "tiny" / "final" / "sampling.json").exists()
