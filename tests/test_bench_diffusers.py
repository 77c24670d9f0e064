"""The GPU check's `diffusers` stage without diffusers: it records a skip with the note that says how to carry the
wheel, and fails nothing (the lent GPU machines have no diffusers). Its body with diffusers runs in
`bash benchmarks/smoke.sh` (`run_gpu.sh --smoke`)."""

from benchmarks import bench_diffusers, gpu_check


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
