"""Per-shape routing of `crossflow_kernels.attention` to PyTorch SDPA where a measured table says ours loses.

Under backend ``auto``, a call that our Triton kernels could run is looked up in the routing table of the running
device; where the table names an SDPA backend (cuDNN, flash, efficient, math) for the call's shape bucket, that
backend runs instead (`attention_sdpa`, same semantics as `attention_ref`). Without a table for the device, with no
entry for the bucket, or where the entry says ours, ours runs: that is the default. A forced ``triton`` or ``torch``
backend is never routed.

The table: ``crossflow_kernels/routes/attention-routes_<device slug>.json`` (schema ``crossflow-attention-routes/1``),
package data, so an installed package finds it too; derived from a GPU-check result by ``python -m benchmarks.report
gpu_check.json --routing-table``, which writes it there; nothing else writes one, and only a device some run measured
has one. It is read lazily (never at import), once per file, and each (device, bucket) decision is cached. A bucket is
exact in head dim, dtype, mask yes/no and fwd vs fwd+bwd (any input requiring grad with grad enabled), and power-of-two
ceilings for Tq, Tk and B·H -- the buckets our autotuner keys on, so one bucket runs one kernel config of ours. A routed
backend that cannot run a particular call (a layout or size the SDPA kernel rejects: `torch.backends.cuda.can_use_*`)
falls back to ours.

``CROSSFLOW_KERNELS_ATTENTION_ROUTES`` (read at call time): unset -- the table shipped in the package (``routes/``);
``off`` / ``0`` -- no routing; a directory -- its ``attention-routes_<slug>.json``; a file -- that table (if it is for
the running device). `crossflow_kernels.use_routing(False)` switches routing off in code. A table that exists but is
malformed (not UTF-8, not JSON, not the schema) raises RuntimeError naming the file: the table is generated and
verified, so a broken one is a bug to see, and ours running instead would silently lose the speed the table promises;
``CROSSFLOW_KERNELS_ATTENTION_ROUTES=off`` is the way out.

Observable: `crossflow_kernels.dispatch_counts()` counts calls per (op, backend); the first decision for each routed
bucket is logged at DEBUG on the ``crossflow_kernels`` logger, naming the table file and entry. Under torch.compile the
decision is made at trace time (plain Python on shapes and dtypes, no graph break) and counted once per trace, not per
replay.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from crossflow_kernels._utils import triton_can_run_here
from crossflow_kernels.attention import _check

SCHEMA = "crossflow-attention-routes/1"
ENV = "CROSSFLOW_KERNELS_ATTENTION_ROUTES"
DEFAULT_DIR = Path(__file__).resolve().parent / "routes"  # package data (setup.py), beside this module
# The GPU check's provider names -> torch.nn.attention.SDPBackend members.
SDPA_BACKENDS = {"sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_flash": "FLASH_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
OURS = "triton"
MODES = ("fwd", "fwd_bwd")
_DTYPE_NAMES = {t: str(t).removeprefix("torch.")
                for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
KEY_FIELDS = ("head_dim", "tq_bucket", "tk_bucket", "bh_bucket", "dtype", "mask", "mode")

log = logging.getLogger("crossflow_kernels")

# ---------------------------------------------------------------------------------------------------------------------
# The routed implementation: SDPA with attention_ref's semantics
# ---------------------------------------------------------------------------------------------------------------------


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, *, backend: str = "sdpa_math",
) -> torch.Tensor:
    """`attention_ref`'s semantics on one forced SDPA backend ("sdpa_cudnn" | "sdpa_flash" | "sdpa_efficient" |
    "sdpa_math"): q (B, H, Tq, D), k/v (B, H, Tk, D) -> (B, H, Tq, D); key_padding_mask bool (B, Tk), True = attend.

    Masked keys and values are zeroed first, so a NaN or Inf they hold takes no part (SDPA's boolean mask only biases
    the scores: 0 · NaN in P·V is still NaN). A batch element with no key left attends to all of its (now zero) keys
    instead of none: its rows come out exactly 0 with zero gradients, the reference's answer, where SDPA's fused
    backends would give NaN."""
    _check(q, k, v, scale, key_padding_mask)
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"attention_sdpa: unknown backend {backend!r}; choose one of {tuple(SDPA_BACKENDS)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    attn_mask = None
    if key_padding_mask is not None:
        drop = ~key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(drop, 0), v.masked_fill(drop, 0)
        keep = key_padding_mask | ~key_padding_mask.any(-1, keepdim=True)
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, Tk), broadcast over heads and queries
    with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _sdpa_can_run(backend: str, q, k, v, key_padding_mask) -> bool:
    """Can the forced SDPA `backend` run this call? Asked before routing so a rejected layout runs ours rather than
    raising "No available kernel". Eager only: under torch.compile the table's bucket (exact head dim, dtype, mask
    and grad mode) is trusted."""
    if backend == "sdpa_math" or torch.compiler.is_compiling():
        return True
    if not q.is_cuda:  # the CPU has the math and flash kernels only
        return backend == "sdpa_flash"
    check = getattr(torch.backends.cuda, {"sdpa_cudnn": "can_use_cudnn_attention", "sdpa_flash":
                                          "can_use_flash_attention", "sdpa_efficient":
                                          "can_use_efficient_attention"}[backend], None)
    if check is None:  # an older torch without the check: do not guess
        return False
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return bool(check(torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, False, False), False))


# ---------------------------------------------------------------------------------------------------------------------
# Buckets and the table
# ---------------------------------------------------------------------------------------------------------------------


def _pow2_ceil(n) -> int:
    """The smallest power of two >= n, as a Python int. Under torch.compile with dynamic shapes `n` is a SymInt: the
    loop's comparisons become guards on the bucket's range (a recompile per bucket, not per size)."""
    if not torch.compiler.is_compiling():  # (type checks cannot tell: dynamo passes a SymInt off as an int)
        return 1 << max(int(n) - 1, 0).bit_length()
    p = 1
    while p < n:
        p <<= 1
    return p


def _exact(n) -> int:
    """`n` as a Python int; a SymInt (dynamic shapes) is pinned by a binary search of comparisons (guards), since the
    cached decision takes only constants."""
    if not torch.compiler.is_compiling():
        return int(n)
    lo, hi = 0, 1
    while hi <= n:
        hi <<= 1
    while hi - lo > 1:  # lo <= n < hi
        mid = (lo + hi) // 2
        if n < mid:
            hi = mid
        else:
            lo = mid
    return lo


def bucket(head_dim: int, tq: int, tk: int, bh: int, dtype: str, mask: bool, mode: str) -> tuple:
    """The routing key of one call or one measured case, in `KEY_FIELDS` order. dtype as "bfloat16"."""
    if mode not in MODES:
        raise ValueError(f"attention routes: mode must be one of {MODES}, got {mode!r}")
    return (int(head_dim), _pow2_ceil(tq), _pow2_ceil(tk), _pow2_ceil(bh), str(dtype), bool(mask), mode)


def describe(key: tuple) -> str:
    d, tq, tk, bh, dtype, mask, mode = key
    return f"d={d} Tq<={tq} Tk<={tk} B*H<={bh} {dtype} {'masked' if mask else 'unmasked'} {mode}"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def table_file_name(device_name: str) -> str:
    return f"attention-routes_{device_slug(device_name)}.json"


def _bad(path: Path, why: str) -> RuntimeError:
    return RuntimeError(f"attention routing table {path}: {why}. Regenerate it (python -m benchmarks.report "
                        f"<gpu_check.json> --routing-table), delete it, or set {ENV}=off")


def parse_table(path: Path, text: str | bytes) -> dict[str, Any]:
    """Validate a table's text (or its bytes, UTF-8); -> {"device_name", "entries": {key: entry}}. RuntimeError naming
    `path` otherwise."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _bad(path, f"not UTF-8 text ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise _bad(path, f"schema {got!r}, expected {SCHEMA!r}")
    dev = data.get("device_name")
    if not isinstance(dev, str) or not dev:
        raise _bad(path, "no device_name")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise _bad(path, "`entries` must be a list")
    out: dict[tuple, dict] = {}
    for i, e in enumerate(entries):
        try:
            fields = {f: e[f] for f in KEY_FIELDS}
            types_ok = (all(isinstance(fields[f], int) and not isinstance(fields[f], bool) and fields[f] > 0
                            for f in KEY_FIELDS[:4]) and isinstance(fields["mask"], bool))
            if not types_ok:
                raise TypeError("head_dim and the buckets must be positive integers, mask a bool")
            key = bucket(*(fields[f] for f in KEY_FIELDS))
            if key[1:4] != (fields["tq_bucket"], fields["tk_bucket"], fields["bh_bucket"]):
                raise ValueError("a bucket is not a power of two")
        except (KeyError, TypeError, ValueError) as err:
            raise _bad(path, f"entry {i}: {type(err).__name__}: {err}") from None
        if e.get("backend") not in (OURS, *SDPA_BACKENDS):
            raise _bad(path, f"entry {i}: backend {e.get('backend')!r} is not one of {(OURS, *SDPA_BACKENDS)}")
        if key in out:
            raise _bad(path, f"entry {i}: bucket {describe(key)} appears twice")
        out[key] = {**e, "index": i}
    return {"device_name": dev, "entries": out, "source": data.get("source"), "smoke": bool(data.get("smoke"))}


def _table_location(device_name: str) -> Path | None:
    """Where the running device's table would be, or None with routing switched off by the environment."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() in ("off", "0", "none", "false", "no"):
        return None
    if not env:
        return DEFAULT_DIR / table_file_name(device_name)
    p = Path(env).expanduser()
    return p / table_file_name(device_name) if p.is_dir() else p


_TABLES: dict[Path, dict | None] = {}  # path -> parsed table (None: no file)
_DECISIONS: dict[tuple, str | None] = {}  # (path, device name, key) -> SDPA backend or None
_FAST: dict[tuple, str | bool | None] = {}  # (device, env value, key or None) -> the answer, without building a path


def clear_cache() -> None:
    """Forget every table read and decision made (for tests, or after replacing a table file)."""
    _TABLES.clear()
    _DECISIONS.clear()
    _FAST.clear()


def _load(path: Path, explicit: bool) -> dict | None:
    if path not in _TABLES:
        try:
            text = path.read_bytes()  # parse_table decodes: bad bytes are a malformed table, not a UnicodeDecodeError
        except FileNotFoundError:
            if explicit:  # asked for by name: a missing file is a mistake, not "no table"
                raise RuntimeError(f"{ENV}={os.environ.get(ENV)!r}: no such file {path}") from None
            text = None
        table = None if text is None else parse_table(path, text)
        if table is not None and table["smoke"]:
            raise _bad(path, "it was made from a CPU smoke run (`smoke: true`): its numbers are no measurement")
        _TABLES[path] = table
    return _TABLES[path]


def _device_name(device: str) -> str:
    """torch.cuda.get_device_name for a CUDA device; "cpu" otherwise (no CPU table is ever committed)."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def _decide(device: str, key: tuple) -> str | None:
    """The SDPA backend the table names for `key` on `device`, or None for ours. Cached per (device, env, key): after
    the first call of a bucket this is one dict lookup."""
    env = os.environ.get(ENV)
    fast = (device, env, key)
    if fast in _FAST:
        return _FAST[fast]
    name = _device_name(device)
    path = _table_location(name)
    choice = None
    if path is not None:
        cache_key = (path, name, key)
        if cache_key not in _DECISIONS:
            _DECISIONS[cache_key] = _choose(path, name, key)
        choice = _DECISIONS[cache_key]
    _FAST[fast] = choice
    return choice


def _has_table(device: str) -> bool:
    """Is a routing table in force for `device` (routing not switched off, a table file for it)? Cached like
    `_decide`; a malformed table raises here, on the first call that could be routed."""
    env = os.environ.get(ENV)
    fast = (device, env, None)
    if fast not in _FAST:
        name = _device_name(device)
        path = _table_location(name)
        table = None if path is None else _load(path, explicit=_explicit_file())
        if table is not None and table["device_name"] != name:
            log.debug("attention routes: %s is for %r, not this device %r: ours runs", path, table["device_name"],
                      name)
            table = None
        _FAST[fast] = table is not None
    return _FAST[fast]


def _choose(path: Path, name: str, key: tuple) -> str | None:
    table = _load(path, explicit=_explicit_file())
    if table is None or table["device_name"] != name:
        return None
    e = table["entries"].get(key)
    if e is None or e["backend"] == OURS:
        return None
    log.debug("attention: routing %s to %s on %s, per %s entry %d (%s)", describe(key), e["backend"], name, path,
              e["index"], ", ".join(f"{k}={e[k]}" for k in ("ours_ms", "sdpa_ms", "speedup", "shapes") if k in e))
    return e["backend"]


# Under torch.compile `_decide` and `_has_table` run eagerly at trace time (file reads, logging) and their answers are
# constants of the graph, so routing makes no graph break. Marked only where routing can run at all (a CUDA build or the
# interpreter), where `import crossflow_kernels` imports torch._dynamo anyway (registering the Triton ops); a CPU-only
# build never routes and stays off it.
if triton_can_run_here():
    _decide = torch.compiler.assume_constant_result(_decide)
    _has_table = torch.compiler.assume_constant_result(_has_table)


def _explicit_file() -> bool:
    env = os.environ.get(ENV, "").strip()
    return bool(env) and not Path(env).expanduser().is_dir()


# ---------------------------------------------------------------------------------------------------------------------
# The route hook `crossflow_kernels._dispatch.op` calls under backend "auto"
# ---------------------------------------------------------------------------------------------------------------------


def route(q, k, v, scale=None, key_padding_mask=None, *,
          key_lengths=None) -> tuple[str, Callable[..., torch.Tensor]] | None:
    """(backend name, callable) when the table routes this call to SDPA, else None (ours runs). Calls with
    `key_lengths` are never routed: the tables measure ours with a byte mask, slower than ours with lengths."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4):
        return None  # bad input: ours raises the op's own ValueError (a routed call checks everything too)
    if key_lengths is not None:
        return None
    device = str(q.device)
    if not _has_table(device):
        return None  # the default: asked before reading any size, so a compile with dynamic shapes stays dynamic
    b, h, tq, d = q.shape
    tk = k.shape[2]
    if b * h * tq * tk == 0:
        return None  # empty: ours returns empty/zeros without a launch
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or getattr(v, "requires_grad", False))
    key = (_exact(d), _pow2_ceil(tq), _pow2_ceil(tk), _pow2_ceil(b * h), _DTYPE_NAMES.get(q.dtype, str(q.dtype)),
           key_padding_mask is not None, "fwd_bwd" if grad else "fwd")  # == bucket(...), without its checks
    backend = _decide(device, key)
    if backend is None:
        return None
    if not _sdpa_can_run(backend, q, k, v, key_padding_mask):
        _note_ineligible(str(q.device), key, backend)
        return None

    def run(q, k, v, scale=None, key_padding_mask=None):
        return attention_sdpa(q, k, v, scale, key_padding_mask, backend=backend)

    return backend, run


_INELIGIBLE_LOGGED: set = set()


def _note_ineligible(device: str, key: tuple, backend: str) -> None:
    if (device, key, backend) not in _INELIGIBLE_LOGGED:
        _INELIGIBLE_LOGGED.add((device, key, backend))
        log.debug("attention: the table routes %s to %s, but it cannot run this call's layout: ours runs",
                  describe(key), backend)
