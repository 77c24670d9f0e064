"""The GPU check's `diffusers` stage without diffusers: it records a skip with the note that says how to carry the
wheel, and fails nothing (the lent GPU machines have no diffusers). Its body with diffusers runs in
`bash benchmarks/smoke.sh` (`run_gpu.sh --smoke`)."""

from benchmarks import bench_diffusers
from benchmarks.gpu_session import gpu_check


def test_stage_without_diffusers_records_a_skip(tmp_path, monkeypatch):
    note = "diffusers is not installed here: carry it"
    monkeypatch.setattr(bench_diffusers, "diffusers_missing", lambda: note)
    stage = gpu_check.Stage("diffusers", 10, "", bench_diffusers.stage_diffusers, "")
    data = gpu_check.run_stages([stage], tmp_path, smoke=True, total_s=30)
    st = data["stages"]["diffusers"]
    assert st["status"] == "ok" and st["results"] == {"skipped": True, "note": note}
    assert st["cases"] == [{"status": "skipped", "reason": note}]


def test_stage_is_last_in_the_plan():
    assert gpu_check.STAGES[-1].name == "diffusers" and gpu_check.STAGES[-1].budget_s <= 80


def test_readme_table_reads_the_cases():
    data = {"smoke": False, "env": {"device_name": "NVIDIA H100", "torch": "2.13"},
            "stages": {"diffusers": {"status": "ok", "wall_s": 60.0,
                                     "results": {"model": "DiT-XL/2-256", "steps": 50, "dtype": "bfloat16"},
                                     "cases": [
                                         {"batch": 8, "provider": "patched_eager", "status": "ok", "images_per_s": 20.0,
                                          "speedup_vs_unpatched_eager": 1.25, "warmup_s": 4.0, "max_abs_diff": 0.01},
                                         {"batch": 1, "provider": "patched_compile", "status": "skipped",
                                          "reason": "10 s left"}]}}}
    text = bench_diffusers.readme_table(data)
    assert "| 8 | patched_eager | 20 | 1.25x | 4.0 | 0.01 |" in text
    assert "| 1 | patched_compile | skipped: 10 s left |" in text and "NVIDIA H100" in text
