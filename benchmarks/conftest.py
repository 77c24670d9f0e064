"""Benchmark setup. Order matters: without CUDA the Triton interpreter must be on before `crossflow_kernels` is imported
(the switch is read when each `@triton.jit` runs), and then the suites run on tiny shapes (`--bench-tiny` forces them).

Options (all optional):
  --bench-tiny             tiny shapes, 1 round (automatic without CUDA)
  --bench-shapes IDS       kernel shape ids, comma-separated (e.g. xl256-b8,h512-b32)
  --bench-dtypes LIST      bf16,fp16 (default both)
  --bench-modes LIST       fwd,fwd_bwd (default); bwd also available
  --bench-rounds N         pytest-benchmark timed rounds (default: kernels 5, sampler 1; tiny 1)
  --bench-steps N          sampler steps (default 50; tiny 2)
  --bench-batches LIST     sampler batches (default 1,8,32; tiny 1)
  --bench-presets LIST     sampler presets (default dit-xl-2,dit-h-2-512; tiny: tiny,dimr-tiny)
  --bench-save WHAT        write JSON to benchmarks/results/<date>_<device>_<WHAT>.json (unless --benchmark-json)
  --bench-report DIR       after the run, render report.py's markdown + plots from the JSON into DIR
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

import crossflow_kernels  # noqa: E402,F401  (after the interpreter switch)
from benchmarks import _common  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_SKIPPED: list[dict[str, str]] = []


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def pytest_addoption(parser):
    g = parser.getgroup("crossflow benchmarks")
    g.addoption("--bench-tiny", action="store_true", help="tiny shapes (automatic without CUDA)")
    g.addoption("--bench-shapes", default=None, help="kernel shape ids, comma-separated, e.g. xl256-b8,h512-b32")
    g.addoption("--bench-dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16")
    g.addoption("--bench-modes", default="fwd,fwd_bwd", help="comma-separated: fwd, fwd_bwd, bwd")
    g.addoption("--bench-rounds", type=int, default=None, help="timed pytest-benchmark rounds per case")
    g.addoption("--bench-steps", type=int, default=None, help="sampler steps (default 50; tiny 2)")
    g.addoption("--bench-batches", default=None, help="sampler batches, comma-separated (default 1,8,32)")
    g.addoption("--bench-presets", default=None, help="sampler presets (default dit-xl-2,dit-h-2-512)")
    g.addoption("--bench-save", default=None, metavar="WHAT", help="JSON to benchmarks/results/<date>_<dev>_WHAT.json")
    g.addoption("--bench-report", default=None, metavar="DIR", help="render the markdown report + plots into DIR")


def _shapes(tiny: bool, only: list[str] | None) -> list[_common.BenchShape]:
    try:
        return _common.kernel_shapes(tiny, only)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


def bench_options(config) -> SimpleNamespace:
    """The run's settings, derived once from the command line and the device."""
    cached = getattr(config, "_bench_options", None)
    if cached is not None:
        return cached
    tiny = config.getoption("--bench-tiny") or not torch.cuda.is_available()
    dtypes = _csv(config.getoption("--bench-dtypes")) or []
    bad = sorted(set(dtypes) - set(_DTYPES))
    modes = _csv(config.getoption("--bench-modes")) or []
    bad_modes = sorted(set(modes) - {"fwd", "fwd_bwd", "bwd"})
    if bad or bad_modes:
        raise pytest.UsageError(f"unknown --bench-dtypes {bad} / --bench-modes {bad_modes}")
    steps = config.getoption("--bench-steps")
    batches = _csv(config.getoption("--bench-batches"))
    opts = SimpleNamespace(
        tiny=tiny,
        device=_common.device(),
        shapes=_shapes(tiny, _csv(config.getoption("--bench-shapes"))),
        dtypes=[(d, _DTYPES[d]) for d in dtypes],
        modes=modes,
        rounds=config.getoption("--bench-rounds"),
        steps=steps or (2 if tiny else 50),
        batches=[int(b) for b in batches] if batches else ([1] if tiny else [1, 8, 32]),
        presets=_csv(config.getoption("--bench-presets"))
        or (["tiny", "dimr-tiny"] if tiny else ["dit-xl-2", "dit-h-2-512"]),
    )
    config._bench_options = opts
    return opts


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's (trylast) configure reads --benchmark-json
def pytest_configure(config):
    what = config.getoption("--bench-save", default=None)
    if what and not config.getoption("--benchmark-json", default=None):
        path = _common.results_path(what)
        path.parent.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = open(path, "wb")  # noqa: SIM115 - pytest-benchmark writes and closes it


@pytest.fixture(scope="session")
def bench(pytestconfig) -> SimpleNamespace:
    return bench_options(pytestconfig)


@pytest.fixture(scope="session")
def device_limits(bench) -> dict:
    """Copy GB/s and bf16 matmul TFLOP/s of this device, measured once per run; every case's fraction uses them."""
    return _common.measure_limits(bench.tiny)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_runtest_logreport(report):
    # Skipped cases do not reach pytest-benchmark's JSON; keep their reasons so the report can list them.
    if report.skipped and report.when in ("setup", "call") and isinstance(report.longrepr, tuple):
        _SKIPPED.append({"case": report.nodeid, "reason": str(report.longrepr[2]).removeprefix("Skipped: ")})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    opts = bench_options(config)
    output_json["crossflow_bench"] = {
        "tiny": opts.tiny, **_common.env_info(), "skipped": list(_SKIPPED),
        "steps": opts.steps, "modes": opts.modes,
    }


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    # Must run after pytest-benchmark has written the JSON (trylast); if the file is still empty, say so.
    out = session.config.getoption("--bench-report", default=None)
    fh = session.config.getoption("--benchmark-json", default=None)
    if out and fh is not None and os.path.exists(fh.name) and os.path.getsize(fh.name):
        from benchmarks import report

        md = report.write_report([fh.name], out)
        print(f"\nbenchmarks report: {md}")
    elif out:
        print(f"\nbenchmarks report: not written (no benchmark JSON yet); run python -m benchmarks.report JSON --out {out}")
