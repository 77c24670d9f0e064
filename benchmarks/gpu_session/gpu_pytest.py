"""pytest plugin for the GPU check's test stage (`-p benchmarks.gpu_session.gpu_pytest`): a per-test timeout, a
per-test results file, a stage deadline, a priority order, and skips, with the reason, of what the lent GPU machine
cannot do.

  --test-timeout S   fail a test whose setup, call or teardown runs longer than S seconds (0: off). SIGALRM raises in
                     the test's own thread (each pytest-xdist worker runs its tests in its main thread); a test stuck
                     inside C code that never returns to Python is ended by faulthandler S + 15 s later, which kills
                     that process (xdist reports the crash and carries on with a fresh worker). pytest-timeout is not
                     a dependency: CI lacks it, and this is the small part of it the GPU check needs.
  --results-file P   append one JSON line per finished test phase report (nodeid, when, outcome, duration, message) to
                     P as it arrives, flushed and fsynced: a stage killed mid-run keeps every finished test (JUnit is
                     written only at the end). Under xdist the reports arrive at the controller: one writer.
  --stop-at T        tests that would start after the Unix time T are skipped ("no time left"): a serial run ends
                     cleanly inside its budget and writes its JUnit file.
  --priority-order   run the most informative tests first (`PRIORITY`): a run cut short keeps those.
Markers it understands: `network` (needs a download: skipped, the GPU machine has no network) and `multi_gpu` (skipped
when fewer than 2 CUDA devices are visible).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

import pytest

HARD_KILL_AFTER_S = 15
# Substrings of node ids, most informative first: correctness of the kernels on the GPU-only paths (the fresh-key dQ,
# bf16, large shapes), then the sampler and CUDA graphs, then torch.compile (an Inductor compile each: slowest).
# Unmatched tests run after the matched ones; `compile` in the name puts any test last.
PRIORITY = ("test_attention.py::test_attention_fused_bwd_fresh_key", "test_attention.py", "test_adaln.py",
            "test_euler.py", "test_rms_norm.py", "test_geglu.py", "crossflow_kernels/", "sampler", "graph")


def pytest_addoption(parser):
    group = parser.getgroup("crossflow gpu check")
    group.addoption("--test-timeout", type=float, default=0.0,
                    help="per-test timeout in seconds (setup, call, teardown each)")
    group.addoption("--results-file", default=None, help="append one JSON line per test report, as it finishes")
    group.addoption("--stop-at", type=float, default=0.0, help="skip tests that would start after this Unix time")
    group.addoption("--priority-order", action="store_true", help="most informative tests first (PRIORITY)")


def priority(nodeid: str) -> tuple[int, int]:
    """Sort key of a test: (is a compile test, index of the first PRIORITY pattern it matches)."""
    rank = next((i for i, pat in enumerate(PRIORITY) if pat in nodeid), len(PRIORITY))
    return ("compile" in nodeid.rsplit("::", 1)[-1], rank)


def pytest_runtest_logreport(report):
    path = _RESULTS_FILE.get("path")
    if not path or (report.when != "call" and report.outcome == "passed"):
        return  # a passing setup/teardown says nothing the call's report does not
    line = dict(nodeid=report.nodeid, when=report.when, outcome=report.outcome, duration=round(report.duration, 3),
                time=round(time.time(), 3))
    if report.outcome != "passed":
        crash = getattr(report.longrepr, "reprcrash", None)  # the exception line, as pytest's short summary shows it
        if isinstance(report.longrepr, tuple):  # a skip: (path, line, "Skipped: reason")
            text = str(report.longrepr[2])
        else:
            text = crash.message if crash is not None else (report.longreprtext or "").strip()
        line["message"] = (text.splitlines() or [""])[0][:500]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())



_RESULTS_FILE: dict[str, str] = {}  # "path": set in pytest_configure of the process that writes (never a worker)


def pytest_configure(config):
    if config.getoption("--results-file") and not hasattr(config, "workerinput"):  # the controller (or no xdist)
        _RESULTS_FILE["path"] = config.getoption("--results-file")
    config.addinivalue_line("markers", "network: needs a download (skipped in the GPU check: no network there)")
    config.addinivalue_line("markers", "multi_gpu: needs 2 or more CUDA devices")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--priority-order"):
        items.sort(key=lambda item: priority(item.nodeid))  # stable: file order within a priority
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
    stop_at = item.config.getoption("--stop-at")
    if stop_at and time.time() > stop_at:
        item.add_marker(pytest.mark.skip(reason="no time left in the stage budget (--stop-at)"))
    yield from _wrap(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _wrap(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _wrap(item, "teardown")
