"""CrossFlow model configuration: one frozen dataclass plus named presets.

A config fully describes the trainable model (Text VE, flow transformer, contrastive image encoder), the names of the
frozen parts around it (text encoder, autoencoder) and the objective's constants. The kernel backend is *not* part of
it: that is a runtime choice (`crossflow_kernels.use_backend`).

Presets (`CrossFlowConfig.from_name`):
  * ``tiny``        -- unit tests; small enough for the Triton CPU interpreter.
  * ``digits``      -- the embedded default: 16x16 pixel-space digits, MiniLM text, trains on a laptop CPU.
  * ``digits-sr``   -- super-resolution: a 4x4 digit (image VE source) -> the real 8x8 digit
    (`crossflow.pipelines.image`).
  * ``digits-vary`` -- image variation: an 8x8 digit through a narrow image VE -> the same digit in another hand.
  * ``dit-{s,b,l,xl}-2`` -- DiT paper sizes on the 256 px SD-VAE latent (4x32x32), CLIP-L/14 text (77x768), the
    official CLIP@256 Text VE (Linear head).
  * ``dit-h-2-512`` -- the official CrossFlow DiT (`t2i_512px_t5_dit.py`): DiT-H/2 on 4x64x64, T5-XXL text (77x4096,
    x10), Text VE with the 4096->1024 Compressor and the Adaptor head.
  * ``dimr-{256,512}-{clip,t5}`` -- the four official DiMR checkpoints (`t2i_{256,512}px_{clip,t5}_dimr.pth`):
    `backbone="dimr"`, the flow network in `dimr` (a `DiMRConfig`), the text side of `dimr_config.OFFICIAL_CHECKPOINTS`.
  * ``dimr-tiny`` (unit tests, the ``tiny`` text side), ``dimr-digits`` (the ``digits`` data with a DiMR flow).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossflow.dimr_config import DIMR_CONFIGS, OFFICIAL_CHECKPOINTS, OFFICIAL_SAMPLING, DiMRConfig

BACKBONES = ("dit", "dimr")
NORMS = ("layer", "rms")
KL_KINDS = ("standard", "official")
SOURCES = ("text", "image")  # what the flow starts from (t = 0): a Text VE sample, or an image VE sample
TARGETS = ("image", "text")  # where it ends (t = 1): an image latent, or a text latent decoded to words


@dataclass(frozen=True)
class CrossFlowConfig:
    """Hyper-parameters of a CrossFlow model. Defaults are the ``digits`` preset's, except its KL weight."""

    # ---- the pairing (section 9 of the project's design notes, DESIGN.md, kept outside this repository): source
    # encoder -> shared flow transformer -> target side. source "text": the Text VE over text-encoder tokens (text_* /
    # ve_* fields); "image": the image VE over a (source_channels, source_size, source_size) image in [-1, 1] (source_*
    # / image_ve_width). target "image": the autoencoder's latent, latent_shape; "text": a text latent of latent_shape
    # (the Text VE's mu of the caption, the flow's grid holding the flat vector) decoded to words by
    # `text_decoder.TextDecoder`.
    source: str = "text"
    target: str = "image"
    # ---- image latent (the flow's state): (latent_channels, latent_size, latent_size)
    latent_channels: int = 1
    latent_size: int = 16
    # ---- flow transformer (DiT with adaLN-Zero)
    patch_size: int = 4  # digits: 16x16 pixels upsampled from 8x8 originals, so 4x4 patches lose nothing
    hidden_size: int = 192
    depth: int = 4
    num_heads: int = 6
    mlp_ratio: float = 4.0
    norm: str = "layer"  # LayerNorm without affine, eps 1e-6 (DiT); "rms" is ours, not convertible
    # ---- or the DiMR flow network (`crossflow.models.dimr`): backbone "dimr" with its `DiMRConfig` (the DiT fields
    # above are then unused); its latent shape must be the one above
    backbone: str = "dit"
    dimr: DiMRConfig | None = None
    # ---- frozen text encoder: name/path, token-embedding width, tokens, scale applied before the VE
    text_encoder: str = "minilm"
    text_dim: int = 384
    text_len: int = 16
    text_scale: float = 1.0  # 10.0 for T5 (official multiplies T5 features by 10 before the VE)
    # ---- Text Variational Encoder (official `trans_autoencoder.TransEncoder`)
    ve_layers: int = 1
    ve_heads: int = 6
    ve_ff: int = 256
    ve_reductions: int = 3
    ve_dropout: float = 0.0  # official 0.1; digits trains in minutes on a CPU, where dropout masks cost ~15 %
    ve_compress_dim: int | None = None  # 1024 for T5 (4096-d): the official Compressor
    ve_adaptor: bool = False  # official Adaptor head (used when 2*latent_numel is not 4096/8192)
    ve_adaptor_grid: int = 64  # Adaptor's square feature map; official: 64 (hidden width 64*64 = 4096)
    # ---- contrastive image encoder: "conv" (ours: a small conv net on the target latent, image_encoder.ImageEncoder)
    # or a transformers vision model name/path (frozen tower + trainable projection; needs pixel images in training)
    image_encoder: str = "conv"
    image_encoder_width: int = 32
    image_feature_dim: int = 256
    # ---- objective
    sigma_min: float = 1e-5
    cfg_dropout: float = 0.10  # indicator (uncond) rate
    kl_kind: str = "official"  # "official": -0.5*sum(1+lv-(0.3mu)^6-e^lv), w 1e-2; "standard": paper KL, w 1e-4
    kl_weight: float = 1e-2
    # ---- frozen image autoencoder
    autoencoder: str = "identity"  # "identity" (pixel space) or a diffusers AutoencoderKL name/path
    vae_scale: float = 0.23010
    # ---- image source: the image VE (`image_ve.ImageVE`, a conv net) reads (source_channels, source_size**2) images
    source_channels: int = 1
    source_size: int = 16
    image_ve_width: int = 32
    # ---- text target: the text autoencoder's decoder over a word vocabulary (`vocab.VOCABS`)
    vocab: str = "digits"
    max_words: int = 8  # the longest caption the decoder writes (END-padded in training)
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_prefix: int = 4  # the text latent enters the decoder as this many prefix tokens
    rec_weight: float = 1.0  # weight of the decoder's reconstruction cross-entropy in the loss

    def __post_init__(self) -> None:
        if isinstance(self.dimr, dict):  # from JSON
            object.__setattr__(self, "dimr", DiMRConfig.from_dict(self.dimr))
        _validate(self)

    # ---- derived sizes
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def latent_numel(self) -> int:
        return self.latent_channels * self.latent_size * self.latent_size

    @property
    def grid_size(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def uses_text_ve(self) -> bool:
        """A Text VE exists: it encodes the source text, or (text target) the caption into the target latent."""
        return self.source == "text" or self.target == "text"

    @property
    def source_shape(self) -> tuple[int, int, int]:
        """The image VE's input (image source)."""
        return (self.source_channels, self.source_size, self.source_size)

    @property
    def task(self) -> str:
        """What a model of this pairing does (a key of TASKS): text-to-image, image-to-text, or, image -> image,
        super-resolution when the source image is smaller than the output, else image-variation."""
        if self.source == "text":
            return "text-to-image"
        if self.target == "text":
            return "image-to-text"
        out = self.latent_size * (1 if self.autoencoder == "identity" else 8)  # an SD-VAE latent is 1/8 of the image
        return "super-resolution" if self.source_size < out else "image-variation"

    @property
    def ve_width(self) -> int:
        """Width of the VE encoder layers (after the optional Compressor)."""
        return self.ve_compress_dim or self.text_dim

    @property
    def ve_out_width(self) -> int:
        """Per-token width after the reduction layers."""
        return self.ve_width >> self.ve_reductions

    @property
    def ve_flat_dim(self) -> int:
        """Flattened VE feature: all `text_len` tokens (padding included) x reduced width."""
        return self.text_len * self.ve_out_width

    # ---- construction helpers
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "CrossFlowConfig":
        """A named preset, optionally with fields overridden."""
        if name not in CONFIGS:
            raise ValueError(f"unknown CrossFlow config {name!r}; choose one of {sorted(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})

    def replace(self, **changes: Any) -> "CrossFlowConfig":
        """A copy with `changes` applied (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown CrossFlowConfig fields {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (the nested DiMR config's tuples as lists), so that it equals its own JSON round trip."""
        d = dataclasses.asdict(self)
        if self.dimr is not None:
            d["dimr"] = json.loads(json.dumps(d["dimr"]))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CrossFlowConfig":
        if not isinstance(d, dict):
            raise ValueError(f"CrossFlowConfig.from_dict expects a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown CrossFlowConfig fields {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CrossFlowConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid CrossFlowConfig JSON: {e}") from None
        return cls.from_dict(d)


def _validate(c: CrossFlowConfig) -> None:
    errors: list[str] = []

    def pos_int(name: str, minimum: int = 1) -> bool:
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            errors.append(f"{name} must be an int >= {minimum}, got {v!r}")
            return False
        return True

    ints_ok = all([pos_int(n) for n in (
        "latent_channels", "latent_size", "patch_size", "hidden_size", "depth", "num_heads", "text_dim", "text_len",
        "ve_heads", "ve_ff", "image_encoder_width", "image_feature_dim", "ve_adaptor_grid", "source_channels",
        "source_size", "image_ve_width", "max_words", "decoder_width", "decoder_depth", "decoder_heads",
        "decoder_prefix",
    )] + [pos_int("ve_layers", 0), pos_int("ve_reductions", 0)])
    if c.ve_compress_dim is not None:
        ints_ok = pos_int("ve_compress_dim") and ints_ok
    if ints_ok:
        if c.hidden_size % c.num_heads:
            errors.append(f"hidden_size {c.hidden_size} must be divisible by num_heads {c.num_heads}")
        if c.hidden_size % 4:  # 2-D sin-cos positions split the width into 4 sin/cos quarters
            errors.append(f"hidden_size {c.hidden_size} must be divisible by 4 (2-D sin-cos positional embedding)")
        if c.latent_size % c.patch_size:
            errors.append(f"latent_size {c.latent_size} must be divisible by patch_size {c.patch_size}")
        if c.ve_width % (2**c.ve_reductions):
            errors.append(f"VE width {c.ve_width} must be divisible by 2**ve_reductions = {2 ** c.ve_reductions} "
                          f"(each reduction halves it)")
        else:
            attn_widths = ([c.ve_width] if c.ve_layers else []) + [c.ve_width >> i for i in range(c.ve_reductions)]
            bad = sorted({w for w in attn_widths if w % c.ve_heads}, reverse=True)
            if bad:
                errors.append(f"VE attention widths {bad} (ve_width {c.ve_width}, halved per reduction) must be "
                              f"divisible by ve_heads {c.ve_heads}")
        if c.decoder_width % c.decoder_heads:
            errors.append(f"decoder_width {c.decoder_width} must be divisible by decoder_heads {c.decoder_heads}")
        if c.ve_adaptor and (2 * c.latent_numel) % (c.ve_adaptor_grid**2):
            errors.append(f"ve_adaptor: 2 * latent_numel = {2 * c.latent_numel} must be divisible by "
                          f"ve_adaptor_grid**2 = {c.ve_adaptor_grid ** 2}")
    if not isinstance(c.mlp_ratio, (int, float)) or c.mlp_ratio <= 0 or int(c.hidden_size * c.mlp_ratio) < 1:
        errors.append(f"mlp_ratio must be > 0, got {c.mlp_ratio!r}")
    if c.backbone not in BACKBONES:
        errors.append(f"backbone must be one of {BACKBONES}, got {c.backbone!r}")
    elif c.backbone == "dimr" and not isinstance(c.dimr, DiMRConfig):
        errors.append(f"backbone 'dimr' needs dimr=DiMRConfig(...), got {c.dimr!r}")
    elif c.backbone == "dimr" and ints_ok and c.dimr.latent_shape != c.latent_shape:
        errors.append(f"dimr latent shape {c.dimr.latent_shape} must equal the latent shape {c.latent_shape}")
    elif c.backbone == "dit" and c.dimr is not None:
        errors.append("dimr is set but backbone is 'dit'")
    if c.norm not in NORMS:
        errors.append(f"norm must be one of {NORMS}, got {c.norm!r}")
    if c.source not in SOURCES:
        errors.append(f"source must be one of {SOURCES}, got {c.source!r}")
    if c.target not in TARGETS:
        errors.append(f"target must be one of {TARGETS}, got {c.target!r}")
    if c.source == "text" and c.target == "text":
        errors.append("source 'text' with target 'text' is not built: the Text VE would encode both sides")
    if c.target == "text" and c.autoencoder != "identity":
        errors.append(f"target 'text' has no image autoencoder; autoencoder must be 'identity', got {c.autoencoder!r}")
    if c.kl_kind not in KL_KINDS:
        errors.append(f"kl_kind must be one of {KL_KINDS}, got {c.kl_kind!r}")
    for name, lo, hi in (("ve_dropout", 0.0, 1.0), ("cfg_dropout", 0.0, 1.0), ("sigma_min", 0.0, 1.0)):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or not lo <= v < hi:
            errors.append(f"{name} must be in [{lo}, {hi}), got {v!r}")
    for name in ("text_scale", "vae_scale"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or not v > 0:
            errors.append(f"{name} must be > 0, got {v!r}")
    for name in ("kl_weight", "rec_weight"):
        if isinstance(getattr(c, name), bool) or not isinstance(getattr(c, name), (int, float)) or getattr(c, name) < 0:
            errors.append(f"{name} must be >= 0, got {getattr(c, name)!r}")
    for name in ("text_encoder", "autoencoder", "image_encoder", "vocab"):
        if not isinstance(getattr(c, name), str) or not getattr(c, name):
            errors.append(f"{name} must be a non-empty string, got {getattr(c, name)!r}")
    if not isinstance(c.ve_adaptor, bool):
        errors.append(f"ve_adaptor must be a bool, got {c.ve_adaptor!r}")
    if errors:
        raise ValueError("invalid CrossFlowConfig: " + "; ".join(errors))


# The official CLIP@256 Text VE (`configs/t2i_256px_clip_dimr.py`, `textVAE`): 11 post-LN layers, 8 heads, d_ff 1024,
# 3 reductions (768 -> 96 per token), Linear head 77*96 = 7392 -> 2*4*32*32 = 8192.
_CLIP_256 = dict(
    latent_channels=4, latent_size=32, patch_size=2, text_encoder="openai/clip-vit-large-patch14", text_dim=768,
    text_len=77, text_scale=1.0, ve_layers=11, ve_heads=8, ve_ff=1024, ve_reductions=3, ve_dropout=0.1,
    image_encoder_width=64, image_feature_dim=1024, autoencoder="CompVis/stable-diffusion-v1-4/vae",
)

_TINY = dict(
    latent_channels=4, latent_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, text_encoder="minilm",
    text_dim=32, text_len=7, ve_layers=1, ve_heads=2, ve_ff=64, ve_reductions=1, image_encoder_width=8,
    image_feature_dim=32,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    # The dataclass defaults with a 3x lighter KL term than the official 1e-2: a narrower Text VE posterior leaves the
    # flow less source noise to cancel, which took the background speckle from 1.68x to 1.42x real at equal accuracy
    # and diversity (benchmarks/results/2026-12-02_cpu_digits-kl-retrain.json).
    "digits": dict(kl_weight=3e-3),
    # Image -> text (captioning) on the digits: the image VE on the 16x16 digit, the flow on a 64-d text latent held
    # as a 1x8x8 grid (16 tokens of 2x2), a 2-layer autoregressive decoder over the grammar's words. The caption
    # Text VE reads 10 MiniLM tokens (the grammar's longest caption is 8) through the 3 reduction layers only. The
    # image VE is 3x wider than the other image pairings' (96 channels, a 384-d feature): trained on digits moved by up
    # to 2 px, the narrower one lost clean accuracy (benchmarks/results/2026-12-07_cpu_digits-caption-retrain.json).
    "digits-caption": dict(
        source="image", target="text", latent_channels=1, latent_size=8, patch_size=2, hidden_size=128, depth=3,
        num_heads=4, text_len=10, ve_layers=0, image_encoder_width=16, image_feature_dim=384, image_ve_width=96,
    ),
    # Image -> image on the real 8x8 digits (`crossflow.pipelines.image`): the flow on the 1x8x8 pixels (16 tokens
    # of 2x2).
    # Super-resolution: the image VE reads the 4x4. Its KL weight (1e-2, the official one) keeps the posterior wide
    # enough that the flow samples the 8x8s a 4x4 allows: single samples are realistic, and their mean is the
    # least-squares estimate (issue 22). The earlier 1e-4 made z0 nearly a function of the input: one sharp guess,
    # 4 dB below a small MLP (benchmarks/results/2026-12-07_cpu_digits-sr-retrain.json).
    "digits-sr": dict(
        source="image", target="image", latent_channels=1, latent_size=8, patch_size=2, hidden_size=128, depth=3,
        num_heads=4, image_encoder_width=16, image_feature_dim=128, source_size=4, image_ve_width=32,
    ),
    # Image variation: a narrow image VE (a 16-d feature between the convs and mu/logvar) keeps the digit and its
    # rough shape, the posterior noise (official KL weight) redraws the hand.
    "digits-vary": dict(
        source="image", target="image", latent_channels=1, latent_size=8, patch_size=2, hidden_size=128, depth=3,
        num_heads=4, image_encoder_width=16, image_feature_dim=16, source_size=8, image_ve_width=32,
    ),
    "dit-s-2": dict(_CLIP_256, hidden_size=384, depth=12, num_heads=6),
    "dit-b-2": dict(_CLIP_256, hidden_size=768, depth=12, num_heads=12),
    "dit-l-2": dict(_CLIP_256, hidden_size=1024, depth=24, num_heads=16),
    "dit-xl-2": dict(_CLIP_256, hidden_size=1152, depth=28, num_heads=16),
    # Official `configs/t2i_512px_t5_dit.py` + `utils.get_nnet('dit')` = DiT_H_2.
    "dit-h-2-512": dict(
        _CLIP_256, latent_size=64, hidden_size=1280, depth=36, num_heads=20, text_encoder="DeepFloyd/t5-v1_1-xxl",
        text_dim=4096, text_scale=10.0, ve_compress_dim=1024, ve_adaptor=True, ve_adaptor_grid=64,
    ),
}
# The DiMR releases: the flow network of `DIMR_CONFIGS`, the text side and objective of `OFFICIAL_CHECKPOINTS`, the
# image encoder of the 256 px DiT presets (training only: the official SigLIP tower is not converted).
for _name, _info in OFFICIAL_CHECKPOINTS.items():
    CONFIGS[_name] = dict(_info["crossflow_fields"], backbone="dimr", dimr=DIMR_CONFIGS[_name], image_encoder_width=64,
                          image_feature_dim=1024)
CONFIGS["dimr-tiny"] = dict(_TINY, backbone="dimr", dimr=DIMR_CONFIGS["dimr-tiny"])
CONFIGS["dimr-digits"] = dict(backbone="dimr", dimr=DIMR_CONFIGS["dimr-digits"])

# What a checkpoint is for (its config's `task`, recorded in config.json by `save_pretrained`), and the `crossflow`
# verbs that run it.
TASKS: dict[str, str] = {
    "text-to-image": "`crossflow sample`, `interpolate` or `arithmetic` (`CrossFlowPipeline`)",
    "image-to-text": "`crossflow caption` or `vary --text` (`CaptionPipeline`)",
    "super-resolution": "`crossflow upscale` (`ImagePipeline`)",
    "image-variation": "`crossflow vary IMAGE` (`ImagePipeline`)",
}

# The sampler settings a trained preset is sampled with (the one source: the trainer writes them into every
# `save_pretrained` directory as `sampling.json`; the shipped weights carry the same). `steps`, `guidance_scale`,
# `official_grid` and `method` (one of SAMPLERS, default "euler") go to the sampler; image-to-text adds
# `source_noise_scale` (a temperature on the image VE's posterior) and `text_variation_strength`
# (`pipelines.caption.CaptionPipeline`). A preset without an entry samples with the sampler's defaults (50 steps,
# guidance 7). Measured in README.md's tables (`crossflow eval --preset NAME`). The digits presets ship the NFE sweep's
# recommendation among our own solvers (`per_sampler` of `crossflow eval --sweep-steps`: the cheapest setting within
# noise of the converged solution): FastSampler captures them in a CUDA graph, and they need no diffusers import, which
# nearly triples a cold `crossflow sample` on the CPU (README, "Fewer network evaluations").

# The samplers by name (`crossflow.scheduler_sampler.make_sampler`, `--sampler`, sampling.json's "method"): our Euler
# and midpoint methods (FastSampler), and diffusers' flow-matching schedulers driven by `SchedulerSampler`.
SAMPLERS = ("euler", "midpoint", "flow-euler", "flow-heun", "dpm++", "unipc")

SAMPLING: dict[str, dict[str, Any]] = {
    "digits": dict(steps=8, guidance_scale=1.5, method="midpoint"),
    "digits-caption": dict(steps=4, guidance_scale=1.0, method="euler", source_noise_scale=0.3,
                           text_variation_strength=0.4),
    "digits-sr": dict(steps=4, guidance_scale=1.5, method="euler"),
    "digits-vary": dict(steps=4, guidance_scale=2.0, method="midpoint"),
    "dit-h-2-512": dict(OFFICIAL_SAMPLING),  # the official releases: their own sampler
    **{name: dict(OFFICIAL_SAMPLING) for name in OFFICIAL_CHECKPOINTS},
}


# ---- A checkpoint's config.json (`checkpoint.save_pretrained`): the config plus what the checkpoint is for.
# Torch-free, so that the CLI checks a checkpoint's task before it imports anything heavy.
CHECKPOINT_KEYS = ("task", "preset")  # config.json entries about the checkpoint, not the model's config


def split_checkpoint_config(text: str) -> tuple[CrossFlowConfig, dict[str, Any]]:
    """config.json text -> (config, {"task", "preset"}); a file written before they were recorded gets the task its
    config's pairing implies and preset None. ValueError for invalid JSON, config or task."""
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    about = {k: d.pop(k, None) for k in CHECKPOINT_KEYS}
    cfg = CrossFlowConfig.from_dict(d)
    about["task"] = about["task"] or cfg.task
    if about["task"] not in TASKS:
        raise ValueError(f"unknown task {about['task']!r}; known: {sorted(TASKS)}")
    return cfg, about


def read_checkpoint_info(directory: str | os.PathLike) -> tuple[CrossFlowConfig, dict[str, Any]]:
    """(config, {"task", "preset"}) of a checkpoint directory from its config.json alone: fast, reads no weights and
    verifies nothing (`checkpoint.read_pretrained` does). ValueError naming the file for an invalid one."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {directory} (expected {path})")
    try:
        return split_checkpoint_config(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: invalid CrossFlow config: {e}") from None


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class WrongTaskError(ValueError):
    """A checkpoint made for another task than the one asked of it (`check_task`)."""


def check_task(directory: str | os.PathLike, tasks: tuple[str, ...], user: str) -> dict[str, Any]:
    """{"task", "preset"} of the checkpoint in `directory` when its task is one of `tasks`; else a WrongTaskError
    saying what the checkpoint is for and what `user` (e.g. "crossflow upscale") needs. From config.json alone."""
    _, about = read_checkpoint_info(directory)
    if about["task"] not in tasks:
        preset = f" (preset {about['preset']})" if about["preset"] else ""
        raise WrongTaskError(f"{directory} is {_a(about['task'])} checkpoint{preset}, for {TASKS[about['task']]}; "
                         f"`{user}` needs {_a(' or '.join(tasks))} checkpoint")
    return about
