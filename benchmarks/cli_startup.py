"""Wall time of the `crossflow` command as a user meets it, each run a cold process: `crossflow --help`, one image
(`crossflow sample "a handwritten seven" -o X.png`) and the full digits evaluation (`crossflow eval --preset digits`),
beside `python -c "import torch"` (the floor under each of them), for a "before" and an "after" source tree (each run
with PYTHONPATH set to that tree, so the same interpreter and packages run both).

    python -m benchmarks.cli_startup --before /work/main --runs 5     # -> results/<date>_cpu_cli-startup.json
    python -m benchmarks.cli_startup --runs 1 --cases help --out /tmp/x.json   # a quick check of this script

Runs of the two trees alternate (before, after, before, ...) so that a change in the machine's load hits both alike.
The JSON records every run's wall time and exit status, their median / min / max, and the machine: CPUs available,
the load average at start and end (a loaded machine makes every number meaningless: run it on an idle one), the
Python and torch versions and each tree's commit. Goals (issue 10): --help under 0.5 s, one cold image under 2.5 s
on an idle 2-core machine. This is a benchmark, not a test: nothing here asserts a time.

Only the standard library is imported here, so the driver itself does not load torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "torch": None,  # not a crossflow command: `python -c "import torch"`, the floor under every cold command here
    "help": ["--help"],
    "sample": ["sample", "a handwritten seven", "-o", "{tmp}/seven.png"],
    "eval": ["eval", "--preset", "digits"],
}


def _git(tree: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def tree_info(tree: Path) -> dict:
    status = _git(tree, "status", "--porcelain", "--untracked-files=no")
    return {"path": str(tree), "commit": _git(tree, "rev-parse", "HEAD"),
            "dirty": None if status is None else bool(status)}


def machine_info() -> dict:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "pythondontwritebytecode_in_driver_env": os.environ.get("PYTHONDONTWRITEBYTECODE"),  # removed for the runs
    }


def run_once(tree: Path, argv: list[str], tmp: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    # A user's shell, not the test suite's or a sandbox's: PYTHONDONTWRITEBYTECODE=1 (set on some build machines)
    # stops Python caching compiled modules, so every "cold" run would recompile every module it imports from source
    # (PIL.Image alone: ~0.1 s) and the warm-up runs could not fill the cache.
    for var in ("TRITON_INTERPRET", "CROSSFLOW_DEBUG", "PYTHONDONTWRITEBYTECODE"):
        env.pop(var, None)
    if argv is None:
        cmd = [sys.executable, "-c", "import torch"]
    else:
        cmd = [sys.executable, "-m", "crossflow.cli", *(a.format(tmp=tmp) for a in argv)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    out = {"wall_s": round(wall, 4), "returncode": r.returncode}
    if r.returncode not in (0, 1):  # 1 is eval's FAIL on the new tree; anything else is worth seeing
        out["stderr_tail"] = r.stderr[-500:]
    return out


def summarise(runs: list[dict]) -> dict:
    walls = [r["wall_s"] for r in runs]
    return {"median_s": round(statistics.median(walls), 4), "min_s": min(walls), "max_s": max(walls), "n": len(walls),
            "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--before", type=Path, default=None, help="a checkout of the old code (e.g. /work/main); "
                   "omitted: only --after is timed")
    p.add_argument("--after", type=Path, default=REPO, help="the new code")
    p.add_argument("--runs", type=int, default=5, help="cold processes per case and tree")
    p.add_argument("--cases", default="torch,help,sample,eval", help=f"comma-separated, from {sorted(CASES)}")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case and tree first (page cache, .pyc)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/<date>_cpu_cli-startup.json)")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or args.runs < 1:
        p.error(f"unknown cases {unknown}" if unknown else "--runs must be >= 1")
    trees = {"after": args.after.resolve()}
    if args.before is not None:
        trees = {"before": args.before.resolve(), **trees}
    for name, tree in trees.items():
        if not (tree / "crossflow" / "cli.py").is_file():
            p.error(f"--{name} {tree}: not a crossflow-triton source tree (no crossflow/cli.py)")
    out = args.out or REPO / "benchmarks" / "results" / f"{dt.date.today().isoformat()}_cpu_cli-startup.json"

    result = {"benchmark": "cli_startup", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "trees": {k: tree_info(v) for k, v in trees.items()},
              "commands": {c: 'python -c "import torch"' if CASES[c] is None else "crossflow " + " ".join(CASES[c])
                           for c in cases}, "results": {}}
    with tempfile.TemporaryDirectory(prefix="crossflow-cli-startup-") as tmp:
        for case in cases:
            for tree in trees.values():
                for _ in range(args.warmup):
                    run_once(tree, CASES[case], tmp, args.timeout)
            runs: dict[str, list[dict]] = {k: [] for k in trees}
            for _ in range(args.runs):  # alternate the trees
                for name, tree in trees.items():
                    runs[name].append(run_once(tree, CASES[case], tmp, args.timeout))
            result["results"][case] = {name: summarise(r) for name, r in runs.items()}
            line = ", ".join(f"{n} median {s['median_s']:.3f} s" for n, s in result["results"][case].items())
            print(f"{case}: {line}", flush=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
