"""The quality-against-NFE sweep: distances to the converged solution, the recommendation rule, the CLI verb."""

import json

import pytest
import torch

from crossflow.digits.sweep import recommend, sweep

pytestmark = pytest.mark.usefixtures("torch_backend")


def _p(sampler, steps, nfe, rmse, passed=True):
    return dict(sampler=sampler, steps=steps, nfe=nfe, rmse_to_converged=rmse, passed=passed)


def test_recommend_takes_the_fewest_nfe_as_close_as_the_baseline_that_passes():
    base = _p("euler", 50, 50, 0.010)
    points = [base, _p("euler", 8, 8, 0.05), _p("midpoint", 4, 8, 0.012), _p("midpoint", 8, 16, 0.009),
              _p("midpoint", 5, 10, 0.008, passed=False), _p("midpoint", 16, 32, 0.002)]
    r = recommend(points, base)
    assert (r["sampler"], r["steps"], r["nfe"]) == ("midpoint", 8, 16) and r["saving"] == 50 / 16
    assert recommend([base], base)["saving"] == 1.0  # nothing better: the baseline itself


def test_sweep_on_the_shipped_super_resolution_model():
    from crossflow.pipelines.base import default_checkpoint
    from crossflow.pipelines.image import ImagePipeline
    from crossflow.scheduler_sampler import make_sampler

    ckpt = default_checkpoint("digits-sr")
    pipe = ImagePipeline.from_pretrained(ckpt, sampler=make_sampler("euler", steps=2, guidance_scale=1.5))
    own = pipe.sampler
    res = sweep("digits-sr", pipe, ckpt, steps=(1, 2, 8), samplers=("euler", "midpoint"), reference=("midpoint", 8))
    assert pipe.sampler is own  # the caller's pipeline keeps its sampler
    pts = {(p["sampler"], p["steps"]): p for p in res["points"]}
    assert set(pts) == {(m, n) for m in ("euler", "midpoint") for n in (1, 2, 8)}  # the baseline (euler, 2) included
    assert pts["midpoint", 8]["rmse_to_converged"] == 0.0  # the reference's own setting: same ODEs, same solver
    assert all(p["rmse_calls"] >= 1 for p in res["points"])
    for m in ("euler", "midpoint"):
        assert pts[m, 1]["rmse_to_converged"] > pts[m, 2]["rmse_to_converged"] > pts[m, 8]["rmse_to_converged"]
    assert pts["midpoint", 2]["rmse_to_converged"] < pts["euler", 2]["rmse_to_converged"]
    assert pts["midpoint", 2]["nfe"] == 4 and pts["euler", 8]["psnr_db"] > 10
    r = res["recommended"]
    assert r["baseline"]["nfe"] == 2 and r["rmse_to_converged"] <= r["baseline"]["rmse_to_converged"]
    assert res["reference"] == {"sampler": "midpoint", "steps": 8, "nfe": 16}
    json.dumps(res)  # one JSON


def test_the_eval_verb_checks_its_lists_first(cli_fails):
    assert "twice" in cli_fails(["eval", "--sweep-steps", "2,2"], 2)
    assert "not one of" in cli_fails(["eval", "--sweep-steps", "2", "--sweep-samplers", "euler,ddim"], 2)
    assert "must be >= 1" in cli_fails(["eval", "--sweep-steps", "0,2"], 2)
    assert "comma-separated" in cli_fails(["eval", "--sweep-steps", ","], 2)


@pytest.mark.slow
def test_the_eval_verb_sweeps(tmp_path, capsys):
    from crossflow import cli

    out = tmp_path / "sweep.json"
    cli.main(["eval", "--preset", "digits-sr", "--sweep-steps", "1", "--sweep-samplers", "midpoint", "--steps", "1",
              "--backend", "torch", "-q", "--json", str(out)])
    res = json.loads(out.read_text())
    # the grid, then the checkpoint's own setting (digits-sr ships midpoint x 16)
    assert [(p["sampler"], p["steps"]) for p in res["points"]] == [("midpoint", 1), ("midpoint", 16)]
    last = capsys.readouterr().out.rstrip().splitlines()[-1]  # midpoint x 1 is worse than the shipped setting
    assert last.startswith("recommended: midpoint x 16 steps = 32 NFE") and last.endswith("1.0x fewer network evaluations")


def test_distances_stop_at_the_first_call_that_starts_elsewhere():
    from crossflow.digits.sweep import _Recorder, _rmse

    ref, rec = _Recorder(None), _Recorder(None)
    a, b = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    ref.z0, ref.z1 = [a, a], [a, a]
    rec.z0, rec.z1 = [a, b], [a + 0.5, b]  # the second call starts from the point's own output
    assert _rmse(rec, ref, "x") == (0.5, 1)
    rec.z0 = [b, b]
    with pytest.raises(RuntimeError, match="start latents differ"):
        _rmse(rec, ref, "x")


def test_the_report_renders_a_sweep(tmp_path):
    from benchmarks.report import write_report

    base = _p("euler", 4, 4, 0.02)
    data = {"preset": "digits-sr", "reference": {"sampler": "midpoint", "steps": 8, "nfe": 16},
            "points": [{**base, "psnr_db": 15.0}, {**_p("midpoint", 1, 2, 0.01), "psnr_db": 15.5}],
            "recommended": recommend([base, _p("midpoint", 1, 2, 0.01)], base)}
    src = tmp_path / "sweep_digits-sr.json"
    src.write_text(json.dumps(data))
    md = write_report([src], tmp_path / "out").read_text()
    assert "Recommended: **midpoint x 1 steps = 2 NFE**" in md and "2.0x fewer evaluations" in md
    assert "| midpoint | 1 | 2 | 0.01 | 15.5 | yes |" in md
    assert (tmp_path / "out" / "sweep_digits-sr.png").stat().st_size > 1000
