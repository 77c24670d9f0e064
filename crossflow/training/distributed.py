"""FSDP2 for `crossflow.train --fsdp`: shard the model, its EMA and the AdamW state over the ranks (`torchrun`).

What is sharded (`torch.distributed.fsdp.fully_shard`, one unit per block, then the root):
  * every DiT block of `FlowTransformer` and every `TransformerBlock` / `ConvNeXtBlock` of DiMR: each holds its own
    parameters (DiMR's time-dependent norm parameters included), so one all-gather per block in the forward, and
    again in the backward's recomputation (the trainer turns activation checkpointing on with --fsdp);
  * the root: everything else (Text VE, image encoder, embeddings, adaLN / upsample Linears), one unit.
Scalar parameters (`logit_scale`) cannot be sharded by FSDP2 ("doesn't support scalar parameters"): they stay whole on
every rank and `average_unsharded_grads` all-reduces their gradient after the backward, as DDP would.

Checkpoints stay in the normal single-file format (`crossflow.checkpoint`): `full_state_dict` and
`full_optimizer_state_dict` gather every shard (collectives: every rank calls them) into the tensors a one-process run
saves, kept on rank 0. A checkpoint therefore resumes in either mode: the trainer loads it into the whole model,
EMA and optimizer first and shards afterwards (`shard_training`), moving the optimizer state onto the shards.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The blocks sharded as their own FSDP units, in module order: DiT blocks, DiMR Transformer/ConvNeXt blocks."""
    from crossflow.models.dimr import ConvNeXtBlock, TransformerBlock  # imported here: no import circle through train
    from crossflow.models.layers import DiTBlock

    return [m for m in model.modules() if isinstance(m, (DiTBlock, TransformerBlock, ConvNeXtBlock))]


def unsharded_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters FSDP2 leaves whole on every rank (0-d ones)."""
    return [p for p in model.parameters() if p.dim() == 0]


def shard(model: nn.Module, mesh: Any) -> None:
    """`fully_shard` every block of `model`, then the root (scalars left whole), in place."""
    from torch.distributed.fsdp import fully_shard

    for block in fsdp_units(model):
        fully_shard(block, mesh=mesh)
    # The root's parameters are needed again at once by the backward: no point resharding them after the forward.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=set(unsharded_params(model)))


def shard_training(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, device: torch.device,
                   world: int) -> None:
    """Shard `model` and `ema` identically over a 1-D mesh of `world` ranks on `device`, and move `opt` (built on the
    whole model, possibly holding state loaded from a checkpoint) onto the sharded parameters, its state split
    likewise. The whole model, EMA and optimizer state may (should, for a 1 B model) be on the CPU: only the shards
    reach `device`."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    state = {names[id(p)]: s for p, s in opt.state.items()}
    for m in (model, ema):
        shard(m, mesh)
        for p in unsharded_params(m):  # FSDP moves what it shards only
            p.data = p.data.to(device)
    new = dict(model.named_parameters())
    for g, ns in zip(opt.param_groups, groups, strict=True):
        g["params"] = [new[n] for n in ns]
    opt.state = defaultdict(dict, {new[n]: {k: _like(k, v, new[n]) for k, v in s.items()} for n, s in state.items()})


def _like(key: str, value: Any, param: torch.Tensor) -> Any:
    """An optimizer state entry shaped like `param`, on its device and sharded as it is (each rank keeps its chunk);
    anything else (Adam's step count, kept on the CPU as `Optimizer.load_state_dict` keeps it) as it was."""
    if key == "step" or not isinstance(value, torch.Tensor) or value.shape != param.shape:
        return value
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value.to(param.device)


def average_unsharded_grads(model: nn.Module, world: int) -> None:
    """On a sharded `model`, average the gradients of the parameters FSDP2 leaves whole over the ranks (SUM then
    divide: gloo has no AVG); call after the backward, before the gradient norm. A no-op on an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    grads = [p.grad for p in unsharded_params(model) if p.grad is not None]
    if isinstance(model, FSDPModule) and grads and world > 1:
        flat = torch.stack([g.reshape(()) for g in grads])
        dist.all_reduce(flat)
        torch._foreach_copy_(grads, list((flat / world).unbind()))


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of `grads` (DTensor shards and whole tensors alike) as a plain tensor on every rank."""
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _full(t: Any) -> Any:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(module: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every shard gathered, as CPU tensors where `keep` (rank 0), else {} (every rank must
    call it: each tensor is one all-gather)."""
    out = {}
    for k, v in module.state_dict().items():
        v = _full(v)
        if keep:
            out[k] = v.detach().cpu()
    return out


def full_optimizer_state_dict(opt: torch.optim.Optimizer, keep: bool) -> dict[str, Any]:
    """`opt.state_dict()` as a one-process optimizer gives it (state keyed by parameter index), shards gathered;
    the state is empty where not `keep`. Every rank must call it."""
    sd = opt.state_dict()
    state = {}
    for i in sorted(sd["state"]):
        s = {k: _full(v) for k, v in sd["state"][i].items()}
        if keep:
            state[i] = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


class FullState:
    """What `crossflow.checkpoint` reads of a model or optimizer (`state_dict()`, `config`), over gathered tensors."""

    def __init__(self, state: dict[str, Any], config: Any = None) -> None:
        self._state, self.config = state, config

    def state_dict(self) -> dict[str, Any]:
        return self._state


def whole(obj: nn.Module | torch.optim.Optimizer, keep: bool, config: Any = None) -> Any:
    """A model / EMA or optimizer as one process holds it (`state_dict()` in the one-process format): a sharded one
    gathered (collective; tensors kept where `keep`) into a `FullState`, anything else returned as it is."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(obj, torch.optim.Optimizer):
        sharded = any(isinstance(p, DTensor) for g in obj.param_groups for p in g["params"])
        return FullState(full_optimizer_state_dict(obj, keep)) if sharded else obj
    return FullState(full_state_dict(obj, keep), config) if isinstance(obj, FSDPModule) else obj


def init_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; joins the process group (gloo on CPU, NCCL on CUDA)."""
    rank, local, world = (int(os.environ.get(k, v)) for k, v in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if device_arg.startswith("cuda") if device_arg else torch.cuda.is_available():
        device = torch.device("cuda", local) if world > 1 else torch.device(device_arg or "cuda")
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg or "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device
