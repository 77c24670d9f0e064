"""The quality-against-NFE sweep: distances to the converged solution, the noise rule, the recommendation, the CLI
verb."""

import json
from pathlib import Path

import pytest
import torch

from crossflow.digits.sweep import judged, noise, recommend, sweep, worse_than

pytestmark = pytest.mark.usefixtures("torch_backend")


def _p(sampler, steps, nfe, rmse, passed=True, within_noise=True):
    return dict(sampler=sampler, steps=steps, nfe=nfe, rmse_to_converged=rmse, passed=passed,
                within_noise=within_noise)


def test_recommend_takes_the_fewest_nfe_within_noise_that_passes():
    base = _p("euler", 50, 50, 0.010, within_noise=False)  # the baseline need not be within noise itself
    points = [base, _p("euler", 8, 8, 0.05, within_noise=False), _p("midpoint", 4, 8, 0.012, passed=False),
              _p("unipc", 16, 16, 0.011), _p("midpoint", 8, 16, 0.009), _p("midpoint", 16, 32, 0.002)]
    r = recommend(points, base)
    assert (r["sampler"], r["steps"], r["nfe"]) == ("midpoint", 8, 16)  # ties on NFE: the smaller rmse
    assert r["saving"] == 50 / 16 and r["baseline"]["within_noise"] is False
    assert recommend([base], base) is None  # nothing within noise that passes
    asked = []
    r = recommend(points, base, confirm=lambda p: asked.append((p["sampler"], p["steps"])) or len(asked) == 3)
    assert asked == [("midpoint", 8), ("unipc", 16), ("midpoint", 16)]  # in order, until one passes the full eval
    assert (r["sampler"], r["steps"], r["saving"]) == ("midpoint", 16, 50 / 32)
    assert recommend(points, base, confirm=lambda p: False) is None


def test_judged_numbers_and_their_directions():
    res = {"psnr_gain_db": 3.0, "accuracy": 0.9, "realism": 0.6, "psnr_db": 17.0}  # no posterior mean: not judged
    assert judged("digits-sr", res) == [("psnr_gain_db", ">="), ("accuracy", ">="), ("realism", "<=")]
    assert judged("digits", {"accuracy": 1, "diversity": 0.9, "speckle": 0.8, "realism": 0.6})[-1] == ("realism", "<=")
    assert ("distance_to_input", "in") in judged("digits-vary", {"label_kept": 1.0, "distance_to_input": 0.7})


def test_within_noise_counts_only_the_worse_direction():
    keys = [("accuracy", ">="), ("realism", "<="), ("distance_to_input", "in")]
    runs = [dict(accuracy=0.90, realism=0.60, distance_to_input=0.70),
            dict(accuracy=0.92, realism=0.62, distance_to_input=0.72)]
    sigma = noise(runs, keys)
    assert sigma["accuracy"] == pytest.approx(0.02 / 2 ** 0.5)  # the sample standard deviation over the seeds
    ref = runs[0]
    assert worse_than(dict(accuracy=0.99, realism=0.50, distance_to_input=0.71), ref, keys, sigma) == []  # better
    assert worse_than(dict(accuracy=0.87, realism=0.70, distance_to_input=0.60), ref, keys, sigma) == [
        "accuracy", "realism", "distance_to_input"]  # 2.1, 7.1 and 7.1 standard deviations worse
    assert worse_than(dict(accuracy=0.875, realism=0.62, distance_to_input=0.80), ref, keys, sigma, k=2.0) == [
        "distance_to_input"]  # within 2 standard deviations on accuracy and realism; "in" counts both directions
    with pytest.raises(ValueError, match=">= 2 seeds"):
        noise(runs[:1], keys)


def test_sweep_on_the_shipped_super_resolution_model(monkeypatch):
    from crossflow.digits import eval as judge
    from crossflow.pipelines.base import default_checkpoint
    from crossflow.pipelines.image import ImagePipeline
    from crossflow.scheduler_sampler import make_sampler

    ckpt = default_checkpoint("digits-sr")
    pipe = ImagePipeline.from_pretrained(ckpt, sampler=make_sampler("euler", steps=2, guidance_scale=1.5))
    own = pipe.sampler
    # the candidates' full eval judges the mean of 2 samples (fast), against a bar 2 samples can meet
    sr = tuple((k, op, 15.0) if k == "psnr_posterior_mean_db" else (k, op, b) for k, op, b in judge.BARS["digits-sr"])
    monkeypatch.setitem(judge.BARS, "digits-sr", sr)
    res = sweep("digits-sr", pipe, ckpt, steps=(1, 2, 8), samplers=("euler", "midpoint"), reference=("midpoint", 8),
                baseline=("euler", 4), noise_seeds=2, posterior_samples=2)
    assert pipe.sampler is own  # the caller's pipeline keeps its sampler
    pts = {(p["sampler"], p["steps"]): p for p in res["points"]}
    # the grid, then the baseline's setting; the checkpoint's own (euler, 2) is on the grid
    assert set(pts) == {(m, n) for m in ("euler", "midpoint") for n in (1, 2, 8)} | {("euler", 4)}
    assert pts["midpoint", 8]["rmse_to_converged"] == 0.0  # the reference's own setting: same ODEs, same solver
    assert all(p["rmse_calls"] >= 1 for p in res["points"])
    for m in ("euler", "midpoint"):
        assert pts[m, 1]["rmse_to_converged"] > pts[m, 2]["rmse_to_converged"] > pts[m, 8]["rmse_to_converged"]
    assert pts["midpoint", 2]["rmse_to_converged"] < pts["euler", 2]["rmse_to_converged"]
    assert pts["midpoint", 2]["nfe"] == 4 and pts["euler", 8]["psnr_db"] > 10
    ref = res["reference"]
    assert (ref["sampler"], ref["steps"], ref["nfe"], ref["seeds"]) == ("midpoint", 8, 16, 2)
    assert set(ref["judged"]) == {"psnr_gain_db", "accuracy", "realism"}
    assert all(j["std"] > 0 for j in ref["judged"].values())  # two seeds, two different sets of samples
    assert pts["midpoint", 8]["within_noise"] and pts["midpoint", 8]["worse"] == []  # the reference's own setting
    assert not pts["midpoint", 1]["within_noise"]  # one midpoint step: far less realistic (issue 22's sweep)
    for p in res["points"]:
        assert p["within_noise"] == (worse_than(p, {k: j["value"] for k, j in ref["judged"].items()},
                                                judged("digits-sr", p), {k: j["std"] for k, j in ref["judged"].items()})
                                     == [])
    r = res["recommended"]
    assert r["baseline"]["nfe"] == 4 and res["baseline"] == {"sampler": "euler", "steps": 4}
    assert pts[r["sampler"], r["steps"]]["within_noise"] and pts[r["sampler"], r["steps"]]["passed"]
    assert not any(p["within_noise"] and p["passed"] and p["nfe"] < r["nfe"] and p.get("full_eval", {}).get("passed")
                   for p in res["points"])
    full = pts[r["sampler"], r["steps"]]["full_eval"]  # confirmed by the full eval: the posterior mean judged
    assert full["passed"] and full["psnr_posterior_mean_db"] > full["psnr_db"]
    per = res["per_sampler"]  # the same rule within each sampler
    assert set(per) == {"euler", "midpoint"} and all(q is None or q["sampler"] == name for name, q in per.items())
    assert r["nfe"] == min(q["nfe"] for q in per.values() if q is not None)
    json.dumps(res)  # one JSON
    with pytest.raises(ValueError, match="noise_seeds"):
        sweep("digits-sr", pipe, ckpt, noise_seeds=1)


def test_the_eval_verb_checks_its_lists_first(cli_fails):
    assert "twice" in cli_fails(["eval", "--sweep-steps", "2,2"], 2)
    assert "not one of" in cli_fails(["eval", "--sweep-steps", "2", "--sweep-samplers", "euler,ddim"], 2)
    assert "must be >= 1" in cli_fails(["eval", "--sweep-steps", "0,2"], 2)
    assert "comma-separated" in cli_fails(["eval", "--sweep-steps", ","], 2)
    assert "expected SAMPLER:STEPS" in cli_fails(["eval", "--sweep-steps", "2", "--sweep-baseline", "euler50"], 2)
    assert "expected an integer" in cli_fails(["eval", "--sweep-steps", "2", "--sweep-baseline", "euler:x"], 2)
    assert "must be >= 2" in cli_fails(["eval", "--sweep-steps", "2", "--sweep-noise-seeds", "1"], 2)


@pytest.mark.slow
def test_the_eval_verb_sweeps(tmp_path, capsys):
    from crossflow import cli
    from crossflow.pipelines.base import default_checkpoint

    out = tmp_path / "sweep.json"
    # the mean of 2 samples cannot meet the posterior-mean bar of 32 (19.53 dB): every candidate fails the full eval
    with pytest.raises(SystemExit) as exit:  # exit 1: nothing to recommend
        cli.main(["eval", "--preset", "digits-sr", "--sweep-steps", "1", "--sweep-samplers", "midpoint",
                  "--sweep-baseline", "euler:2", "--sweep-reference", "midpoint:8", "--sweep-noise-seeds", "2",
                  "--posterior-samples", "2", "--backend", "torch", "-q", "--json", str(out)])
    res = json.loads(out.read_text())
    own = json.loads((Path(default_checkpoint("digits-sr")) / "sampling.json").read_text())
    # the grid, the baseline's setting, then the checkpoint's own
    assert [(p["sampler"], p["steps"]) for p in res["points"]] == [("midpoint", 1), ("euler", 2),
                                                                    (own["method"], own["steps"])]
    assert res["reference"]["nfe"] == 16 and res["reference"]["seeds"] == 2 and res["posterior_samples"] == 2
    candidates = [p for p in res["points"] if p["within_noise"] and p["passed"]]
    assert candidates and all(not p["full_eval"]["passed"] and p["full_eval"]["psnr_posterior_mean_db"] < 19.53
                              for p in candidates)
    assert res["recommended"] is None and exit.value.code == 1
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("recommended: none: no setting")


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

    base = {**_p("euler", 4, 4, 0.02, within_noise=False), "worse": ["realism"]}
    fast = {**_p("midpoint", 1, 2, 0.01), "worse": []}
    data = {"preset": "digits-sr", "baseline": {"sampler": "euler", "steps": 4},
            "reference": {"sampler": "midpoint", "steps": 8, "nfe": 16, "seeds": 3, "noise_k": 2.0,
                          "judged": {"realism": {"better": "lower", "value": 0.65, "std": 0.01}}},
            "points": [{**base, "realism": 0.7}, {**fast, "realism": 0.66}], "recommended": recommend([base, fast], base)}
    src = tmp_path / "sweep_digits-sr.json"
    src.write_text(json.dumps(data))
    md = write_report([src], tmp_path / "out").read_text()
    assert "Recommended: **midpoint x 1 steps = 2 NFE** against the baseline euler x 4 = 4 NFE (not within noise)" in md
    assert "2.0x fewer evaluations" in md and "at 3 seeds" in md and "realism 0.65 +- 0.01, lower is better" in md
    assert "| midpoint | 1 | 2 | 0.01 | 0.66 | yes | - |" in md and "| euler | 4 | 4 | 0.02 | 0.7 | yes | realism |" in md
    assert (tmp_path / "out" / "sweep_digits-sr.png").stat().st_size > 1000
    data["per_sampler"] = {"euler": None, "midpoint": data["recommended"]}
    src.write_text(json.dumps(data))
    md = write_report([src], tmp_path / "out").read_text()
    assert "Per sampler: euler: none within noise; midpoint: 1 steps = 2 NFE, 2.0x." in md
    data["recommended"] = None
    src.write_text(json.dumps(data))
    assert "Recommended: none" in write_report([src], tmp_path / "out").read_text()


def test_the_eval_verb_defaults_are_the_sweeps():
    from crossflow.cli import build_parser
    from crossflow.digits import sweep as sw

    args = build_parser().parse_args(["eval", "--sweep-steps", "4"])
    assert args.sweep_baseline == sw.BASELINE and args.sweep_reference == sw.REFERENCE
    assert args.sweep_noise_seeds == sw.NOISE_SEEDS
    assert args.sweep_samplers == sw.DEFAULT_SAMPLERS
