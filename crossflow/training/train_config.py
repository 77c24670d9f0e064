"""What a training run is (`TrainConfig`, the presets' recipes) and the command line that makes one (`build_parser`,
`parse_config`). Standard library and `crossflow.config` only at import time, so that `crossflow train --help` and
argument errors answer before torch and the trainer (`crossflow.training.train`) load."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from crossflow._cli_base import Parser
from crossflow.config import CrossFlowConfig

# The command line's names of crossflow_kernels.BACKENDS and crossflow.training.datasets.DATASETS, spelled out so that
# parsing imports no torch (tests/crossflow/training/test_train.py checks that they agree).
BACKENDS = ("auto", "torch", "triton")
DATA_NAMES = ("synthetic", "digits", "digits-caption", "digits-sr", "digits-vary")
DESCRIPTION = "Train a CrossFlow model: one process, or many through `torchrun`."

# Training recipes: the defaults `--preset NAME` brings along (explicit flags win).
RECIPES: dict[str, dict[str, Any]] = {
    "digits": dict(data="digits", steps=7200, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                   lr_schedule="cosine", log_every=50, ckpt_every=600),
    "digits-caption": dict(data="digits-caption", steps=2400, batch_size=64, lr=1e-3, warmup_steps=100,
                           ema_decay=0.995, lr_schedule="cosine", log_every=50, ckpt_every=400, augment_shift=2,
                           augment_shift_prob=0.8),
    "digits-sr": dict(data="digits-sr", steps=6000, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.995,
                      lr_schedule="cosine", log_every=100, ckpt_every=1000, augment_shift=2, augment_shift_prob=0.5),
    "digits-vary": dict(data="digits-vary", steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.995,
                        log_every=100, ckpt_every=500),
}
RECIPES["dimr-digits"] = dict(RECIPES["digits"])  # the same data and schedule with the DiMR flow network


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. The model itself is the named preset (`CrossFlowConfig.from_name`)."""

    out: str
    preset: str = "tiny"
    data: str = "synthetic"  # a key of crossflow.training.datasets.DATASETS
    data_size: int = 4096  # samples, for generated data sets
    steps: int = 1000
    batch_size: int = 32  # per process
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.03  # not on biases, norms, embeddings, logit_scale
    warmup_steps: int = 100  # linear warm-up over this many steps, then lr_schedule
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
    augment_shift: int = 0  # digit data: random shifts up to this many pixels at 8x8 (issue 22); 0 = none
    augment_shift_prob: float = 1.0  # the share of samples shifted (the rest stay centred)

    def __post_init__(self) -> None:  # ValueError naming the bad values, before anything is created or written
        CrossFlowConfig.from_name(self.preset)  # raises ValueError for an unknown preset (before torch is imported)
        import torch

        import crossflow_kernels
        from crossflow.training.datasets import AUGMENTABLE, DATASETS
        from crossflow.training.optim import LR_SCHEDULES

        ok = {k: getattr(self, k) >= 1 for k in ("steps", "batch_size", "log_every", "ckpt_every", "data_size")}
        ok.update({k: getattr(self, k) >= 0 for k in ("warmup_steps", "keep_checkpoints", "skip_nonfinite")})
        ok.update({k: 0 <= getattr(self, k) < math.inf for k in ("grad_clip", "weight_decay")})
        ok.update(lr=0 < self.lr < math.inf, ema_decay=0 <= self.ema_decay < 1,
                  betas=len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas))
        if bad := {k: getattr(self, k) for k, good in ok.items() if not good}:
            raise ValueError(f"TrainConfig: invalid values {bad}")
        if not 0.0 < self.augment_shift_prob <= 1.0:
            raise ValueError(f"TrainConfig: augment_shift_prob must be in (0, 1], got {self.augment_shift_prob!r}")
        if self.augment_shift and (self.data not in AUGMENTABLE or not 0 < self.augment_shift < 8):
            raise ValueError(f"TrainConfig: augment_shift {self.augment_shift!r} needs an int in [0, 8) and digit data "
                             f"{AUGMENTABLE}, got data {self.data!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TrainConfig: unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if self.data not in DATASETS:
            raise ValueError(f"TrainConfig: unknown data {self.data!r}; choose one of {sorted(DATASETS)}")
        if self.backend not in crossflow_kernels.BACKENDS:
            raise ValueError(f"TrainConfig: unknown backend {self.backend!r}; "
                             f"choose one of {crossflow_kernels.BACKENDS}")
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


# ---- CLI: `python -m crossflow.train` and `crossflow train` share this parser


def build_parser(prog: str = "crossflow.train") -> argparse.ArgumentParser:
    """The training parser; its defaults are TrainConfig's (`parse_config` overlays a preset's recipe)."""
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    recipes = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in r.items()) for name, r in RECIPES.items())
    p = Parser(prog=prog, description=DESCRIPTION,
               epilog=f"recipes (defaults of --preset NAME; explicit flags win): {recipes}")
    p.error_prefix = prog
    p.add_argument("--out", default=None, help="run directory (checkpoints, log.jsonl, final/); default runs/<preset>")
    p.add_argument("--preset", default=d["preset"],
                   help="model preset (default: %(default)s)")  # checked by TrainConfig
    p.add_argument("--data", default=d["data"], help=f"training data: {sorted(DATA_NAMES)} (default: %(default)s)")
    for name, typ, text in (
        ("data_size", int, "samples in a generated data set"), ("steps", int, "total optimizer steps"),
        ("batch_size", int, "per process"), ("lr", float, "peak learning rate (AdamW)"),
        ("weight_decay", float, "not on biases, norms, embeddings, logit_scale"),
        ("warmup_steps", int, "linear warm-up over this many steps, then --lr-schedule"),
        ("grad_clip", float, "max grad norm; 0 disables"),
        ("ema_decay", float, "EMA of the weights (saved to <out>/final)"), ("seed", int, "model init, data, noise"),
        ("log_every", int, "steps per log.jsonl line"), ("ckpt_every", int, "steps per training checkpoint"),
        ("keep_checkpoints", int, "newest checkpoints kept; 0 keeps all"),
        ("skip_nonfinite", int, "steps with a non-finite loss or gradient skipped before the run stops"),
    ):
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=d[name], help=text + " (default: %(default)s)")
    p.add_argument("--lr-schedule", default=d["lr_schedule"], choices=("constant", "cosine"),
                   help="after the warm-up: constant (official) or cosine to 0 (default: %(default)s)")
    p.add_argument("--betas", type=float, nargs=2, default=d["betas"], help="AdamW betas (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available)")
    p.add_argument("--backend", default=d["backend"], choices=BACKENDS,
                   help="kernels backend: auto = Triton where it can run, else torch (default: %(default)s)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="disable bf16 autocast on CUDA")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute flow blocks in the backward pass")
    p.add_argument("--fsdp", action="store_true", help="shard model, EMA and optimizer state over the torchrun ranks "
                   "(FSDP2, one unit per flow block; implies --grad-checkpointing); checkpoints stay whole")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--augment-shift", type=int, default=d["augment_shift"], metavar="K",
                   help="digit data: shift each training image by up to K pixels at 8x8 (default: %(default)s)")
    p.add_argument("--augment-shift-prob", type=float, default=d["augment_shift_prob"], metavar="P",
                   help="with --augment-shift: the share of training images shifted; the rest stay centred "
                   "(default: %(default)s)")
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
