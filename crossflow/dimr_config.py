"""The DiMR network's configuration (`DiMRStage`, `DiMRConfig`), its presets and the facts about the released
checkpoints. Torch-free, so that `crossflow.config` (and with it the CLI's argument handling) can name DiMR presets
without importing torch; the network itself is `crossflow.models.dimr`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

BLOCK_TYPES = ("transformer", "convnext")
NORM_TYPES = ("tdrms", "rms", "layer", "adarms")

#################################################################################
#                                  Configuration                                #
#################################################################################


@dataclass(frozen=True)
class DiMRStage:
    """One resolution level. `depth` counts blocks (odd: in-half, middle, out-half; the official `num_blocks` n gives
    n // 2 * 2 + 1 blocks). The stage works on a `grid` x `grid` map = latent_size / (input_ratio * patch)."""

    block: str  # "transformer" | "convnext"
    dim: int
    hidden: int  # GEGLU hidden width
    depth: int
    grid: int  # official max_height == max_width
    patch: int  # official input_feature_ratio: the input conv's kernel and stride
    num_heads: int = 0  # transformer stages
    kernel_size: int = 7  # convnext stages: depthwise conv
    input_ratio: int = 1  # official image_input_ratio: area-downsampling of the latent before the input conv
    final_kernel: int = 3  # the output conv

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads if self.num_heads else 0

    @property
    def skip_dim(self) -> int:
        """Channels this stage hands to the next: its input tokens and every block output, concatenated."""
        return self.dim * (self.depth + 1)


@dataclass(frozen=True)
class DiMRConfig:
    """The DiMR flow network. `loss_coeffs` weight the per-stage flow-matching losses (coarse to fine)."""

    latent_channels: int = 4
    latent_size: int = 32
    stages: tuple[DiMRStage, ...] = ()
    norm_type: str = "tdrms"
    qk_norm: bool = False
    detach_lowres: bool = False  # official block_grad_to_lowres (False in every release)
    loss_coeffs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        # JSON round trips give lists of dicts: normalise to the frozen tuple form before validating.
        stages = tuple(s if isinstance(s, DiMRStage) else DiMRStage(**s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "loss_coeffs", tuple(float(c) for c in self.loss_coeffs))
        _validate(self)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def latent_numel(self) -> int:
        return self.latent_channels * self.latent_size**2

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "DiMRConfig":
        if name not in DIMR_CONFIGS:
            raise ValueError(f"unknown DiMR preset {name!r}; choose one of {sorted(DIMR_CONFIGS)}")
        return dataclasses.replace(DIMR_CONFIGS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiMRConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiMRConfig fields {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _validate(c: DiMRConfig) -> None:
    errors: list[str] = []
    for name in ("latent_channels", "latent_size"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            errors.append(f"{name} must be an int >= 1, got {v!r}")
    if c.norm_type not in NORM_TYPES:
        errors.append(f"norm_type must be one of {NORM_TYPES}, got {c.norm_type!r}")
    if not c.stages:
        errors.append("stages must list at least one stage")
    if c.loss_coeffs and len(c.loss_coeffs) != len(c.stages):
        errors.append(f"loss_coeffs needs one weight per stage ({len(c.stages)}), got {len(c.loss_coeffs)}")
    if not any(s.block == "transformer" for s in c.stages):
        errors.append("at least one stage must be a transformer stage (it carries the cfg indicator token)")
    prev = None
    for i, s in enumerate(c.stages):
        p = f"stages[{i}]"
        if s.block not in BLOCK_TYPES:
            errors.append(f"{p}.block must be one of {BLOCK_TYPES}, got {s.block!r}")
        ints = ("dim", "hidden", "depth", "grid", "patch", "input_ratio", "final_kernel", "kernel_size")
        bad = [n for n in ints if isinstance(getattr(s, n), bool) or not isinstance(getattr(s, n), int)
               or getattr(s, n) < 1]
        if bad:
            errors.append(f"{p}: {', '.join(f'{n}={getattr(s, n)!r}' for n in bad)} must be ints >= 1")
            continue
        if s.depth % 2 == 0:
            errors.append(f"{p}.depth must be odd (in-half, middle, out-half), got {s.depth}")
        if s.final_kernel % 2 == 0 or s.kernel_size % 2 == 0:
            errors.append(f"{p}: kernel sizes must be odd ('same' padding), got {s.kernel_size}, {s.final_kernel}")
        if s.block == "transformer" and (s.num_heads < 1 or s.dim % s.num_heads):
            errors.append(f"{p}: dim {s.dim} must be divisible by num_heads {s.num_heads} >= 1")
        if isinstance(c.latent_size, int) and c.latent_size != s.grid * s.patch * s.input_ratio:
            errors.append(f"{p}: grid {s.grid} * patch {s.patch} * input_ratio {s.input_ratio} must equal "
                          f"latent_size {c.latent_size}")
        if prev is not None and (s.grid % prev.grid or s.grid <= prev.grid):
            errors.append(f"{p}: grid {s.grid} must be a multiple > 1 of the previous stage's {prev.grid}")
        prev = s
    if errors:
        raise ValueError("invalid DiMRConfig: " + "; ".join(errors))


def _t_stage(patch: int) -> DiMRStage:  # the released Transformer stage: 1024 wide, 65 blocks, 16 heads, 16x16
    return DiMRStage("transformer", 1024, 2048, 65, 16, patch, num_heads=16)


# Official `configs/t2i_{256,512}px_{clip,t5}_dimr.py` (`model.stage_configs`, `loss_coeffs`). The clip / t5 pairs have
# the same flow network; they differ in the text side (`OFFICIAL_CHECKPOINTS`).
_DIMR_256 = DiMRConfig(
    latent_size=32, loss_coeffs=(1 / 4, 1.0),
    stages=(_t_stage(2), DiMRStage("convnext", 512, 1024, 33, 32, 1)),
)
_DIMR_512 = DiMRConfig(
    latent_size=64, loss_coeffs=(1 / 4, 1 / 2, 1.0),
    stages=(_t_stage(4), DiMRStage("convnext", 512, 1024, 33, 32, 2), DiMRStage("convnext", 256, 512, 33, 64, 1)),
)
DIMR_CONFIGS: dict[str, DiMRConfig] = {
    "dimr-256-clip": _DIMR_256,
    "dimr-256-t5": _DIMR_256,
    "dimr-512-clip": _DIMR_512,
    "dimr-512-t5": _DIMR_512,
    # Unit tests: the 512 px layout (three stages, two ConvNeXt) at toy width, small enough for the Triton interpreter.
    "dimr-tiny": DiMRConfig(
        latent_size=8, loss_coeffs=(1 / 4, 1 / 2, 1.0),
        stages=(DiMRStage("transformer", 32, 48, 3, 2, 4, num_heads=2), DiMRStage("convnext", 16, 32, 3, 4, 2),
                DiMRStage("convnext", 8, 16, 3, 8, 1)),
    ),
    # The 16x16 one-channel digits data: a transformer stage on 4x4 patches (4x4 tokens) + a ConvNeXt stage at 8x8 and
    # one at full resolution; 3.0 M parameters (the `digits` DiT flow: 2.8 M).
    "dimr-digits": DiMRConfig(
        latent_channels=1, latent_size=16, loss_coeffs=(1 / 4, 1 / 2, 1.0),
        stages=(DiMRStage("transformer", 192, 384, 5, 4, 4, num_heads=6), DiMRStage("convnext", 96, 192, 5, 8, 2),
                DiMRStage("convnext", 48, 96, 3, 16, 1)),
    ),
}

# What the integrator needs besides the flow network, per released checkpoint (README of qihao067/CrossFlow and the
# configs): file, text encoder, its width, the cfg-indicator training rate, learning rate, and the sampler defaults.
# `crossflow_fields` are the `CrossFlowConfig` fields of the text side and objective for that checkpoint (the Text VE
# they build has the official `context_encoder` shapes: 110.2 / 165.2 / 97.5 / 142.4 M parameters).
_VE = dict(latent_channels=4, text_len=77, ve_layers=11, ve_heads=8, ve_ff=1024, ve_reductions=3, ve_dropout=0.1,
           autoencoder="CompVis/stable-diffusion-v1-4/vae")
_CLIP = dict(text_encoder="openai/clip-vit-large-patch14", text_dim=768, text_scale=1.0)
_T5 = dict(text_encoder="DeepFloyd/t5-v1_1-xxl", text_dim=4096, text_scale=10.0, ve_compress_dim=1024)
_AT256 = dict(latent_size=32, cfg_dropout=0.10)
_AT512 = dict(latent_size=64, cfg_dropout=0.15, ve_adaptor=True, ve_adaptor_grid=64)
OFFICIAL_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "dimr-256-clip": dict(file="t2i_256px_clip_dimr.pth", text="clip", lr=1e-5,
                          crossflow_fields={**_VE, **_CLIP, **_AT256}),
    "dimr-256-t5": dict(file="t2i_256px_t5_dimr.pth", text="t5", lr=5e-5, crossflow_fields={**_VE, **_T5, **_AT256}),
    "dimr-512-clip": dict(file="t2i_512px_clip_dimr.pth", text="clip", lr=1e-5,
                          crossflow_fields={**_VE, **_CLIP, **_AT512}),
    "dimr-512-t5": dict(file="t2i_512px_t5_dimr.pth", text="t5", lr=1e-5, crossflow_fields={**_VE, **_T5, **_AT512}),
}
# `config.sample` (50 steps, scale 7) on the `ODEEulerFlowMatchingSolver` grid
OFFICIAL_SAMPLING = dict(steps=50, guidance_scale=7.0, official_grid=True)
