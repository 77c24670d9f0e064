"""Checkpoints: `save_pretrained` / `load_pretrained` (safetensors weights + JSON config) and `atomic_write`.

A checkpoint directory holds

    model.safetensors   every persistent tensor of `CrossFlow.state_dict()`; the config JSON is also stored in the
                        file's metadata, so weights and config can never be silently mixed up
    config.json         the `CrossFlowConfig`, human-readable

Every file is written atomically: to a temporary file in the same directory, flushed and fsync'ed, then `os.replace`d
over the target (atomic on POSIX and Windows), and the directory is fsync'ed. A crash or an exception leaves either the
old file or the new one, never a torn one, and the temporary file is removed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from crossflow.config import CrossFlowConfig

if TYPE_CHECKING:
    from crossflow.model import CrossFlow

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "crossflow-v1"


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
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:  # flush the data to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _write_text(text: str) -> Callable[[str], None]:
    def write(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)

    return write


def save_pretrained(model: "CrossFlow", directory: str | os.PathLike) -> None:
    """Write `model`'s weights (`model.safetensors`) and config (`config.json`) into `directory`, atomically."""
    directory = Path(directory)
    config_json = model.config.to_json()
    # safetensors refuses shared or non-contiguous storage; the state dict holds neither, but views of views might.
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": config_json}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=meta))
    atomic_write(directory / CONFIG_NAME, _write_text(config_json + "\n"))


def _read_config(directory: Path) -> tuple[CrossFlowConfig, str | None]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {directory} (expected {path})")
    try:
        text = path.read_text(encoding="utf-8")
        return CrossFlowConfig.from_json(text), text
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid CrossFlow config: {e}") from None


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


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
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
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 f"shape mismatches {shapes}" if shapes else ""]
        raise ValueError(f"{source} does not match the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "CrossFlow":
    """Load a `save_pretrained` directory into a new `CrossFlow` on `map_location`, in the checkpoint's dtype.

    Raises FileNotFoundError for a missing directory or file, ValueError for a corrupted/truncated weights file, an
    invalid config, a config that disagrees with the one stored beside the weights, or missing/unexpected/misshapen
    keys (listed).
    """
    from crossflow.model import CrossFlow

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    cfg, _ = _read_config(directory)
    weights = directory / WEIGHTS_NAME
    tensors, meta = read_safetensors(weights)
    if "config" in meta:
        try:
            stored = CrossFlowConfig.from_json(meta["config"])
        except ValueError as e:
            raise ValueError(f"{weights}: invalid config in metadata: {e}") from None
        if stored != cfg:
            diff = {k: (v, getattr(cfg, k)) for k, v in stored.to_dict().items() if getattr(cfg, k) != v}
            raise ValueError(f"{directory}: {CONFIG_NAME} disagrees with the config stored in {WEIGHTS_NAME} "
                             f"(field: (weights, config.json)) {diff}; an interrupted save or a hand edit?")
    model = CrossFlow.empty(cfg)  # no random init: the strict load below overwrites every parameter
    load_state_dict_strict(model, tensors, str(weights))
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # keep a half-precision checkpoint in its dtype (construction made the model fp32)
        model = model.to(dtype=dtypes.pop())
    return model.to(map_location)
