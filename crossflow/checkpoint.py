"""Files: atomic writes, checksums, run-directory locks, `save_pretrained` directories and training checkpoints.

A `save_pretrained` directory holds

    model.safetensors   every persistent tensor of `CrossFlow.state_dict()`; the config JSON is also stored in the
                        file's metadata, so weights and config can never be silently mixed up
    config.json         the `CrossFlowConfig`, human-readable, plus what the checkpoint is for: "task" (a key of
                        `config.TASKS`) and "preset" (the preset it was trained or converted as, or null); a config.json
                        without them (written before they existed) gets the task its config's pairing implies
    sampling.json       optional: the sampler settings it is meant to be sampled with (`config.SAMPLING`)
    checksums.sha256    the sha256 of the files above (`sha256sum -c` format), verified on every load; it must list
                        model.safetensors and config.json. A directory without it loads with a warning only when its
                        weights predate manifests (no "manifest" key in their metadata)

A training checkpoint (`<run>/checkpoints/step_XXXXXXXX.safetensors`) is one file: model + EMA + AdamW state as
tensors, everything else as JSON metadata, and a sha256 over all of it (metadata key "sha256") verified on load.

Every file is written atomically: to a temporary file in the same directory, flushed and fsync'ed, then `os.replace`d
over the target (atomic on POSIX and Windows), and the directory is fsync'ed. A crash or an exception leaves either the
old file or the new one, never a torn one; the temporary file is removed on an exception, and by `clean_stale_tmp`
after a kill. This module knows the model only through `state_dict()` and `.config` (no import of
`crossflow.models.model`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import IO, Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as _safetensors_save_file
from torch import nn

from crossflow.config import CrossFlowConfig, read_checkpoint_info, split_checkpoint_config

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CHECKSUMS_NAME = "checksums.sha256"
SAMPLING_NAME = "sampling.json"
REQUIRED = (WEIGHTS_NAME, CONFIG_NAME)  # what a manifest must list
SAMPLER_KEYS = ("steps", "guidance_scale", "official_grid", "method")  # sampling.json keys that go to the sampler
SCALE_KEYS = ("source_noise_scale", "text_variation_strength")  # sampling.json keys of image -> text (CaptionPipeline)
FORMAT = "crossflow-v1"
TRAIN_FORMAT = "crossflow-train-checkpoint/1"
_STEP_RE = re.compile(r"^step_(\d{8})\.safetensors$")
_TMP_RE = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")  # what `atomic_write` names its temporary files


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None]) -> None:
    """Create or replace `path` atomically. `write_fn(tmp_path)` writes the full content to `tmp_path` (a fresh file
    in the same directory); if it raises, `path` is untouched, the temporary file is removed and the error propagates.

    Example: ``atomic_write("step_100.pt", lambda p: torch.save(state, p))``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide the final mode, as a plain open() would (mkstemp forces 0o600).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write_fn(tmp)
        os.chmod(tmp, mode)  # a writer that recreates the file (safetensors makes it 0600) gets the umask's mode back
        with open(tmp, "rb+") as f:  # flush the data to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno is not None:  # name the target, not the temporary file (a full disk)
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    _fsync_dir(path.parent)


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, its I/O errors raised as OSError (it raises its own SafetensorError for a full disk,
    which callers that report OSError in one line would not catch)."""
    try:
        _safetensors_save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        m = re.search(r"os error (\d+)\)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), path) from None


def _write_text(text: str) -> Callable[[str], None]:
    def write(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)

    return write


def clean_stale_tmp(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that a killed `atomic_write` left in `directory`; returns them. Call it only where
    no other process is writing (e.g. under `lock_directory`)."""
    directory = Path(directory)
    found = [f for f in directory.iterdir() if _TMP_RE.match(f.name) and f.is_file()] if directory.is_dir() else []
    for f in found:
        f.unlink(missing_ok=True)
    return found


def lock_directory(directory: str | os.PathLike, what: str = "a training run") -> IO[str] | None:
    """Hold an exclusive lock on `directory` (created if needed) for as long as the returned file stays open.

    `fcntl.flock` on `<directory>/.lock`: the OS releases it when the holder exits or is killed, so a crash never
    leaves the directory stuck. A second holder gets a RuntimeError naming the first one's pid. No-op on Windows.
    """
    if os.name == "nt":
        return None
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / ".lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RuntimeError(f"{directory} is in use by {what} (pid {holder}); wait for it to end or choose another "
                           "directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


# ---------------------------------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """sha256 over names, dtypes, shapes and raw bytes (sorted by name) and `extra`: equal iff bit-identical."""
    h = hashlib.sha256(extra.encode())
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_checksums(directory: str | os.PathLike, names: list[str]) -> None:
    """Record the sha256 of `names` (files in `directory`) in `checksums.sha256`, in `sha256sum -c` format."""
    directory = Path(directory)
    lines = "".join(f"{file_sha256(directory / n)}  {n}\n" for n in sorted(names))
    atomic_write(directory / CHECKSUMS_NAME, _write_text(lines))


def verify_checksums(directory: str | os.PathLike, required: tuple[str, ...] = ()) -> list[str]:
    """Check every file listed in `directory/checksums.sha256`; returns the names checked ([] without a manifest).

    Raises ValueError naming the first file that is missing or whose bytes changed since they were recorded, or a
    name of `required` that the manifest does not list (an empty manifest lists none).
    """
    directory = Path(directory)
    manifest = directory / CHECKSUMS_NAME
    if not manifest.is_file():
        return []
    entries = []
    for i, line in enumerate(manifest.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"{manifest}: line {i} is not '<sha256>  <file name>': {line[:80]!r}")
        entries.append((digest, name))
    if missing := [n for n in required if n not in {name for _, name in entries}]:
        raise ValueError(f"{manifest} does not list {' or '.join(missing)}, so it cannot be verified (a damaged or "
                         "hand-edited manifest); restore the checkpoint or re-save it")
    checked = []
    for digest, name in entries:
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{path}: listed in {CHECKSUMS_NAME} but missing")
        if file_sha256(path) != digest:
            raise ValueError(f"{path}: corrupted (its sha256 differs from the one recorded in {CHECKSUMS_NAME} "
                             "when it was written: a damaged file or an interrupted save); restore or re-save it")
        checked.append(name)
    return checked


# ---------------------------------------------------------------------------------------------------------------------
# save_pretrained directories
# ---------------------------------------------------------------------------------------------------------------------


def config_json(config: CrossFlowConfig, preset: str | None = None) -> str:
    """config.json's text: the config, its task (`CrossFlowConfig.task`) and `preset` (checked to be a preset name)."""
    from crossflow.config import CONFIGS

    if preset is not None and preset not in CONFIGS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(CONFIGS)}")
    d = {**config.to_dict(), "task": config.task, "preset": preset}
    return json.dumps(d, indent=2, sort_keys=True)


def save_pretrained(model: nn.Module, directory: str | os.PathLike, sampling: dict[str, Any] | None = None,
                    preset: str | None = None) -> None:
    """Write `model`'s weights (`model.safetensors`), config (`config.json`, with its task and `preset`), the sampler
    settings `sampling` (`sampling.json`; without them an earlier save's file is removed: it was for other weights)
    and the checksums of all of them into `directory`. `directory` must not be an existing regular file."""
    directory = Path(directory)
    check_output_directory(directory)
    text = config_json(model.config, preset)
    # safetensors refuses shared or non-contiguous storage; the state dict holds neither, but views of views might.
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": text, "manifest": CHECKSUMS_NAME}
    if sampling is not None:
        sampling_text = json.dumps(dict(sampling), indent=2) + "\n"  # dict(): a mapping, refused otherwise
    # The checksums go last: a save that fails leaves the directory as it was; one killed between two writes leaves new
    # files under old checksums, refused on load (never a silent mix of two saves).
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=meta))
    atomic_write(directory / CONFIG_NAME, _write_text(text + "\n"))
    names = [WEIGHTS_NAME, CONFIG_NAME]
    if sampling is not None:
        atomic_write(directory / SAMPLING_NAME, _write_text(sampling_text))
        names.append(SAMPLING_NAME)
    else:
        (directory / SAMPLING_NAME).unlink(missing_ok=True)
    write_checksums(directory, names)


def read_sampling(directory: str | os.PathLike) -> dict[str, Any]:
    """The recommended settings saved beside a checkpoint (`sampling.json`, as `config.SAMPLING` writes them: the
    sampler's `SAMPLER_KEYS`, and `SCALE_KEYS`; other keys are ignored). Without the file (a run trained before the
    trainer wrote it): the `config.SAMPLING` entry of the preset its config.json records or its config equals, else {}.
    A file that is not a JSON object or holds an invalid value raises ValueError naming it."""
    from crossflow.sampling import EulerSampler

    f = Path(directory) / SAMPLING_NAME
    if not f.is_file():
        return _preset_sampling(directory)
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        kw = {k: d[k] for k in SAMPLER_KEYS if k in d}
        from crossflow.config import SAMPLERS

        if kw.get("method", "euler") not in SAMPLERS:
            raise ValueError(f"method must be one of {SAMPLERS}, got {kw['method']!r}")
        EulerSampler(**{k: v for k, v in kw.items() if k != "method"})  # the checks a sampler built from them makes
        for k in SCALE_KEYS:
            v = d.get(k, 1.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
            if k in d:
                kw[k] = float(v)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{f}: invalid sampling settings ({e})") from None
    return kw


def _preset_sampling(directory: str | os.PathLike) -> dict[str, Any]:
    from crossflow.config import SAMPLING

    try:
        cfg, about = read_checkpoint_info(directory)
    except (OSError, ValueError):  # reported where the model loads
        return {}
    preset = about["preset"] or next((n for n in SAMPLING if CrossFlowConfig.from_name(n) == cfg), None)
    return dict(SAMPLING.get(preset, {}))


def sampler_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The sampler's part (`SAMPLER_KEYS`) of `read_sampling`'s settings."""
    return {k: v for k, v in settings.items() if k in SAMPLER_KEYS}


def is_checkpoint(directory: str | os.PathLike) -> None:
    """FileNotFoundError unless `directory` holds a checkpoint's required files (checked before anything loads)."""
    p = Path(directory)
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (p / name).is_file():
            raise FileNotFoundError(f"{directory} is not a checkpoint: it has no {name}")


def check_output_directory(path: str | os.PathLike, option: str = "") -> None:
    """ValueError when `path` (an output directory, created if missing) exists as something else, e.g. a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option + ' ' if option else ''}{path} is a file; it must be a directory (one that does not "
                         "exist yet is created)")


def _read_config(directory: Path) -> CrossFlowConfig:
    return read_checkpoint_info(directory)[0]


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a truncated or corrupted file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a bad header or short file
        raise ValueError(f"{path}: corrupted or truncated safetensors file ({type(e).__name__}: {e})") from None
    return tensors, meta


def read_pretrained(directory: str | os.PathLike) -> tuple[CrossFlowConfig, dict[str, torch.Tensor], Path]:
    """(config, tensors, weights path) of a `save_pretrained` directory, after verifying its checksums and that
    `config.json` agrees with the config stored beside the weights. Build the model with `CrossFlow.from_pretrained`.

    Raises FileNotFoundError for a missing directory or file, ValueError naming the file for a corrupted, truncated
    or edited one, or an invalid config.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    weights = directory / WEIGHTS_NAME
    for path, what in ((directory / CONFIG_NAME, f"no {CONFIG_NAME} in checkpoint directory {directory}"),
                       (weights, "weights file not found")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} (expected {path})")
    checked = verify_checksums(directory, REQUIRED)
    cfg = _read_config(directory)
    tensors, meta = read_safetensors(weights)
    if not checked:
        if "manifest" in meta:
            raise ValueError(f"{directory}: {CHECKSUMS_NAME} is missing, so its files cannot be verified (these "
                             "weights were saved with one); restore it, or re-save the checkpoint")
        warnings.warn(f"{directory} has no {CHECKSUMS_NAME} (written before checkpoints had one): loaded unverified; "
                      "re-save it to add one", UnverifiedCheckpointWarning, stacklevel=3)
    elif (directory / SAMPLING_NAME).is_file() and SAMPLING_NAME not in checked:
        warnings.warn(f"{directory / SAMPLING_NAME} is not listed in {CHECKSUMS_NAME} (written before it was): its "
                      "settings are used unverified", UnverifiedCheckpointWarning, stacklevel=3)
    if "config" in meta:
        try:
            stored = split_checkpoint_config(meta["config"])[0]
        except (ValueError, TypeError) as e:
            raise ValueError(f"{weights}: invalid config in metadata: {e}") from None
        if stored != cfg:
            diff = {k: (v, getattr(cfg, k)) for k, v in stored.to_dict().items() if getattr(cfg, k) != v}
            raise ValueError(f"{directory}: {CONFIG_NAME} disagrees with the config stored in {WEIGHTS_NAME} "
                             f"(field: (weights, config.json)) {diff}; an interrupted save or a hand edit?")
    return cfg, tensors, weights


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint file is used without a checksum to verify it (one written before checkpoints recorded them)."""


def short_list(keys: list[str], limit: int = 8) -> str:
    return str(keys[:limit])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > limit else "]")


# (substring that must occur in some key, what a state dict holding it most likely is), first match wins
_ARCH_HINTS = (
    ("tensor_true", "a CrossFlow DiMR (`dimr_t2i`)"),
    ("blocks.0.adaLN_modulation", "a DiT (adaLN-Zero)"),
    ("model.diffusion_model.", "a Stable Diffusion / LDM UNet (CompVis layout)"),
    ("down_blocks.0.", "a diffusers UNet or VAE"),
    ("transformer_blocks.0.", "a diffusers transformer (DiT / PixArt / SD3)"),
    ("encoder.block.0.layer.0.SelfAttention", "a T5 encoder"),
    ("text_model.encoder.layers.0", "a CLIP text model"),
    ("vision_model.encoder.layers.0", "a CLIP / SigLIP vision model"),
    ("layers.0.self_attn.q_proj", "a LLaMA-style language model"),
    ("text_ve.", "our own CrossFlow (a `save_pretrained` directory: load it with `CrossFlow.from_pretrained`)"),
)


def describe_state_dict(keys: list[str], limit: int = 6) -> str:
    """A short description of a foreign state dict: its size, top-level prefixes (with counts) and a guess of the
    architecture, for error messages that must not list thousands of keys."""
    tops: dict[str, int] = {}
    for k in keys:
        top = k.split(".", 1)[0]
        tops[top] = tops.get(top, 0) + 1
    common = sorted(tops.items(), key=lambda kv: -kv[1])[:limit]
    desc = f"{len(keys)} tensors under " + ", ".join(f"{t}.* ({n})" for t, n in common)
    desc += f" and {len(tops) - limit} more prefixes" if len(tops) > limit else ""
    guess = next((arch for hint, arch in _ARCH_HINTS if any(hint in k for k in keys)), None)
    return desc + (f"; it looks like {guess}" if guess else "")


class skip_random_init(torch.overrides.TorchFunctionMode):
    """Build a module for loading: random parameter init (``nn.init`` draws, ``Tensor.normal_``/``uniform_``) becomes
    a zero fill (a memset, and a finite value for init code that inspects its draws: torch's `trunc_normal_` rejects
    and redraws out-of-range samples in a loop), until a strict load overwrites the parameters; buffers computed in
    ``__init__`` are kept. Like the meta device without its cost: init ops on meta tensors import torch._dynamo (~1 s
    of a CLI cold start), and a 1B-parameter random init takes seconds on a CPU."""

    _DRAWS = frozenset({"normal_", "uniform_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                        "kaiming_normal_", "orthogonal_", "sparse_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self._DRAWS:
            with torch.no_grad():
                return (args[0] if args else kwargs["tensor"]).zero_()
        return func(*args, **(kwargs or {}))


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state)` that reports missing/unexpected keys and shape mismatches as one ValueError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = [f"missing keys {short_list(missing)}" if missing else "",
                 f"unexpected keys {short_list(unexpected)}" if unexpected else "",
                 f"shape mismatches {short_list(shapes)}" if shapes else ""]
        raise ValueError(f"{source} does not match the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# Training checkpoints: one safetensors file; JSON metadata for everything that is not a tensor
# ---------------------------------------------------------------------------------------------------------------------


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the training checkpoints of run directory `out` (in `out/checkpoints`), oldest first."""
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), d / f.name) for f in d.iterdir() if (m := _STEP_RE.match(f.name)))


def checkpoint_path(out: str | os.PathLike, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step:08d}.safetensors"


def jsonable(obj: Any) -> Any:
    """Plain JSON types from nested dicts/lists/tuples holding 0-d tensors (optimizer and scheduler state)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item()
    return obj


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, val in state.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}/{key}"] = val
            else:
                scalars[f"{pid}/{key}"] = val
    return tensors, {"param_groups": jsonable(sd["param_groups"]), "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in [*tensors.items(), *meta["scalars"].items()]:  # "<pid>/<key>"
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = val
    groups = meta["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared storage


def save_training_checkpoint(
    path: str | os.PathLike, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
    extra_tensors: dict[str, torch.Tensor], meta: dict[str, str],
) -> None:
    """Write model (`model/`), EMA (`ema/`), optimizer state (`optim/`) and `extra_tensors` with string metadata
    `meta` into one safetensors file, atomically, with a sha256 over all of it (verified by `read_training_checkpoint`).
    """
    tensors = {f"model/{k}": _cpu(v) for k, v in model.state_dict().items()}
    tensors.update({f"ema/{k}": _cpu(v) for k, v in ema.state_dict().items()})
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    tensors.update({f"optim/{k}": _cpu(v) for k, v in opt_tensors.items()})
    tensors.update({k: _cpu(v) for k, v in extra_tensors.items()})
    meta = {**meta, "format": TRAIN_FORMAT, "optimizer": json.dumps(opt_meta)}
    meta["sha256"] = tensors_sha256(tensors, json.dumps(meta, sort_keys=True))
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))


def read_training_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a training checkpoint, verified; ValueError naming the file if it is unreadable, of
    another format, or its content does not match the sha256 recorded when it was written."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != TRAIN_FORMAT:
        raise ValueError(f"{path}: not a training checkpoint (format {meta.get('format')!r}, not {TRAIN_FORMAT!r})")
    recorded = meta.pop("sha256", None)
    if recorded != tensors_sha256(tensors, json.dumps(meta, sort_keys=True)):
        raise ValueError(f"{path}: corrupted (its content differs from the sha256 recorded when it was written)")
    return tensors, meta


def load_training_checkpoint(
    path: str | os.PathLike, config: CrossFlowConfig, model: nn.Module, ema: nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: Any,
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Restore model, EMA, optimizer and scheduler from a training checkpoint of a model with `config`; returns its
    (metadata, tensors). ValueError naming the file if it is unreadable, corrupted or of another model config."""
    try:
        tensors, meta = read_training_checkpoint(path)
        int(meta["step"])
        model_cfg, sched = json.loads(meta["model_config"]), json.loads(meta["scheduler"])
    except (ValueError, KeyError) as e:  # truncated/corrupted file, a foreign file, missing metadata
        raise ValueError(f"cannot resume: training checkpoint {path} is unreadable or corrupted ({e}). Nothing was "
                         "changed; delete that file to resume from an older checkpoint, or use a new --out.") from None
    if model_cfg != config.to_dict():
        raise ValueError(f"cannot resume from {path}: it was trained with another model config "
                         f"(checkpoint {model_cfg}, now {config.to_dict()})")
    pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    load_state_dict_strict(model, pick("model/"), f"{path} (model)")
    load_state_dict_strict(ema, pick("ema/"), f"{path} (ema)")
    optimizer.load_state_dict(_optimizer_from_flat(pick("optim/"), json.loads(meta["optimizer"])))
    scheduler.load_state_dict(sched)
    return meta, tensors


def truncate_log(log: str | os.PathLike, step: int) -> None:
    """Keep the records of JSON-lines file `log` up to `step` (and drop a line torn by a crash), atomically."""
    log = Path(log)
    if not log.exists():
        return
    keep = []
    for ln in log.read_text().splitlines():
        try:
            if json.loads(ln).get("step", 0) <= step:
                keep.append(ln)
        except (ValueError, AttributeError):
            continue
    atomic_write(log, _write_text("".join(ln + "\n" for ln in keep)))
