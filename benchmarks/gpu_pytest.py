"""pytest plugin for the GPU check's test stage (`-p benchmarks.gpu_pytest`): a per-test timeout and skips, with the
reason, of what the lent GPU machine cannot do.

  --test-timeout S   fail a test whose setup, call or teardown runs longer than S seconds (0: off). SIGALRM raises in
                     the test's own thread (each pytest-xdist worker runs its tests in its main thread); a test stuck
                     inside C code that never returns to Python is ended by faulthandler S + 15 s later, which kills
                     that process (xdist reports the crash and carries on with a fresh worker). pytest-timeout is not
                     a dependency: CI lacks it, and this is the small part of it the GPU check needs.
Markers it understands: `network` (needs a download: skipped, the GPU machine has no network) and `multi_gpu` (skipped
when fewer than 2 CUDA devices are visible).
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
from contextlib import contextmanager

import pytest

HARD_KILL_AFTER_S = 15


def pytest_addoption(parser):
    parser.getgroup("crossflow gpu check").addoption(
        "--test-timeout", type=float, default=0.0, help="per-test timeout in seconds (setup, call, teardown each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs a download (skipped in the GPU check: no network there)")
    config.addinivalue_line("markers", "multi_gpu: needs 2 or more CUDA devices")


def pytest_collection_modifyitems(config, items):
    n_gpus = None
    for item in items:
        if "network" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a download; the GPU check runs without network"))
        if "multi_gpu" in item.keywords:
            if n_gpus is None:
                import torch

                n_gpus = torch.cuda.device_count()
            if n_gpus < 2:
                item.add_marker(pytest.mark.skip(reason=f"needs 2 GPUs; this machine has {n_gpus}"))


class PerTestTimeout(Exception):
    pass


@contextmanager
def _deadline(seconds: float, what: str):
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise PerTestTimeout(f"{what} exceeded the per-test timeout of {seconds:g} s (--test-timeout)")

    # Signal handlers can only be set from the main thread; elsewhere only the hard (process-ending) limit applies.
    soft = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, on_alarm) if soft else None
    faulthandler.dump_traceback_later(seconds + HARD_KILL_AFTER_S, exit=True, file=sys.__stderr__)
    if soft:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if soft:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


def _wrap(item, phase: str):
    with _deadline(item.config.getoption("--test-timeout"), f"{item.nodeid} ({phase})"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _wrap(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _wrap(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _wrap(item, "teardown")
