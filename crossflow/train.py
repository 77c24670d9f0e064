"""Train a CrossFlow model: one process, or many through `torchrun`.

    python -m crossflow.train --preset tiny --steps 50 --out runs/tiny
    torchrun --nproc_per_node 2 -m crossflow.train --preset tiny --steps 50 --out runs/tiny   # DDP (gloo on CPU)

What a run writes under --out (rank 0 only):
    log.jsonl                          one JSON line per logged step: step, loss, fm, clip, kl, lr, grad_norm, ...
    checkpoints/step_XXXXXXXX.safetensors   model + EMA + AdamW state + scheduler + step, one atomic file (no pickle)
    final/                             the EMA weights via `save_pretrained` (load with `CrossFlow.from_pretrained`)

Determinism: every random draw of step s (batch indices, VE noise, indicator dropout, t, and, through the global RNG,
dropout) comes from seeds derived from (seed, s, rank). A run resumed from a checkpoint therefore replays exactly the
steps an uninterrupted run would have taken. Data are drawn with replacement, B per rank per step.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import kernels
from crossflow.checkpoint import atomic_write, load_state_dict_strict, read_safetensors
from crossflow.config import CrossFlowConfig
from crossflow.data import DATASETS, build_dataset, collate, stable_seed
from crossflow.flow import crossflow_loss
from crossflow.model import CrossFlow

CKPT_FORMAT = "crossflow-train-checkpoint/1"
_CKPT_RE = re.compile(r"^step_(\d{8})\.safetensors$")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. The model itself is the named preset (`CrossFlowConfig.from_name`)."""

    out: str
    preset: str = "tiny"
    data: str = "synthetic"  # a key of crossflow.data.DATASETS
    data_size: int = 4096  # samples, for generated data sets
    steps: int = 1000
    batch_size: int = 32  # per process
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.03  # not on biases, norms, embeddings, logit_scale
    warmup_steps: int = 100  # linear warm-up, then constant (official)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.9999
    seed: int = 1234
    log_every: int = 10
    ckpt_every: int = 500  # a checkpoint is also written at the last step
    keep_checkpoints: int = 2  # newest kept; 0 keeps all
    device: str | None = None  # default: cuda if available, else cpu
    backend: str = "auto"  # kernels backend: auto | torch | triton
    bf16: bool = True  # bf16 autocast, CUDA only
    grad_checkpointing: bool = False
    resume: bool = False
    quiet: bool = False
    dump_weights_hash: str | None = None  # debugging: each rank writes a hash of its weights to FILE.rank<r>

    def __post_init__(self) -> None:
        CrossFlowConfig.from_name(self.preset)  # raises ValueError for an unknown preset
        bad = {k: getattr(self, k) for k in ("steps", "batch_size", "log_every", "ckpt_every", "data_size")
               if getattr(self, k) < 1}
        bad.update({k: getattr(self, k) for k in ("warmup_steps", "grad_clip", "weight_decay", "keep_checkpoints")
                    if getattr(self, k) < 0})
        if not self.lr > 0:
            bad["lr"] = self.lr
        if not 0.0 <= self.ema_decay < 1.0:
            bad["ema_decay"] = self.ema_decay
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            bad["betas"] = self.betas
        if bad:
            raise ValueError(f"TrainConfig: invalid values {bad}")
        if self.data not in DATASETS:
            raise ValueError(f"TrainConfig: unknown data {self.data!r}; choose one of {sorted(DATASETS)}")
        if self.backend not in kernels.BACKENDS:
            raise ValueError(f"TrainConfig: unknown backend {self.backend!r}; choose one of {kernels.BACKENDS}")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: distributed context, optimizer groups, EMA, hashing
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_arg: str | None) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = _Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    use_cuda = device_arg.startswith("cuda") if device_arg else torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", d.local_rank) if world > 1 else torch.device(device_arg or "cuda")
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg or "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices/kernels; none on biases, norm scales, embeddings, logit_scale."""
    no_decay: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            no_decay.update(id(p) for p in mod.parameters(recurse=False))
    decay, other = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        plain = p.ndim < 2 or id(p) in no_decay or leaf in ("logit_scale", "pos_embed", "pos_embedding")
        (other if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for floating parameters; buffers are copied."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def weights_hash(module: nn.Module) -> str:
    """sha256 over the module's state dict (sorted names, raw bytes): equal iff the weights are bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _LossModule(nn.Module):
    """Wraps the loss so DDP sees one forward call that touches every parameter (VE, image encoder, flow)."""

    def __init__(self, model: CrossFlow) -> None:
        super().__init__()
        self.model = model

    def forward(self, emb, mask, z1, generator, images=None):
        return crossflow_loss(self.model, emb, mask, z1, generator, self.model.config, images)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file, written atomically; JSON metadata for everything that is not a tensor
# ---------------------------------------------------------------------------------------------------------------------


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the training checkpoints in `out`, oldest first."""
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / f.name) for f in d.iterdir() if (m := _CKPT_RE.match(f.name))]
    return sorted(found)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item()
    return obj


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, val in state.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = val
            else:
                scalars[f"{pid}/{key}"] = val
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():  # "<pid>/<key>"
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = val
    for name, val in meta["scalars"].items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = val
    groups = meta["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared storage


def _config_dict(cfg: CrossFlowConfig) -> dict[str, Any]:
    return json.loads(cfg.to_json())


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------


class Trainer:
    """One training run. `Trainer(tc).fit()` trains to `tc.steps` and returns the logged records (rank 0)."""

    def __init__(self, tc: TrainConfig) -> None:
        self.tc = tc
        self.out = Path(tc.out)
        self.dist, self.device = _init_distributed(tc.device)
        self.cfg = CrossFlowConfig.from_name(tc.preset)
        resume_from = self._checkpoint_to_resume()  # checked before anything is created or written

        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.model = CrossFlow(self.cfg).to(self.device)
        if tc.grad_checkpointing:
            _enable_grad_checkpointing(self.model)
        self.model.train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(param_groups(self.model, tc.weight_decay), lr=tc.lr, betas=tc.betas)
        warmup = tc.warmup_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)  # linear warm-up, then constant
        self.step = 0
        if resume_from is not None:
            self._load(resume_from)

        self.data = build_dataset(tc.data, self.cfg, seed=tc.seed, size=tc.data_size)
        loss_module = _LossModule(self.model)
        self.loss_fn: nn.Module = loss_module
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.loss_fn = nn.parallel.DistributedDataParallel(loss_module, device_ids=ids)
        self.history: list[dict[str, Any]] = []

    # ----- setup -----

    def _checkpoint_to_resume(self) -> Path | None:
        found = list_checkpoints(self.out)
        if not self.tc.resume:
            if found:
                raise ValueError(f"{self.out} already holds training checkpoints ({found[-1][1].name}); "
                                 "pass --resume to continue that run, or choose a new --out")
            return None
        if not found:
            if self.dist.main:
                print(f"[train] --resume: no checkpoint in {self.out}; starting from step 0", file=sys.stderr)
            return None
        return found[-1][1]

    def _load(self, path: Path) -> None:
        try:
            tensors, meta = read_safetensors(path)
            if meta.get("format") != CKPT_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {CKPT_FORMAT!r}")
            step = int(meta["step"])
            model_cfg, opt_meta, sched, prev_tc = (
                json.loads(meta[k]) for k in ("model_config", "optimizer", "scheduler", "train_config"))
        except (ValueError, KeyError) as e:  # truncated/corrupted file, a foreign file, missing metadata
            raise ValueError(f"cannot resume: training checkpoint {path} is unreadable or corrupted ({e}). Nothing "
                             "was changed; delete that file to resume from an older checkpoint, or use a new --out."
                             ) from None
        if model_cfg != _config_dict(self.cfg):
            raise ValueError(f"cannot resume from {path}: it was trained with another model config "
                             f"(checkpoint {model_cfg}, now {_config_dict(self.cfg)})")
        pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        load_state_dict_strict(self.model, pick("model/"), f"{path} (model)")
        load_state_dict_strict(self.ema, pick("ema/"), f"{path} (ema)")
        self.opt.load_state_dict(_optimizer_from_flat(pick("optim/"), opt_meta))
        self.sched.load_state_dict(sched)
        self.step = step
        # These change the data stream: the run continues, but no longer replays the uninterrupted one.
        now = {**_jsonable(dataclasses.asdict(self.tc)), "world_size": self.dist.world}
        prev_tc["world_size"] = int(meta.get("world_size", 1))
        changed = {k: (prev_tc.get(k), now[k]) for k in ("seed", "batch_size", "data", "data_size", "world_size")
                   if prev_tc.get(k) != now[k]}
        if changed and self.dist.main:
            print(f"[train] warning: resuming with changed {changed} (checkpoint, now)", file=sys.stderr)
        if self.dist.main:
            self._truncate_log(step)
            print(f"[train] resumed from {path} at step {step}", file=sys.stderr)

    def _truncate_log(self, step: int) -> None:
        # Records past the checkpoint belong to the interrupted tail that is about to be replayed.
        log = self.out / "log.jsonl"
        if not log.exists():
            return
        keep = []
        for ln in log.read_text().splitlines():
            try:
                if json.loads(ln).get("step", 0) <= step:
                    keep.append(ln)
            except (ValueError, AttributeError):  # a line torn by the crash
                continue
        atomic_write(log, lambda p: Path(p).write_text("".join(ln + "\n" for ln in keep)))

    # ----- one step -----

    def _autocast(self):
        if self.device.type == "cuda" and self.tc.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        """Update number `step` (1-based). Returns detached loss components (device tensors, no host sync)."""
        tc, d = self.tc, self.dist
        g = torch.Generator().manual_seed(stable_seed("train-step", tc.seed, step, d.rank))
        torch.manual_seed(stable_seed("train-global", tc.seed, step, d.rank))  # dropout and any unseeded draw
        idx = torch.randint(len(self.data), (tc.batch_size,), generator=g)
        get_batch = getattr(self.data, "get_batch", None)  # optional vectorised path of a dataset
        batch = get_batch(idx) if get_batch is not None else collate([self.data[i] for i in idx.tolist()])
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self._autocast():
            loss, parts = self.loss_fn(batch["text_emb"], batch["text_mask"], batch["latent"], g, batch.get("image"))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if tc.grad_clip > 0:
            parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        self.opt.step()
        self.sched.step()
        ema_update(self.ema, self.model, tc.ema_decay)
        return {"loss": loss.detach(), **parts}

    # ----- the loop -----

    def fit(self) -> list[dict[str, Any]]:
        tc = self.tc
        bar = tqdm(total=tc.steps, initial=self.step, disable=tc.quiet or not self.dist.main or not sys.stderr.isatty(),
                   desc="train", dynamic_ncols=True)
        acc: dict[str, torch.Tensor] = {}
        n_acc, t0 = 0, time.perf_counter()
        with kernels.use_backend(tc.backend):
            while self.step < tc.steps:
                lr = self.sched.get_last_lr()[0]
                parts = self.train_step(self.step + 1)
                self.step += 1
                for k, v in parts.items():
                    acc[k] = acc[k] + v.float() if k in acc else v.float()
                n_acc += 1
                last = self.step == tc.steps
                if self.step % tc.log_every == 0 or last:
                    rec = self._log(acc, n_acc, lr, time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    acc, n_acc = {}, 0
                if self.step % tc.ckpt_every == 0 or last:
                    self.save_checkpoint()
                bar.update(1)
        bar.close()
        if self.dist.main:
            self.ema.save_pretrained(str(self.out / "final"))
        if tc.dump_weights_hash:
            self._dump_hash(tc.dump_weights_hash)
        if self.dist.world > 1:
            dist.barrier()
        return self.history

    def _log(self, acc: dict[str, torch.Tensor], n: int, lr: float, elapsed: float) -> dict[str, Any]:
        keys = sorted(acc)
        vec = torch.stack([acc[k] for k in keys]) / n
        if self.dist.world > 1:  # mean over ranks (SUM then divide: gloo has no AVG)
            dist.all_reduce(vec)
            vec /= self.dist.world
        rec = {"step": self.step, **dict(zip(keys, vec.tolist())), "lr": lr, "time": round(elapsed, 3)}
        self.history.append(rec)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step_<step>.safetensors atomically (rank 0); prune old ones beyond keep_checkpoints."""
        if not self.dist.main:
            return None
        from safetensors.torch import save_file

        tensors = {f"model/{k}": _cpu(v) for k, v in self.model.state_dict().items()}
        tensors.update({f"ema/{k}": _cpu(v) for k, v in self.ema.state_dict().items()})
        opt_tensors, opt_meta = _optimizer_to_flat(self.opt)
        tensors.update({k: _cpu(v) for k, v in opt_tensors.items()})
        meta = {
            "format": CKPT_FORMAT,
            "step": str(self.step),
            "model_config": json.dumps(_config_dict(self.cfg)),
            "train_config": json.dumps(_jsonable(dataclasses.asdict(self.tc))),
            "optimizer": json.dumps(opt_meta),
            "scheduler": json.dumps(_jsonable(self.sched.state_dict())),
            "world_size": str(self.dist.world),
        }
        path = self.out / "checkpoints" / f"step_{self.step:08d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))
        if self.tc.keep_checkpoints:
            for _, old in list_checkpoints(self.out)[: -self.tc.keep_checkpoints]:
                old.unlink(missing_ok=True)
        return path

    def _dump_hash(self, target: str) -> None:
        path = target.replace("{rank}", str(self.dist.rank)) if "{rank}" in target else f"{target}.rank{self.dist.rank}"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        rec = {"rank": self.dist.rank, "step": self.step, "model": weights_hash(self.model),
               "ema": weights_hash(self.ema)}
        Path(path).write_text(json.dumps(rec) + "\n")


def _enable_grad_checkpointing(model: nn.Module) -> None:
    for mod in (model, getattr(model, "flow", None), getattr(model, "text_ve", None)):
        if mod is not None and hasattr(mod, "gradient_checkpointing"):
            mod.gradient_checkpointing = True
            return
    raise ValueError("grad_checkpointing: this model exposes no `gradient_checkpointing` switch")


def train(tc: TrainConfig) -> list[dict[str, Any]]:
    """Run (or resume) training; returns the logged records. Tears the process group down when it set one up."""
    owns_pg = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        return Trainer(tc).fit()
    finally:
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig.__dataclass_fields__
    p = argparse.ArgumentParser(prog="crossflow.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl, final/)")
    p.add_argument("--preset", default=d["preset"].default, help="model preset (CrossFlowConfig.from_name)")
    p.add_argument("--data", default=d["data"].default, help=f"training data: {sorted(DATASETS)}")
    for name, typ, text in (
        ("data_size", int, "samples in a generated data set"), ("steps", int, "total optimizer steps"),
        ("batch_size", int, "per process"), ("lr", float, "peak learning rate (AdamW)"),
        ("weight_decay", float, "not on biases, norms, embeddings, logit_scale"),
        ("warmup_steps", int, "linear warm-up, then constant"), ("grad_clip", float, "max grad norm; 0 disables"),
        ("ema_decay", float, "EMA of the weights (saved to <out>/final)"), ("seed", int, "model init, data, noise"),
        ("log_every", int, "steps per log.jsonl line"), ("ckpt_every", int, "steps per training checkpoint"),
        ("keep_checkpoints", int, "newest checkpoints kept; 0 keeps all"),
    ):
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=d[name].default, help=text)
    p.add_argument("--betas", type=float, nargs=2, default=d["betas"].default, help="AdamW betas")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available)")
    p.add_argument("--backend", default="auto", help="kernels backend: auto | torch | triton")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="disable bf16 autocast on CUDA")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute flow blocks in the backward pass")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dump-weights-hash", default=None, metavar="FILE",
                   help="debugging: each rank writes a hash of its final weights to FILE.rank<r>")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """CLI entry point; raises ValueError on bad arguments (unknown preset, non-positive steps, ...)."""
    args = build_parser().parse_args(argv)
    kwargs = vars(args)
    kwargs["betas"] = tuple(kwargs["betas"])
    return train(TrainConfig(**kwargs))


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"crossflow.train: error: {e}")
