"""Train a CrossFlow model: one process, or many through `torchrun`.

    python -m crossflow.train --preset tiny --steps 50 --out runs/tiny
    torchrun --nproc_per_node 2 -m crossflow.train --preset tiny --steps 50 --out runs/tiny   # DDP (gloo on CPU)
    torchrun --nproc_per_node 8 -m crossflow.train --preset dimr-256-clip --fsdp ...   # FSDP2, crossflow.distributed
    crossflow train --preset digits                     # the same parser; a preset's recipe supplies the defaults

What a run writes under --out (rank 0 only; default runs/<preset>):
    log.jsonl                          one JSON line per logged step: step, loss, fm, clip, kl, lr, grad_norm, ...
    checkpoints/step_XXXXXXXX.safetensors   model + EMA + AdamW state + scheduler + step, one atomic, checksummed file
    final/                             the EMA weights via `save_pretrained` (load with `CrossFlow.from_pretrained`),
                                       with the preset's sampler settings (`config.SAMPLING`) as sampling.json
    .lock                              held while a trainer runs there: a second one on the same --out is refused

Every random draw of step s (batch, VE noise, indicator dropout, t, dropout) is seeded by (seed, s, rank): a resumed
run replays the uninterrupted one exactly, log included. Data are drawn with replacement, B per rank per step. A
non-finite loss or gradient never reaches the weights: the run stops with an error (or skips the step, at most
--skip-nonfinite times), keeping the checkpoints written so far.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import crossflow_kernels
from crossflow import checkpoint as ckpt
from crossflow import distributed as fsdp
from crossflow._cli_base import Parser
from crossflow.config import SAMPLING, CrossFlowConfig
from crossflow.data import collate, stable_seed
from crossflow.datasets import DATASETS, batch_inputs
from crossflow.model import CrossFlow
from crossflow.optim import LR_SCHEDULES, ema_update, lr_factor, param_groups


# Training recipes: the defaults `--preset NAME` brings along (explicit flags win).
RECIPES: dict[str, dict[str, Any]] = {
    "digits": dict(data="digits", steps=3600, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                   lr_schedule="cosine", log_every=50, ckpt_every=600),
    "digits-caption": dict(data="digits-caption", steps=1200, batch_size=64, lr=1e-3, warmup_steps=100,
                           ema_decay=0.995, log_every=50, ckpt_every=400),
    "digits-sr": dict(data="digits-sr", steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.995,
                      log_every=100, ckpt_every=500),
    "digits-vary": dict(data="digits-vary", steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.995,
                        log_every=100, ckpt_every=500),
}
RECIPES["dimr-digits"] = dict(RECIPES["digits"])  # the same data and schedule with the DiMR flow network


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. The model itself is the named preset (`CrossFlowConfig.from_name`)."""

    out: str
    preset: str = "tiny"
    data: str = "synthetic"  # a key of crossflow.datasets.DATASETS
    data_size: int = 4096  # samples, for generated data sets
    steps: int = 1000
    batch_size: int = 32  # per process
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.03  # not on biases, norms, embeddings, logit_scale
    warmup_steps: int = 100  # linear warm-up, then constant (official)
    lr_schedule: str = "constant"  # after the warm-up: constant (official) | cosine (to 0 at the last step)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.9999
    seed: int = 1234
    log_every: int = 10
    ckpt_every: int = 500  # a checkpoint is also written at the last step
    keep_checkpoints: int = 2  # newest kept; 0 keeps all
    skip_nonfinite: int = 0  # steps with a non-finite loss/gradient skipped before the run stops
    device: str | None = None  # default: cuda if available, else cpu
    backend: str = "auto"  # kernels backend: auto (Triton where it can run, else torch) | torch | triton
    bf16: bool = True  # bf16 autocast, CUDA only
    grad_checkpointing: bool = False
    fsdp: bool = False  # shard model, EMA and AdamW state over the ranks (FSDP2); implies grad_checkpointing
    resume: bool = False
    quiet: bool = False
    dump_weights_hash: str | None = None  # debugging: each rank writes a hash of its weights to FILE.rank<r>

    def __post_init__(self) -> None:  # ValueError naming the bad values, before anything is created or written
        CrossFlowConfig.from_name(self.preset)  # raises ValueError for an unknown preset
        ok = {k: getattr(self, k) >= 1 for k in ("steps", "batch_size", "log_every", "ckpt_every", "data_size")}
        ok.update({k: getattr(self, k) >= 0 for k in ("warmup_steps", "keep_checkpoints", "skip_nonfinite")})
        ok.update({k: 0 <= getattr(self, k) < math.inf for k in ("grad_clip", "weight_decay")})
        ok.update(lr=0 < self.lr < math.inf, ema_decay=0 <= self.ema_decay < 1,
                  betas=len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas))
        if bad := {k: getattr(self, k) for k, good in ok.items() if not good}:
            raise ValueError(f"TrainConfig: invalid values {bad}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TrainConfig: unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if self.data not in DATASETS:
            raise ValueError(f"TrainConfig: unknown data {self.data!r}; choose one of {sorted(DATASETS)}")
        if self.backend not in crossflow_kernels.BACKENDS:
            raise ValueError(f"TrainConfig: unknown backend {self.backend!r}; choose one of {crossflow_kernels.BACKENDS}")
        try:
            dev = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise ValueError(f"TrainConfig: invalid device {self.device!r} ({e})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"TrainConfig: device {self.device!r} requested but CUDA is not available")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"TrainConfig: --out {self.out} is a file; it must be a directory (created if missing)")
        if self.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ValueError("TrainConfig: fsdp shards over the processes of a torchrun launch: use torchrun")
        if self.backend == "triton" and (dev.type == "cuda") == crossflow_kernels.interpreting():
            raise ValueError(f"TrainConfig: backend 'triton' cannot run on {dev.type}: it needs CUDA, or "
                             "TRITON_INTERPRET=1 on the CPU (slow); use --backend auto or torch")


# ---- The trainer


class Trainer:
    """One training run. `Trainer(tc).fit()` trains to `tc.steps` and returns the logged records; `close()` releases
    the run directory (`train(tc)` does both)."""

    def __init__(self, tc: TrainConfig) -> None:
        self.tc = tc
        self.out = Path(tc.out)
        self.rank, self.world, self.device = fsdp.init_distributed(tc.device)
        self.main = self.rank == 0
        self.cfg = CrossFlowConfig.from_name(tc.preset)
        self._lock = ckpt.lock_directory(self.out) if self.main else None  # refuses a second trainer on --out
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        tc = self.tc
        if self.main:  # what a killed write left behind; nobody else writes here while we hold the lock
            for sub in ("", "checkpoints", "final"):
                ckpt.clean_stale_tmp(self.out / sub)
        resume_from = self._checkpoint_to_resume()  # checked before anything is created or written

        torch.manual_seed(tc.seed)  # identical initial weights on every rank; FSDP: whole on the CPU until sharded
        self.model = CrossFlow(self.cfg).to("cpu" if tc.fsdp else self.device)
        self.model.flow.gradient_checkpointing = tc.grad_checkpointing or tc.fsdp
        self.model.train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(param_groups(self.model, tc.weight_decay), lr=tc.lr, betas=tc.betas)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(tc.warmup_steps, tc.steps, tc.lr_schedule))
        self.step, self.skipped, self.n_acc, self.history = 0, 0, 0, []
        self.acc: dict[str, torch.Tensor] = {}  # sums of the loss terms over the n_acc steps since the last log line
        if resume_from is not None:
            self._load(resume_from)
        self.data = DATASETS[tc.data](self.cfg, tc.seed, tc.data_size)
        self.net: nn.Module = self.model  # what the step calls: the model, or DDP around it
        if tc.fsdp:  # after the load: a checkpoint loads whole, then model, EMA and AdamW state are sharded
            fsdp.shard_training(self.model, self.ema, self.opt, self.device, self.world)
        elif self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _checkpoint_to_resume(self) -> Path | None:
        found = ckpt.list_checkpoints(self.out)
        if found and not self.tc.resume:
            raise ValueError(f"{self.out} already holds training checkpoints ({found[-1][1].name}); pass --resume to "
                             "continue that run, or choose a new --out")
        if self.tc.resume and not found and self.main:
            print(f"[train] --resume: no checkpoint in {self.out}; starting from step 0", file=sys.stderr)
        return found[-1][1] if found and self.tc.resume else None

    def _load(self, path: Path) -> None:
        meta, tensors = ckpt.load_training_checkpoint(path, self.cfg, self.model, self.ema, self.opt, self.sched)
        self.step, self.skipped = int(meta["step"]), int(meta.get("skipped", 0))
        # The partial log window: the next log line then averages the same steps as an uninterrupted run's.
        self.acc = {k[4:]: v.to(self.device) for k, v in tensors.items() if k.startswith("log/")}
        self.n_acc = int(meta.get("log_n", 0))
        # These change the data stream: the run continues, but no longer replays the uninterrupted one.
        prev = {**json.loads(meta["train_config"]), "world_size": int(meta.get("world_size", 1))}
        now = {**ckpt.jsonable(dataclasses.asdict(self.tc)), "world_size": self.world}
        changed = {k: (prev.get(k), now[k]) for k in ("seed", "batch_size", "data", "data_size", "world_size")
                   if prev.get(k) != now[k]}
        if self.main:
            if changed:
                print(f"[train] warning: resuming with changed {changed} (checkpoint, now)", file=sys.stderr)
            # Drop what is about to be replayed: the interrupted tail, and a record that the run's last step forced
            # off the --log-every grid (its window is in the checkpoint and continues into the next record).
            keep = self.step if self.step >= self.tc.steps else self.step - self.step % self.tc.log_every
            ckpt.truncate_log(self.out / "log.jsonl", keep)
            print(f"[train] resumed from {path} at step {self.step}", file=sys.stderr)

    def batch_loss(self, step: int, rank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of rank `rank`'s batch at step `step`: every draw is seeded by (seed, step, rank)."""
        tc = self.tc
        g = torch.Generator().manual_seed(stable_seed("train-step", tc.seed, step, rank))
        torch.manual_seed(stable_seed("train-global", tc.seed, step, rank))  # dropout and any unseeded draw
        idx = torch.randint(len(self.data), (tc.batch_size,), generator=g)
        batch = collate([self.data[i] for i in idx.tolist()])
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        bf16 = self.device.type == "cuda" and tc.bf16
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext():
            (emb, mask, z1, images), extra = batch_inputs(batch)
            return self.net(emb, mask, z1, g, images, **extra)

    def train_step(self, step: int) -> dict[str, torch.Tensor] | None:
        """Update number `step` (1-based). Returns detached loss terms and the pre-clip gradient norm (device
        tensors), or None for a skipped non-finite step; raises RuntimeError when the run must stop."""
        tc = self.tc
        loss, parts = self.batch_loss(step, self.rank)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        fsdp.average_unsharded_grads(self.model, self.world)  # FSDP only: what it leaves whole
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = fsdp.grad_norm([p.grad for p in params])  # pre-clip; inf/nan if any grad is
        bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(norm)).float()
        if self.world > 1:  # every rank must take the same decision
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():  # one scalar sync per step: the price of never applying a non-finite update
            return self._nonfinite(step, loss, norm)
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, tc.grad_clip, norm)
        self.opt.step()
        self.sched.step()
        ema_update(self.ema, self.model, tc.ema_decay)
        return {"loss": loss.detach(), **parts, "grad_norm": norm.detach()}

    def _nonfinite(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        what = f"non-finite loss or gradient at step {step} (loss {loss.item():.4g}, grad norm {norm.item():.4g})"
        if self.skipped < self.tc.skip_nonfinite:
            self.skipped += 1
            if self.main:
                print(f"[train] warning: {what}; skipped ({self.skipped}/{self.tc.skip_nonfinite})", file=sys.stderr)
            return None
        found = ckpt.list_checkpoints(self.out)
        kept = f"the last good checkpoint is {found[-1][1]}" if found else "no checkpoint was written"
        raise RuntimeError(f"{what}: training stopped, {kept}. Lower --lr, raise --warmup-steps, or allow a few "
                           "bad steps with --skip-nonfinite N")

    def fit(self) -> list[dict[str, Any]]:
        tc = self.tc
        bar = tqdm(total=tc.steps, initial=self.step, disable=tc.quiet or not self.main or not sys.stderr.isatty(),
                   desc="train", dynamic_ncols=True)
        t0 = time.perf_counter()
        with crossflow_kernels.use_backend(tc.backend):
            while self.step < tc.steps:
                lr = self.sched.get_last_lr()[0]
                self.step += 1
                parts = self.train_step(self.step)
                for k, v in (parts or {}).items():
                    self.acc[k] = self.acc[k] + v.float() if k in self.acc else v.float()
                self.n_acc += parts is not None
                last = self.step == tc.steps
                if (self.step % tc.log_every == 0 or last) and self.n_acc:  # off-grid at the last step: the
                    rec = self._log(lr, time.perf_counter() - t0, reset=self.step % tc.log_every == 0)  # window stays
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if self.step % tc.ckpt_every == 0 or last:
                    self.save_checkpoint()
                bar.update(1)
        bar.close()
        ema = fsdp.whole(self.ema, self.main, self.cfg)  # under FSDP gathered (to rank 0)
        if self.main:  # with the preset's sampler settings, so that `crossflow sample --checkpoint` uses them
            ckpt.save_pretrained(ema, str(self.out / "final"), sampling=SAMPLING.get(tc.preset), preset=tc.preset)
        if tc.dump_weights_hash:
            self._dump_hash(tc.dump_weights_hash)
        if self.world > 1:
            dist.barrier()
        return self.history

    def _window(self) -> torch.Tensor:
        """The log window's sums (sorted keys) averaged over ranks (SUM then divide: gloo has no AVG)."""
        vec = torch.stack([self.acc[k] for k in sorted(self.acc)])
        if self.world > 1:
            dist.all_reduce(vec)
            vec /= self.world
        return vec

    def _log(self, lr: float, elapsed: float, reset: bool = True) -> dict[str, Any]:
        rec = {"step": self.step, **dict(zip(sorted(self.acc), (self._window() / self.n_acc).tolist())), "lr": lr,
               "time": round(elapsed, 3)}
        if reset:
            self.acc, self.n_acc = {}, 0
        self.history.append(rec)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step_<step>.safetensors atomically (rank 0); prune old ones beyond keep_checkpoints."""
        if self.n_acc:  # a window cut by the checkpoint: every rank keeps (and the file stores) the rank mean
            self.acc = dict(zip(sorted(self.acc), self._window()))
        model, ema, opt = (fsdp.whole(m, self.main, self.cfg) for m in (self.model, self.ema, self.opt))  # FSDP
        if not self.main:
            return None
        meta = {"step": self.step, "skipped": self.skipped, "log_n": self.n_acc, "world_size": self.world,
                "model_config": json.dumps(self.cfg.to_dict()),
                "scheduler": json.dumps(ckpt.jsonable(self.sched.state_dict())),
                "train_config": json.dumps(ckpt.jsonable(dataclasses.asdict(self.tc)))}
        path = ckpt.checkpoint_path(self.out, self.step)
        window = {f"log/{k}": v for k, v in self.acc.items()}  # the log window cut by this checkpoint
        meta = {k: str(v) for k, v in meta.items()}
        ckpt.save_training_checkpoint(path, model, ema, opt, window, meta)
        if self.tc.keep_checkpoints:
            for _, old in ckpt.list_checkpoints(self.out)[: -self.tc.keep_checkpoints]:
                old.unlink(missing_ok=True)
        return path

    def _dump_hash(self, target: str) -> None:  # debugging DDP: equal hashes iff bit-identical weights on every rank
        whole = {k: fsdp.whole(m, True).state_dict() for k, m in (("model", self.model), ("ema", self.ema))}
        rec = {"rank": self.rank, "step": self.step, **{k: ckpt.tensors_sha256(sd) for k, sd in whole.items()}}
        ckpt.atomic_write(f"{target}.rank{self.rank}", lambda p: Path(p).write_text(json.dumps(rec) + "\n"))


def train(tc: TrainConfig) -> list[dict[str, Any]]:
    """Run (or resume) training; returns the logged records. Tears the process group down when it set one up."""
    owns_pg = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        with closing(Trainer(tc)) as trainer:  # close(): release --out
            return trainer.fit()
    finally:
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()


# ---- CLI: `python -m crossflow.train` and `crossflow train` share this parser


def build_parser(prog: str = "crossflow.train") -> argparse.ArgumentParser:
    """The training parser; its defaults are TrainConfig's (`parse_config` overlays a preset's recipe)."""
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    recipes = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in r.items()) for name, r in RECIPES.items())
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0],
               epilog=f"recipes (defaults of --preset NAME; explicit flags win): {recipes}")
    p.error_prefix = prog
    p.add_argument("--out", default=None, help="run directory (checkpoints, log.jsonl, final/); default runs/<preset>")
    p.add_argument("--preset", default=d["preset"], help="model preset (default: %(default)s)")
    p.add_argument("--data", default=d["data"], help=f"training data: {sorted(DATASETS)} (default: %(default)s)")
    for name, typ, text in (
        ("data_size", int, "samples in a generated data set"), ("steps", int, "total optimizer steps"),
        ("batch_size", int, "per process"), ("lr", float, "peak learning rate (AdamW)"),
        ("weight_decay", float, "not on biases, norms, embeddings, logit_scale"),
        ("warmup_steps", int, "linear warm-up, then constant"), ("grad_clip", float, "max grad norm; 0 disables"),
        ("ema_decay", float, "EMA of the weights (saved to <out>/final)"), ("seed", int, "model init, data, noise"),
        ("log_every", int, "steps per log.jsonl line"), ("ckpt_every", int, "steps per training checkpoint"),
        ("keep_checkpoints", int, "newest checkpoints kept; 0 keeps all"),
        ("skip_nonfinite", int, "steps with a non-finite loss or gradient skipped before the run stops"),
    ):
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=d[name], help=text + " (default: %(default)s)")
    p.add_argument("--lr-schedule", default=d["lr_schedule"], choices=LR_SCHEDULES,
                   help="after the warm-up: constant (official) or cosine to 0 (default: %(default)s)")
    p.add_argument("--betas", type=float, nargs=2, default=d["betas"], help="AdamW betas (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available)")
    p.add_argument("--backend", default=d["backend"], choices=crossflow_kernels.BACKENDS,
                   help="kernels backend: auto = Triton where it can run, else torch (default: %(default)s)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="disable bf16 autocast on CUDA")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute flow blocks in the backward pass")
    p.add_argument("--fsdp", action="store_true", help="shard model, EMA and optimizer state over the torchrun ranks "
                   "(FSDP2, one unit per flow block; implies --grad-checkpointing); checkpoints stay whole")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dump-weights-hash", default=None, metavar="FILE",
                   help="debugging: each rank writes a hash of its final weights to FILE.rank<r>")
    return p


def parse_config(argv: list[str] | None = None, prog: str = "crossflow.train") -> TrainConfig:
    """Command line -> TrainConfig: the preset's recipe as defaults, explicit flags winning. A usage error (argparse's
    or TrainConfig's validation) prints one line and exits with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    first, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])  # which preset?
    parser.set_defaults(**RECIPES.get(first.preset, {}))  # so --help and the parse both show the recipe
    kw = vars(parser.parse_args(argv))
    kw["betas"] = tuple(kw["betas"])
    kw["out"] = kw["out"] or os.path.join("runs", kw["preset"])
    try:
        return TrainConfig(**kw)
    except ValueError as e:
        parser.exit(2, f"{prog}: error: {e}\n")


def main(argv: list[str] | None = None, prog: str = "crossflow.train") -> list[dict[str, Any]]:
    """CLI entry point: parse, train. Usage errors exit 2, runtime errors (a corrupted checkpoint, a locked --out, a
    non-finite loss, a disk error) exit 1, each as one line `<prog>: error: ...`."""
    tc = parse_config(argv, prog)
    try:
        return train(tc)
    except (ValueError, RuntimeError, OSError) as e:
        sys.exit(f"{prog}: error: " + " ".join(str(e).split()))


if __name__ == "__main__":
    main()
