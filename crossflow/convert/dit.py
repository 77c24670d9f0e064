"""Convert the official CrossFlow DiT checkpoint (github.com/qihao067/CrossFlow) into our `CrossFlow`.

The official `.pth` files (`t2i_512px_t5_dit.pth`; a training run's `<step>.ckpt/nnet.pth` / `nnet_ema.pth`) are the
flat `state_dict()` of `libs/model/dit_t2i.DiT` (`utils.TrainState.save`, loaded by `demo_t2i.py` with
`load_state_dict(torch.load(path))`). Its keys:

    x_embedder.proj.{weight,bias}             -> flow.x_embedder.proj.*            (timm PatchEmbed)
    t_embedder.mlp.{0,2}.{weight,bias}        -> flow.t_embedder.mlp.*
    y_embedder.embedding_table.weight (2, D)  -> flow.y_embedder.embedding_table.weight   (indicator, no null row)
    pos_embed (1, T, D)                       -> checked against our fixed table, then dropped (a buffer here)
    blocks.N.attn.{qkv,proj}.*                -> flow.blocks.N.attn.*               (timm Attention)
    blocks.N.mlp.{fc1,fc2}.*                  -> flow.blocks.N.mlp.*                (timm Mlp)
    blocks.N.adaLN_modulation.1.*  (6D, D)    -> stacked, in block order, then
    final_layer.adaLN_modulation.1.* (2D, D)  -> ... into flow.adaLN_modulation.*  ((6 depth + 2) D, D)
    final_layer.linear.*                      -> flow.final_layer.linear.*
    context_encoder.*                         -> text_ve.*                          (same module tree)
    open_clip.logit_scale                     -> logit_scale                        (used raw)
    open_clip.* / open_clip_output.*          -> dropped: the SigLIP image tower + its projection, used only by the
                                                 training loss; our `image_encoder` differs and keeps its init.

The four DiMR releases (`t2i_{256,512}px_{clip,t5}_dimr.pth`) map through `crossflow.convert.dimr` (flow network) and
the same `context_encoder.*` / `open_clip.logit_scale` rules. `load_official_checkpoint` finds which preset a file
holds (`detect_preset`: every tensor shape must match), refuses a `cfg` that does not match it in a few lines naming
the architecture found, and `save_converted` writes the official sampler settings (`sampling.json`) beside the model.

Pickles are read only with `torch.load(..., weights_only=True)`: tensors and plain containers, never arbitrary objects.
Before that, `check_official_file` refuses what is not an intact PyTorch checkpoint: an empty file, another format (an
image, a safetensors file, our own converted checkpoint), a zip archive whose CRC-32 fails (torch's reader checks none).
"""

from __future__ import annotations

import functools
import math
import os
import struct
import zipfile
from pathlib import Path

import torch

from crossflow.checkpoint import CONFIG_NAME, WEIGHTS_NAME, describe_state_dict, load_state_dict_strict, short_list
from crossflow.config import CONFIGS, SAMPLING, CrossFlowConfig
from crossflow.convert.dimr import (convert_official_dimr_state_dict, describe_dimr_keys, official_dimr_shapes,
                                    strip_wrappers)
from crossflow.dimr_config import OFFICIAL_SAMPLING
from crossflow.models.image_encoder import build_image_encoder
from crossflow.models.layers import sincos_pos_embed_2d
from crossflow.models.model import CrossFlow

DROPPED_PREFIXES = ("open_clip.", "open_clip_output.")
NESTED_KEYS = ("state_dict", "model", "nnet_ema", "nnet", "ema")


def official_flow_shapes(cfg: CrossFlowConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the official DiT flow network's tensors (VE and image tower excluded)."""
    D, C, p, M = cfg.hidden_size, cfg.latent_channels, cfg.patch_size, cfg.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (2, D),
        "pos_embed": (1, cfg.num_tokens, D),
        "final_layer.linear.weight": (p * p * C, D), "final_layer.linear.bias": (p * p * C,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(cfg.depth):
        for name, (o, n) in {"attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.fc1": (M, D), "mlp.fc2": (D, M),
                             "adaLN_modulation.1": (6 * D, D)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = (o, n)
            shapes[f"blocks.{i}.{name}.bias"] = (o,)
    return shapes


def official_ve_shapes(cfg: CrossFlowConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the official `context_encoder.*` (our TextVE mirrors its module tree name for name)."""
    from crossflow.models.text_ve import TextVE

    with torch.device("meta"):
        ve = TextVE(cfg)
    return {f"context_encoder.{k}": tuple(v.shape) for k, v in ve.state_dict().items()}


def convert_official_state_dict(sd: dict[str, torch.Tensor], cfg: CrossFlowConfig) -> dict[str, torch.Tensor]:
    """Map an official DiT CrossFlow state dict to our `CrossFlow` state dict (keys listed in the module docstring).

    Raises ValueError listing missing official keys, unknown keys and shape mismatches, or when the official
    `pos_embed` disagrees with our fixed table (wrong hidden size / grid).
    """
    if cfg.norm != "layer":
        raise ValueError(f"the official DiT uses LayerNorm; cannot convert into a config with norm={cfg.norm!r}")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)][:10] if isinstance(sd, dict) else []
        raise ValueError(f"expected a flat dict of tensors, got {type(sd).__name__}"
                         + (f" with non-tensor entries {bad}" if bad else ""))
    sd = {strip_wrappers(k): v for k, v in sd.items()}
    expected = {**official_flow_shapes(cfg), **official_ve_shapes(cfg), "open_clip.logit_scale": ()}
    kept = {k: v for k, v in sd.items() if k == "open_clip.logit_scale" or not k.startswith(DROPPED_PREFIXES)}
    missing = sorted(set(expected) - set(kept) - {"open_clip.logit_scale"})
    unexpected = sorted(set(kept) - set(expected))
    shapes = sorted(f"{k}: got {tuple(v.shape)}, expected {expected[k]}"
                    for k, v in kept.items() if k in expected and tuple(v.shape) != expected[k])
    if missing or unexpected or shapes:
        # Short on purpose: a foreign checkpoint mismatches thousands of keys; say how many, a few, and what it is.
        parts = [f"{len(missing)} of {len(expected) - 1} expected keys missing, e.g. {short_list(missing, 4)}"
                 if missing else "", f"{len(unexpected)} unexpected keys, e.g. {short_list(unexpected, 4)}"
                 if unexpected else "", f"{len(shapes)} shape mismatches, e.g. {short_list(shapes, 3)}"
                 if shapes else ""]
        raise ValueError(f"official checkpoint does not match the {cfg.depth}-block, width-{cfg.hidden_size} DiT "
                         "config: " + "; ".join(p for p in parts if p) + f". The checkpoint holds "
                         f"{describe_state_dict(sorted(sd))}")

    # The official table is fp32 (numpy float64 rounded once); a checkpoint stored in half precision rounds it again,
    # by up to half an ulp of its dtype. A wrong hidden size or grid is off by O(1).
    stored = kept["pos_embed"]
    tol = max(1e-4, torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 1e-4
    pos = sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size)[None]
    err = (stored.float().cpu() - pos).abs().max().item()
    if not err <= tol:
        raise ValueError(f"official pos_embed ({stored.dtype}) differs from the 2-D sin-cos table by {err:.3e} "
                         f"(tolerance {tol:.1e}): wrong config?")

    out: dict[str, torch.Tensor] = {}
    mods_w, mods_b = [], []
    for i in range(cfg.depth):
        mods_w.append(kept[f"blocks.{i}.adaLN_modulation.1.weight"])
        mods_b.append(kept[f"blocks.{i}.adaLN_modulation.1.bias"])
    mods_w.append(kept["final_layer.adaLN_modulation.1.weight"])
    mods_b.append(kept["final_layer.adaLN_modulation.1.bias"])
    out["flow.adaLN_modulation.weight"] = torch.cat(mods_w, 0)  # ((6 depth + 2) D, D)
    out["flow.adaLN_modulation.bias"] = torch.cat(mods_b, 0)
    for k, v in kept.items():
        if k == "pos_embed" or "adaLN_modulation" in k:
            continue
        if k == "open_clip.logit_scale":
            out["logit_scale"] = v.reshape(())
        elif k.startswith("context_encoder."):
            out["text_ve." + k[len("context_encoder."):]] = v
        else:
            out["flow." + k] = v
    return out


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a loaded `.pth`: the dict itself, or one nested under a usual key."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for k in NESTED_KEYS:
            if isinstance(obj.get(k), dict):
                return _unwrap(obj[k], path)
    raise ValueError(f"{path}: expected a state dict of tensors (optionally under one of {NESTED_KEYS}), got "
                     f"{type(obj).__name__}" + (f" with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, dict)
                                                else ""))


@functools.lru_cache(maxsize=32)
def official_shapes(cfg: CrossFlowConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an official checkpoint of `cfg` holds (flow network + Text VE), without `open_clip*`."""
    if cfg.backbone == "dimr":
        flow = official_dimr_shapes(cfg.dimr)
    else:
        flow = official_flow_shapes(cfg)
    return {**flow, **official_ve_shapes(cfg)}


def _kept_shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {strip_wrappers(k): tuple(v.shape) for k, v in sd.items()
            if not strip_wrappers(k).startswith(DROPPED_PREFIXES)}


def detect_preset(sd: dict[str, torch.Tensor]) -> str | None:
    """The preset (`CONFIGS`) whose official layout `sd` holds, every name and shape equal, or None."""
    shapes = _kept_shapes(sd)
    dimr = any(k.startswith("stages.") for k in shapes)
    for name, fields in CONFIGS.items():
        if (fields.get("backbone", "dit") == "dimr") != dimr or fields.get("norm", "layer") != "layer":
            continue
        if official_shapes(CrossFlowConfig.from_name(name)) == shapes:
            return name
    return None


def describe_config(cfg: CrossFlowConfig) -> str:
    """A few words on a config's flow network and text side, for messages."""
    text = f"{cfg.text_encoder} text ({cfg.text_dim}-d)"
    if cfg.backbone == "dimr":
        stages = ", ".join(f"{s.block} width {s.dim} x {s.depth} blocks at {s.grid}x{s.grid}" for s in cfg.dimr.stages)
        return f"a DiMR flow network ({stages}), {text}"
    return f"a DiT flow network ({cfg.depth} blocks, width {cfg.hidden_size}, patch {cfg.patch_size}), {text}"


def _what_it_holds(sd: dict[str, torch.Tensor], found: str | None) -> str:
    if found is not None:
        return f"the {found!r} layout: {describe_config(CrossFlowConfig.from_name(found))}"
    keys = {strip_wrappers(k): v for k, v in sd.items()}
    if any(k.startswith("stages.") for k in keys):
        return f"a DiMR checkpoint ({describe_dimr_keys(keys)}) that matches no preset"
    return describe_state_dict(sorted(keys))


NEAR_MISS = 8  # a file this many tensors (or fewer) off a preset's layout is reported as that preset, damaged


def nearest_preset(sd: dict[str, torch.Tensor]) -> tuple[str, list[str]] | None:
    """(preset, what differs) for the preset whose official layout `sd` misses by at most NEAR_MISS tensors (a renamed,
    missing, extra or misshapen one), or None. The differences name each tensor."""
    shapes = _kept_shapes(sd)
    dimr = any(k.startswith("stages.") for k in shapes)
    best = None
    for name, fields in CONFIGS.items():
        if (fields.get("backbone", "dit") == "dimr") != dimr or fields.get("norm", "layer") != "layer":
            continue
        want = official_shapes(CrossFlowConfig.from_name(name))
        missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
        diffs = [f"tensor {k} has shape {shapes[k]}, expected {want[k]}" for k in sorted(set(want) & set(shapes))
                 if shapes[k] != want[k]]
        diffs += [f"tensor {k} {want[k]} is missing" for k in missing]
        diffs += [f"tensor {k} {shapes[k]} is not in its layout" for k in extra]
        if best is None or len(diffs) < len(best[1]):
            best = (name, diffs)
    return best if best is not None and 0 < len(best[1]) <= NEAR_MISS else None


def resolve_config(sd: dict[str, torch.Tensor], cfg: CrossFlowConfig | str | None, source: str) -> CrossFlowConfig:
    """The config to convert `sd` into: `cfg` (a config or a preset name) when the checkpoint's layout matches it, the
    detected preset when `cfg` is None. A mismatch raises ValueError naming the architecture found (a few lines)."""
    if isinstance(cfg, str):
        cfg = CrossFlowConfig.from_name(cfg)
    if cfg is not None and official_shapes(cfg) == _kept_shapes(sd):
        return cfg
    found = detect_preset(sd)
    near = nearest_preset(sd) if found is None else None
    if near is not None and (cfg is None or preset_name(cfg) == near[0]):
        name, diffs = near
        raise ValueError(f"{source}: the layout of preset {name!r} except for {len(diffs)} tensor(s): "
                         + "; ".join(diffs) + ". A damaged or edited file, or a variant this converter does not know")
    if cfg is None:
        if found is None:
            raise ValueError(f"{source}: not a checkpoint of any preset: it holds {_what_it_holds(sd, None)}")
        return CrossFlowConfig.from_name(found)
    dimr_sd = any(strip_wrappers(k).startswith("stages.") for k in sd)
    if found is None and not dimr_sd and cfg.backbone == "dit":
        return cfg  # a DiT-like file off by a few keys: the converter lists them
    hint = f"; use --preset {found} (or leave --preset out: the layout is detected)" if found else ""
    name = preset_name(cfg)
    want = f"preset {name!r}" if name else "the requested config"
    raise ValueError(f"{source} holds {_what_it_holds(sd, found)}; {want} is {describe_config(cfg)}{hint}")


def load_official_checkpoint(
    path: str | os.PathLike, cfg: CrossFlowConfig | str | None = None, map_location: str | torch.device = "cpu"
) -> CrossFlow:
    """Build a `CrossFlow` from an official `.pth` (or a training `<step>.ckpt` directory: `nnet_ema.pth`, else
    `nnet.pth`): DiT or DiMR. `cfg`: a config or preset name that must match the file's layout (`resolve_config`), or
    None to use the detected preset. The file is read with `torch.load(weights_only=True)` only."""
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS_NAME).is_file() or (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} is already a CrossFlow checkpoint (ours, converted or trained): there is nothing "
                             "to convert; use it as it is (--checkpoint, `CrossFlow.from_pretrained`)")
        cands = [path / "nnet_ema.pth", path / "nnet.pth"]
        found = [c for c in cands if c.is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: a checkpoint directory needs one of {[c.name for c in cands]}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    check_official_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for disallowed globals, RuntimeError/EOFError for a bad file
        raise ValueError(f"{path}: cannot be read as a tensors-only checkpoint (weights_only=True; arbitrary "
                         f"pickled objects are refused): {type(e).__name__}: {e}") from None
    sd = _unwrap(obj, path)
    cfg = resolve_config(sd, cfg, str(path))
    if cfg.backbone == "dimr":
        state = convert_official_dimr_state_dict(sd, cfg.dimr, cfg)
    else:
        state = convert_official_state_dict(sd, cfg)
    # Training-only parts absent from the official file get a fresh init; everything else is overwritten.
    state.update({f"image_encoder.{k}": v for k, v in build_image_encoder(cfg).state_dict().items()})
    state.setdefault("logit_scale", torch.tensor(math.log(1 / 0.07)))
    model = CrossFlow.empty(cfg)
    load_state_dict_strict(model, state, f"converted {path}")
    return model.to(map_location)


# leading bytes -> what a file that is not a PyTorch checkpoint is (for the message)
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"RIFF", "a RIFF file (WebP image, WAV audio)"), (b"\x1f\x8b", "gzip-compressed data"),
          (b"%PDF", "a PDF document"), (b"\x93NUMPY", "a NumPy .npy array"), (b"\x89HDF", "an HDF5 file"),
          (b"GGUF", "a GGUF model file"))


def _safetensors_format(path: Path, head: bytes) -> str | None:
    """The "format" metadata of a safetensors file (None when it has none), or "" when `path` is not one."""
    import json

    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 9 else 0
    if not (2 <= n <= 100_000_000 and head[8:9] == b"{" and n + 8 <= path.stat().st_size):
        return ""
    with open(path, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return ""
    return (header.get("__metadata__") or {}).get("format") if isinstance(header, dict) else ""


def check_official_file(path: str | os.PathLike) -> None:
    """Refuse, before unpickling, a file that is not an intact PyTorch checkpoint (ValueError saying what it is): an
    empty file, another format, a safetensors file (ours: already converted), a zip archive (torch.save's format since
    1.6) with a failing CRC-32 (a flipped byte; read in full once: torch's reader checks none). A legacy pickle
    (torch.save before 1.6, protocol 2+) passes: it has no checksum."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ValueError(f"{path} is empty (0 bytes): not a PyTorch checkpoint; download or copy it again")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.CRC == 0 and info.file_size:  # written with torch's crc32 off: nothing to compare
                        continue
                    with zf.open(info) as member:  # raises BadZipFile on a CRC mismatch at the member's end
                        while member.read(1 << 24):
                            pass
        except (zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{path}: damaged PyTorch checkpoint ({e}): a corrupted or truncated download; fetch it "
                             "again") from None
        return
    if head[:1] == b"\x80":  # a pickle (protocol >= 2): torch.save's legacy format
        return
    fmt = _safetensors_format(path, head)
    if fmt and fmt.startswith("crossflow"):
        raise ValueError(f"{path} is already a CrossFlow checkpoint file (format {fmt!r}): there is nothing to "
                         "convert; use its directory as it is (--checkpoint, `CrossFlow.from_pretrained`)")
    if fmt != "":
        raise ValueError(f"{path} is a safetensors file, not an official CrossFlow .pth (a pickled state dict)")
    kind = next((what for magic, what in _MAGIC if head.startswith(magic)), None)
    raise ValueError(f"{path} is not a PyTorch checkpoint" + (f": it is {kind}" if kind else " (neither a zip archive "
                     "nor a pickle, the two formats of torch.save)"))


def save_converted(model: CrossFlow, directory: str | os.PathLike, sampling: dict | None = None) -> None:
    """`model.save_pretrained(directory)` with `sampling.json`: the official sampler (`OFFICIAL_SAMPLING`: 50 Euler
    steps on the official time grid, guidance 7, the same for the DiT and DiMR releases), so that `crossflow sample
    --checkpoint DIR` reproduces it without flags."""
    preset = preset_name(model.config)
    if sampling is None:
        sampling = SAMPLING.get(preset, OFFICIAL_SAMPLING)
    model.save_pretrained(directory, sampling=sampling, preset=preset)


def preset_name(cfg: CrossFlowConfig) -> str | None:
    """The preset `cfg` is, or None."""
    return next((n for n in CONFIGS if CrossFlowConfig.from_name(n) == cfg), None)
