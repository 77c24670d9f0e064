"""Official CrossFlow DiMR checkpoints -> our `DiMRFlow`, and which architecture an official state dict holds.

The four DiMR releases (`t2i_{256,512}px_{clip,t5}_dimr.pth`) are the flat `state_dict()` of `libs/model/dimr_t2i.
MRModel`: the flow network under `stages.*`, the Text VE under `context_encoder.*` (same names as the DiT release, so
`crossflow.convert.dit` maps it), the SigLIP tower and its projection under `open_clip.*` / `open_clip_output.*`.
Flow keys, official -> ours (per stage `stages.S.`; TD = `{param0, param1, nodecay_weight, nodecay_bias}`):

    input_layer.1.{weight,bias}                    -> embed.*                 Conv2d(C, dim, patch, stride=patch)
    input_layer.3.position_embeddings.weight       -> pos_embed               (grid*grid, dim)
    upsample.0.{weight,bias}.TD                    -> up_norm_in.*            TD-LayerNorm over the skip concat
    upsample.1.kernel.{weight,bias}                -> up_proj.*               Linear(skip_dim, dim * r * r)
    upsample.2.{weight,bias}.TD                    -> up_norm_out.*
    blocks.N.block1.norm.<norm>                    -> blocks.N.attn_norm.<norm>   (transformer)
    blocks.N.block1.query_key_value.weight         -> blocks.N.attn.qkv.weight
    blocks.N.block1.dense.{weight,bias}            -> blocks.N.attn.proj.*
    blocks.N.block1.1.{weight,bias}                -> blocks.N.dwconv.*           (ConvNeXt)
    blocks.N.block2.norm.<norm>                    -> blocks.N.mlp_norm.<norm>
    blocks.N.block2.w0 / w1 .{weight,bias}         -> blocks.N.mlp.fc_in.*   concatenated [w0; w1] along the outputs
    blocks.N.block2.w2.{weight,bias}               -> blocks.N.mlp.fc_out.*
    skip_denses.J.{weight,bias}                    -> skip_proj.J.*
    output_layer.0.{weight,bias}.TD                -> out_norm.*
    output_layer.2.{weight,bias}                   -> out_conv.*
    tensor_false (1,), tensor_true (1,)            -> indicator_values (2,) = [cond, uncond]  (transformer stages)

where <norm> is `scale.TD` (tdrms), `scale` (rms), `{weight,bias}.TD` (layer), `linear.weight` (adarms): the same
names on both sides. A whole checkpoint (flow + Text VE + logit scale): `convert_official_dimr_state_dict`.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Callable

import torch

from crossflow.models.dimr import DIMR_CONFIGS, OFFICIAL_CHECKPOINTS, DiMRConfig, DiMRFlow

if TYPE_CHECKING:
    from crossflow.config import CrossFlowConfig

STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP / accelerate wrappers, torch.compile
OTHER_PREFIXES = ("context_encoder.", "open_clip.", "open_clip_output.")  # not the flow network: convert.py's job
DIT_MARKERS = ("t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight", "x_embedder.proj.weight")

# ours -> official, applied to the key after `stages.S.` (first match wins)
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embed\.", "input_layer.1."),
    (r"^pos_embed$", "input_layer.3.position_embeddings.weight"),
    (r"^up_norm_in\.", "upsample.0."),
    (r"^up_proj\.", "upsample.1.kernel."),
    (r"^up_norm_out\.", "upsample.2."),
    (r"^out_norm\.", "output_layer.0."),
    (r"^out_conv\.", "output_layer.2."),
    (r"^skip_proj\.", "skip_denses."),
    (r"^blocks\.(\d+)\.attn_norm\.", r"blocks.\1.block1.norm."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"blocks.\1.block1.query_key_value."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.block1.dense."),
    (r"^blocks\.(\d+)\.dwconv\.", r"blocks.\1.block1.1."),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"blocks.\1.block2.norm."),
    (r"^blocks\.(\d+)\.mlp\.fc_out\.", r"blocks.\1.block2.w2."),
)
_STAGE = re.compile(r"^stages\.(\d+)\.(.*)$")


def _check_keys(got: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """ValueError `what: ...` naming the missing and unexpected keys and the shape mismatches, if any."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shapes = sorted(f"{k}: got {tuple(v.shape)}, expected {expected[k]}"
                    for k, v in got.items() if k in expected and tuple(v.shape) != expected[k])
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing keys {_few(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected keys {_few(unexpected)}" if unexpected else "",
                 f"{len(shapes)} shape mismatches {_few(shapes)}" if shapes else ""]
        raise ValueError(f"{what}: " + "; ".join(p for p in parts if p))


def strip_wrappers(key: str) -> str:
    """Drop leading DDP / compile prefixes (`module.`, `_orig_mod.`), repeatedly."""
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _sources(ours: str) -> tuple[list[str], Callable[[list[torch.Tensor]], torch.Tensor]]:
    """The official key(s) that make our flow key `ours`, and how to combine them."""
    m = _STAGE.match(ours)
    if m is None:
        raise ValueError(f"not a DiMR flow key: {ours!r}")
    pre, rest = f"stages.{m.group(1)}.", m.group(2)
    if rest == "indicator_values":
        return [pre + "tensor_false", pre + "tensor_true"], lambda ts: torch.cat([t.reshape(1) for t in ts])
    fc_in = re.match(r"^blocks\.(\d+)\.mlp\.fc_in\.(weight|bias)$", rest)
    if fc_in:
        b, what = fc_in.groups()
        return [f"{pre}blocks.{b}.block2.w0.{what}", f"{pre}blocks.{b}.block2.w1.{what}"], lambda ts: torch.cat(ts)
    for pat, rep in _RENAMES:
        new, n = re.subn(pat, rep, rest)
        if n:
            return [pre + new], lambda ts: ts[0]
    raise ValueError(f"no official name for DiMR flow key {ours!r}")


@functools.lru_cache(maxsize=16)
def _plan(cfg: DiMRConfig) -> tuple[tuple[str, tuple[str, ...], tuple[tuple[int, ...], ...]], ...]:
    """For each of our flow keys: (ours, official sources, official shapes), from a meta-device model."""
    if cfg.qk_norm:
        raise ValueError("qk_norm=True is our extension: no released DiMR checkpoint has it (the official QKNorm comes "
                         "only with Axial RoPE, which is not implemented)")
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in DiMRFlow(cfg).state_dict().items()}
    plan = []
    for k, shape in ours.items():
        srcs, _ = _sources(k)
        if k.endswith("indicator_values"):
            shapes = ((1,), (1,))
        elif ".mlp.fc_in." in k:
            half = (shape[0] // 2, *shape[1:])
            shapes = (half, half)
        else:
            shapes = (shape,)
        plan.append((k, tuple(srcs), shapes))
    return tuple(plan)


def official_dimr_shapes(cfg: DiMRConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the official MRModel's flow tensors (`stages.*`) for `cfg`."""
    return {s: shp for _, srcs, shapes in _plan(cfg) for s, shp in zip(srcs, shapes)}


def convert_dimr_flow_state_dict(
    sd: dict[str, torch.Tensor], cfg: DiMRConfig, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Map the flow network of an official DiMR state dict to `DiMRFlow(cfg).state_dict()` keys (with `prefix`, e.g.
    "flow." for a CrossFlow). Keys under `context_encoder.` / `open_clip*` are left to the caller; anything else that
    is not an expected `stages.*` key, a missing key or a shape mismatch raises ValueError listing them.

    `crossflow.convert.dit.load_official_checkpoint` uses it through `convert_official_dimr_state_dict`."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"expected a flat dict of tensors, got {type(sd).__name__}")
    sd = {strip_wrappers(k): v for k, v in sd.items()}
    flow = {k: v for k, v in sd.items() if not k.startswith(OTHER_PREFIXES)}
    expected = official_dimr_shapes(cfg)
    _check_keys(flow, expected, "official DiMR state dict does not match the config")
    out = {}
    for ours, srcs, _ in _plan(cfg):
        _, combine = _sources(ours)
        out[prefix + ours] = combine([flow[s] for s in srcs])
    return out


def convert_official_dimr_state_dict(
    sd: dict[str, torch.Tensor], cfg: DiMRConfig, text_cfg: "CrossFlowConfig"
) -> dict[str, torch.Tensor]:
    """A whole official DiMR state dict -> a CrossFlow-shaped state dict: `flow.*` (ours), `text_ve.*` (the official
    `context_encoder.*`, checked against `TextVE(text_cfg)`, e.g. built from `OFFICIAL_CHECKPOINTS[name]
    ["crossflow_fields"]`) and `logit_scale` (`open_clip.logit_scale`, used raw) when present. The SigLIP tower and its
    projection (`open_clip.*`, `open_clip_output.*`) are training-only and dropped. Raises ValueError on any
    mismatch."""
    from crossflow.models.text_ve import TextVE

    sd = {strip_wrappers(k): v for k, v in sd.items()}
    out = convert_dimr_flow_state_dict(sd, cfg, prefix="flow.")
    with torch.device("meta"):
        expected = {f"context_encoder.{k}": tuple(v.shape) for k, v in TextVE(text_cfg).state_dict().items()}
    ve = {k: v for k, v in sd.items() if k.startswith("context_encoder.")}
    _check_keys(ve, expected, "official Text VE (context_encoder.*) does not match the text config")
    out.update({"text_ve." + k[len("context_encoder."):]: v for k, v in ve.items()})
    if "open_clip.logit_scale" in sd:
        out["logit_scale"] = sd["open_clip.logit_scale"].reshape(())
    return out


def _few(items: list[str], n: int = 8) -> str:
    return str(items[:n])[:-1] + (f", ... ({len(items) - n} more)]" if len(items) > n else "]")


def load_dimr_flow(sd: dict[str, torch.Tensor], cfg: DiMRConfig) -> DiMRFlow:
    """A CPU `DiMRFlow(cfg)` holding the official flow weights (built on meta, no random init)."""
    with torch.device("meta"):
        model = DiMRFlow(cfg)
    model.to_empty(device="cpu")
    model.load_state_dict(convert_dimr_flow_state_dict(sd, cfg), strict=True)
    return model


def describe_dimr_keys(keys: dict[str, torch.Tensor]) -> str:
    """What the `stages.*` tensors of an official DiMR state dict (wrappers stripped) describe, in a few words."""
    stages = sorted({int(m.group(1)) for k in keys if (m := _STAGE.match(k))})
    parts = []
    for s in stages:
        w = keys.get(f"stages.{s}.input_layer.1.weight")
        kind = "transformer" if f"stages.{s}.blocks.0.block1.query_key_value.weight" in keys else "convnext"
        n = len({m.group(1) for k in keys if (m := re.match(rf"^stages\.{s}\.blocks\.(\d+)\.", k))})
        width = f"width {w.shape[0]}, patch {w.shape[-1]}" if w is not None else "no input conv"
        parts.append(f"{kind} ({width}, {n} blocks)")
    return f"{len(stages)} stages: " + "; ".join(parts)


def detect_official_architecture(sd: dict[str, torch.Tensor]) -> str:
    """Which released CrossFlow layout an official state dict holds: "dit" (`t2i_512px_t5_dit.pth`) or one of the DiMR
    presets "dimr-256-clip", "dimr-256-t5", "dimr-512-clip", "dimr-512-t5" (flow shapes must match the preset exactly;
    clip vs t5 is told by the Text VE's T5 compressor). Raises ValueError, naming what was found, for anything else."""
    keys = {strip_wrappers(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("stages.") for k in keys):
        t5 = any(k.startswith("context_encoder.compressor.") for k in keys)
        flow = {k: tuple(v.shape) for k, v in keys.items() if k.startswith("stages.")}
        for name, info in OFFICIAL_CHECKPOINTS.items():
            if (info["text"] == "t5") == t5 and official_dimr_shapes(DIMR_CONFIGS[name]) == flow:
                return name
        raise ValueError(f"a DiMR checkpoint ({describe_dimr_keys(keys)}; {'T5' if t5 else 'CLIP'} text) that matches "
                         f"none of the released layouts {sorted(OFFICIAL_CHECKPOINTS)}")
    if all(k in keys for k in DIT_MARKERS):
        return "dit"
    raise ValueError(f"not a CrossFlow checkpoint: neither DiMR `stages.*` nor DiT {DIT_MARKERS[0]!r} keys "
                     f"({len(keys)} tensors, e.g. {sorted(keys)[:5]})")
