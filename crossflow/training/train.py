"""Train a CrossFlow model: one process, or many through `torchrun`.

    python -m crossflow.train --preset tiny --steps 50 --out runs/tiny
    torchrun --nproc_per_node 2 -m crossflow.train --preset tiny --steps 50 --out runs/tiny   # DDP (gloo on CPU)
    torchrun --nproc_per_node 8 -m crossflow.train --preset dimr-256-clip --fsdp ...   # FSDP2,
                                                                                       # crossflow.training.distributed
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

import copy
import dataclasses
import json
import os
import sys
import time
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import crossflow_kernels
from crossflow import checkpoint as ckpt
from crossflow.training import distributed as fsdp
from crossflow.config import SAMPLING, CrossFlowConfig
from crossflow.data import collate, stable_seed
from crossflow.training.datasets import DATASETS, batch_inputs
from crossflow.models.model import CrossFlow
from crossflow.training.optim import ema_update, lr_factor, param_groups
from crossflow.training.train_config import (RECIPES, TrainConfig, build_parser,  # noqa: F401 (the API, as before)
                                             parse_config)  # noqa: F401


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
        shift = {"augment_shift": tc.augment_shift} if tc.augment_shift else {}  # 0: the call as before
        if tc.augment_shift and tc.augment_shift_prob < 1.0:
            shift["augment_prob"] = tc.augment_shift_prob
        self.data = DATASETS[tc.data](self.cfg, tc.seed, tc.data_size, **shift)
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


def main(argv: list[str] | None = None, prog: str = "crossflow.train") -> list[dict[str, Any]]:
    """CLI entry point: parse, train. Usage errors exit 2, runtime errors (a corrupted checkpoint, a locked --out, a
    non-finite loss, a disk error) exit 1, each as one line `<prog>: error: ...`."""
    return run(parse_config(argv, prog), prog)


def run(tc: TrainConfig, prog: str = "crossflow.train") -> list[dict[str, Any]]:
    """Train `tc` as the command line does: runtime errors exit 1 in one line `<prog>: error: ...`."""
    try:
        return train(tc)
    except (ValueError, RuntimeError, OSError) as e:
        sys.exit(f"{prog}: error: " + " ".join(str(e).split()))


if __name__ == "__main__":
    main()
