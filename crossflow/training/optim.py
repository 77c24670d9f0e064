"""The optimizer side of training: AdamW parameter groups, the LR schedule and the EMA of the weights."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices/kernels; none on biases, norm scales, embeddings, logit_scale, and what a
    module lists in `no_weight_decay_names()` (DiMR's `nodecay_*` time-dependent parameters)."""
    no_decay: set[int] = set()
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            no_decay.update(id(p) for p in mod.parameters(recurse=False))
        if callable(getattr(mod, "no_weight_decay_names", None)):
            no_decay.update(id(mod.get_parameter(n)) for n in mod.no_weight_decay_names())
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
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(warmup_steps: int, total_steps: int, schedule: str = "constant") -> Callable[[int], float]:
    """LR factor of scheduler step s (0-based): linear warm-up over `warmup_steps` updates, then 1 ("constant", the
    official recipe) or a half cosine from 1 to 0 at `total_steps` ("cosine")."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; choose one of {LR_SCHEDULES}")

    def factor(s: int) -> float:
        if s + 1 < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        done = (s + 1 - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))

    return factor
