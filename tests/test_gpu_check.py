"""The GPU check's machinery, on the CPU: the plan fits the device command, budgets are enforced (a stage over its
budget is killed and recorded, finished cases survive, the next stage runs), the per-test timeout fires, and the
report renders the README table from the results file. The stage bodies themselves run in `bash benchmarks/smoke.sh`
(`run_gpu.sh --smoke`)."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.gpu_session import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_plan_fits_one_device_command():
    names = [s.name for s in gpu_check.STAGES]
    assert names == ["limits", "tests", "attention", "adaln", "sampler", "ncu", "diffusers"]  # the priority order
    assert sum(s.budget_s for s in gpu_check.STAGES) <= gpu_check.TOTAL_BUDGET_S <= 540
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--plan"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    total = next(line for line in out.stdout.splitlines() if line.strip().startswith("total"))
    assert int(total.split()[1]) == sum(s.budget_s for s in gpu_check.STAGES) and "<= 540" in total
    for s in gpu_check.STAGES:
        assert f"{s.name}" in out.stdout and f"{s.budget_s} s" in out.stdout


def test_readme_lists_the_plan():
    text = (ROOT / "benchmarks" / "README.md").read_text()
    for i, s in enumerate(gpu_check.STAGES, 1):
        assert f"| {i} | `{s.name}` | {s.budget_s} s |" in text, f"benchmarks/README.md: stage {s.name} out of date"


def _record_then_sleep(ctx):
    ctx.add_case({"n": 1, "status": "ok"})
    time.sleep(60)
    ctx.add_case({"n": 2, "status": "ok"})  # never reached


def _record(ctx):
    ctx.set_result(ran=True, left_s=ctx.remaining())


def _raise(ctx):
    ctx.add_case({"n": 1, "status": "ok"})
    raise ValueError("broken stage body")


def test_budget_is_enforced_and_finished_cases_survive(tmp_path):
    stages = [gpu_check.Stage("slow", 2, "sleeps past its budget", _record_then_sleep, ""),
              gpu_check.Stage("broken", 5, "raises", _raise, ""),
              gpu_check.Stage("next", 5, "records", _record, "")]
    t0 = time.monotonic()
    data = gpu_check.run_stages(stages, tmp_path, smoke=True, total_s=60)
    assert time.monotonic() - t0 < 20  # the 60 s sleep was cut at the 2 s budget (plus the kill grace)
    slow, broken, nxt = (data["stages"][n] for n in ("slow", "broken", "next"))
    assert slow["status"] == "timeout" and slow["cases"] == [{"n": 1, "status": "ok"}]
    assert broken["status"] == "failed" and "ValueError: broken stage body" in broken["error"]
    assert broken["cases"] == [{"n": 1, "status": "ok"}]
    assert nxt["status"] == "ok" and nxt["results"]["ran"] is True and 0 < nxt["results"]["left_s"] <= 5
    on_disk = gpu_check.read_results(tmp_path / gpu_check.RESULTS_NAME)
    assert on_disk["stages"] == data["stages"] and on_disk["finished"] and on_disk["smoke"] is True


def _leave_a_process(ctx):
    ctx.set_result(pid=subprocess.Popen(["sleep", "60"]).pid)  # e.g. a compile worker the stage did not stop


def test_a_stage_leaves_no_process_behind(tmp_path):
    data = gpu_check.run_stages([gpu_check.Stage("leaky", 5, "", _leave_a_process, "")], tmp_path, smoke=True,
                                total_s=30)
    pid = data["stages"]["leaky"]["results"]["pid"]
    assert data["stages"]["leaky"]["status"] == "ok"
    time.sleep(0.5)
    try:  # killed with the stage's process group: gone, or a zombie until init reaps it
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X"), state


def test_total_cap_skips_what_no_longer_fits(tmp_path):
    stages = [gpu_check.Stage("slow", 3, "", _record_then_sleep, ""), gpu_check.Stage("late", 30, "", _record, "")]
    data = gpu_check.run_stages(stages, tmp_path, smoke=True, total_s=4)
    assert data["stages"]["slow"]["status"] == "timeout"
    assert data["stages"]["late"]["status"] == "skipped" and "left" in data["stages"]["late"]["note"]


def test_per_test_timeout_plugin(tmp_path):
    (tmp_path / "test_hangs.py").write_text(textwrap.dedent("""
        import time, pytest

        def test_hangs():
            time.sleep(30)

        def test_quick():
            pass

        @pytest.mark.network
        def test_download():
            raise AssertionError("must be skipped")
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-p", "benchmarks.gpu_session.gpu_pytest",
                          "-q", "--test-timeout=1", "-p", "no:cacheprovider", "-rs", "--rootdir", str(tmp_path),
                          f"--junitxml={tmp_path / 'junit.xml'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert time.monotonic() - t0 < 25, out.stdout
    assert "1 failed, 1 passed, 1 skipped" in out.stdout, out.stdout + out.stderr
    assert "exceeded the per-test timeout of 1 s" in out.stdout
    assert "needs a download" in out.stdout
    # What the tests stage records from the JUnit XML.
    summary = gpu_check._junit_summary(tmp_path / "junit.xml")
    assert (summary["passed"], summary["failed"], summary["errors"], summary["skipped"]) == (1, 1, 0, 1)
    assert summary["failures"][0]["test"].endswith("::test_hangs") and "timeout" in summary["failures"][0]["message"]
    assert summary["skipped_reasons"][0]["reason"].startswith("needs a download")


def test_ncu_headline_metrics():
    text = textwrap.dedent("""
          _attn_fwd_kernel (8, 256, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
            Section: GPU Speed Of Light Throughput
            Memory Throughput                 %        45.12
            Duration                    nsecond        62340
            Compute (SM) Throughput           %        78.90
            Section: Launch Statistics
            Registers Per Thread register/thread          168
    """)
    m = gpu_check._ncu_metrics(text)
    assert m["Duration"] == "nsecond 62340" and m["Registers Per Thread"] == "register/thread 168"
    assert m["Compute (SM) Throughput"] == "% 78.90" and "Grid Size" not in m


def test_readme_table_from_results(tmp_path):
    # Made-up numbers on a made-up device: this checks the rendering, it is no measurement.
    att = [dict(model="m", batch=1, heads=2, tokens=8, head_dim=4, shape=[2, 2, 8, 4], mode="fwd", dtype="bfloat16",
                provider=p, status="ok", tflops=t) for p, t in (("triton", 3.0), ("sdpa_flash", 4.0),
                                                                 ("sdpa_cudnn", 6.0))]
    att.append(dict(att[0], provider="sdpa_efficient", status="unavailable", reason="rejects", tflops=None))
    data = {
        "schema": gpu_check.SCHEMA, "smoke": False, "started": "2030-01-02T03:04:05+00:00",
        "env": {"device_name": "fake-device"},
        "stages": {
            "limits": {"status": "ok", "results": {"copy_gbps": 100.0, "matmul_tflops": 10.0, "dtype": "bfloat16",
                                                   "matmul_shape": [8, 8, 8]}},
            "attention": {"status": "ok", "cases": att},
            "sampler": {"status": "timeout", "results": {"preset": "p", "steps": 2, "rounds": 2},
                        "cases": [dict(batch=1, provider="official_eager", status="ok", images_per_s=2.0),
                                  dict(batch=1, provider="fast", status="ok", images_per_s=5.0)]},
        },
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    md = "\n".join(report.readme_table(gpu_check.read_results(path), "r.json"))
    assert "| m | 1 | 2x2x8x4 | fwd | 3 | cudnn | 6 | 0.5 |" in md  # ours / the fastest SDPA backend that ran
    assert "| 1 | 2 | – | 5 | – | 2.5 |" in md  # a provider that did not run is blank, never filled in
    assert "sampler timeout" in md and "fake-device" in md
    full = report.write_report([path], tmp_path / "rep").read_text()
    assert "sdpa_efficient: unavailable: rejects" in full
    saved = gpu_check.save_result(path, tmp_path / "results", tmp_path)  # its routing table: not into the package
    assert saved.name == "2030-01-02_fake-device_gpu-check.json" and gpu_check.read_results(saved) == data
    path.write_text(json.dumps(dict(data, smoke=True)))
    with pytest.raises(ValueError, match="smoke"):
        gpu_check.save_result(path, tmp_path / "results", tmp_path)
    path.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="not a GPU-check result"):
        gpu_check.read_results(path)


@pytest.mark.slow  # waits out the stage's 25 s budget
def test_killed_tests_stage_keeps_every_finished_test(tmp_path, monkeypatch):
    # The tests stage as the smoke runs it, on a file whose third test stops its process: the stage is killed at its
    # budget (no JUnit file is written), yet the per-test file has the two finished tests and the driver summarises
    # it into the results. The stopped test comes first in the file but runs last: the priority order puts a
    # `compile` test at the end.
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_some_gpu.py").write_text(textwrap.dedent("""
        import os, signal, pytest

        @pytest.mark.gpu
        def test_compile_stops_the_process():
            os.kill(os.getpid(), signal.SIGSTOP)  # stuck where no timeout can reach: only the stage kill ends it

        @pytest.mark.gpu
        def test_first():
            pass

        @pytest.mark.gpu
        def test_second_fails():
            assert 1 == 2
    """))
    monkeypatch.setattr(gpu_check, "SMOKE_TEST_TARGETS", [str(tests)])
    stage = next(s for s in gpu_check.STAGES if s.name == "tests")
    data = gpu_check.run_stages([gpu_check.Stage("tests", 25, "", stage.body, "", after=stage.after)], tmp_path,
                                smoke=True, total_s=60)
    st = data["stages"]["tests"]
    assert st["status"] == "timeout" and not (tmp_path / gpu_check.JUNIT_NAME).exists()
    lines = [json.loads(x) for x in (tmp_path / gpu_check.TESTS_JSONL).read_text().splitlines()]
    assert [(r["nodeid"].rsplit("::", 1)[1], r["outcome"]) for r in lines] == [("test_first", "passed"),
                                                                              ("test_second_fails", "failed")]
    summary = st["results"]["per_test"]
    assert (summary["passed"], summary["failed"]) == (1, 1) and "assert 1 == 2" in summary["failures"][0]["message"]


def test_stop_at_skips_what_would_start_too_late(tmp_path):
    (tmp_path / "test_two.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-p", "benchmarks.gpu_session.gpu_pytest",
                          "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "--stop-at=1",
                          f"--results-file={tmp_path / 'r.jsonl'}"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                         timeout=120)
    assert "2 skipped" in out.stdout and "no time left" in out.stdout, out.stdout + out.stderr
    assert [json.loads(x)["outcome"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == ["skipped"] * 2


def test_priority_order():
    from benchmarks.gpu_session.gpu_pytest import priority
    ids = ["tests/test_sampler.py::test_fast_graph",
           "tests/crossflow_kernels/test_attention.py::test_attention_compile_x",
           "tests/crossflow_kernels/test_euler.py::test_e", "tests/x/test_other.py::test_o",
           "tests/crossflow_kernels/test_attention.py::test_attention_fused_bwd_fresh_key_gpu",
           "tests/crossflow_kernels/test_attention.py::test_attention_large_gpu[bf16]"]
    assert sorted(ids, key=priority) == [ids[4], ids[5], ids[2], ids[0], ids[3], ids[1]]


def test_ncu_without_counter_permission_is_said_at_once(tmp_path, monkeypatch):
    params = tmp_path / "params"
    params.write_text("ResmanDebugLevel: 4294967295\nRmProfilingAdminOnly: 1\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert gpu_check.counters_admin_only(params)
    params.write_text("RmProfilingAdminOnly: 0\n")
    assert not gpu_check.counters_admin_only(params) and not gpu_check.counters_admin_only(tmp_path / "none")
    # ncu's own message, seen in its first lines: the process is stopped there, not left to run its passes.
    script = "import time\nprint('==ERROR== ERR_NVGPUCTRPERM - no permission', flush=True)\ntime.sleep(60)\n"
    t0 = time.monotonic()
    rc, stopped = gpu_check.run_watching([sys.executable, "-c", script], dict(os.environ), gpu_check.NCU_NO_PERMISSION)
    assert stopped and rc != 0 and time.monotonic() - t0 < 10


def test_attention_stage_estimate_matches_the_prune():
    # The plan's attention estimate counts 6-8 kept configs per head dim on sm_90 (the sm_90 forward, the fused
    # backward, the delta preprocess), not the 24 declared ones: derived from the prunes themselves.
    import importlib

    import triton

    attn = importlib.import_module("crossflow_kernels.attention_tuning")

    def configs(tiles):
        return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s) for bm, bn, w, s in tiles]

    for d in gpu_check.ATTN_MODELS:
        d0, d1 = attn._split_head_dim(d)
        args = dict(D0=d0, D1=d1, HAS_MASK=False, DOT_PRECISION="tf32")
        fwd = attn._prune_sm90_for(configs(attn._FWD_SM90_TILES), args, 90)
        bwd = attn._prune_for("fused", configs(attn._FUSED_TILES), args, 90)
        assert 4 <= len(fwd) + len(bwd) + 1 <= 8, (d, len(fwd), len(bwd))
    stage = next(s for s in gpu_check.STAGES if s.name == "attention")
    assert "6-8 kept configs per head dim" in stage.estimate
