"""Per-shape routing of `crossflow_kernels.attention` to PyTorch SDPA (crossflow_kernels/attention_routes.py) and the
table the GPU check derives (benchmarks/report.py). Every table here is a fake one in a temporary directory, for a fake
device name."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import crossflow_kernels
from benchmarks import report
from crossflow_kernels import attention_routes as ar
from crossflow_kernels.attention import attention_ref
from crossflow_kernels.testing import check_against_ref

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
FAKE = "Fake GPU 9000"
# SDPA backends that take every case below on this machine's tensors: the CPU has math and flash; on a GPU the fused
# ones are checked in test_fused_sdpa_backends_gpu, where a layout one of them rejects may fall back to ours.
RUNNABLE = ["sdpa_math"] if ON_GPU else ["sdpa_math", "sdpa_flash"]
F32, F16 = torch.float32, torch.float16


def _entry(d, tq, tk, bh, dtype, mask, mode, backend):
    key = ar.bucket(d, tq, tk, bh, str(dtype).removeprefix("torch."), mask, mode)
    return {**dict(zip(ar.KEY_FIELDS, key)), "backend": backend, "ours_ms": 2.0, "sdpa_ms": 1.0, "speedup": 2.0}


def _write(path, entries, device=FAKE, **extra):
    path.write_text(json.dumps({"schema": ar.SCHEMA, "device_name": device, "entries": entries, **extra}))
    return path


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """An empty table directory in force for a fake device; caches and counters cleared around the test."""
    monkeypatch.setattr(ar, "_device_name", lambda device: FAKE)
    monkeypatch.setenv(ar.ENV, str(tmp_path))
    ar.clear_cache()
    crossflow_kernels.reset_dispatch_counts()
    yield tmp_path
    ar.clear_cache()
    crossflow_kernels.reset_dispatch_counts()


def _table(table_dir, entries, **extra):
    return _write(table_dir / ar.table_file_name(FAKE), entries, **extra)


def _qkv(b=2, h=2, tq=7, tk=9, d=24, dtype=F32):
    return [torch.randn(b, h, t, d, device=DEV, dtype=dtype) for t in (tq, tk, tk)]


def _mask(b, tk, all_masked_row=True):
    m = torch.rand(b, tk, device=DEV) > 0.3
    m[0, 0] = True
    if all_masked_row:
        m[-1] = False  # a batch element with no key at all
    return m


def _no_triton(monkeypatch):
    """Make our kernels unusable, so a right answer proves the routed backend produced it."""
    def boom(*a, **k):
        raise AssertionError("our Triton attention ran")
    monkeypatch.setattr(crossflow_kernels.attention, "triton", boom)


def test_bucket_is_the_autotuner_power_of_two_ceiling():
    assert ar.bucket(72, 257, 77, 32, "bfloat16", True, "fwd") == (72, 512, 128, 32, "bfloat16", True, "fwd")
    assert ar.bucket(64, 256, 1, 33, "float16", False, "fwd_bwd")[1:4] == (256, 1, 64)
    with pytest.raises(ValueError, match="mode"):
        ar.bucket(64, 1, 1, 1, "float16", False, "bwd")


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("dtype, masked, scale", [(F32, True, None), (F32, False, 0.3), (F16, True, 0.7)],
                         ids=["f32-mask", "f32-scale", "f16-mask-scale"])
def test_routed_call_matches_the_reference_forward_and_gradients(table_dir, monkeypatch, backend, dtype, masked,
                                                                 scale):
    b, h, tq, tk, d = 2, 3, 7, 77, 24
    _table(table_dir, [_entry(d, tq, tk, b * h, dtype, masked, "fwd_bwd", backend)])
    _no_triton(monkeypatch)
    q, k, v = _qkv(b, h, tq, tk, d, dtype)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) memory seen as (B, H, T, D): non-contiguous
    mask = _mask(b, tk) if masked else None
    check_against_ref(lambda *a, **kw: crossflow_kernels.attention(*a, **kw), attention_ref, [q, k, v], names=("q", "k", "v"),
                      scale=scale, key_padding_mask=mask)
    assert crossflow_kernels.dispatch_counts() == {("attention", backend): 1}
    if masked:  # the batch element with no key: exact zeros and no gradient, as the reference
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = crossflow_kernels.attention(q, k, v, scale, mask)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        for t in (out[-1], *(g[-1] for g in grads)):
            assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_masked_keys_holding_nan_take_no_part_when_routed(table_dir, monkeypatch, backend):
    # SDPA's boolean mask only biases scores: without zeroing masked keys/values, 0 * NaN in P·V poisons the row.
    q, k, v = _qkv()
    mask = _mask(2, 9, all_masked_row=False)
    k[~mask[:, None, :, None].expand_as(k)] = float("nan")
    v[~mask[:, None, :, None].expand_as(v)] = float("inf")
    _table(table_dir, [_entry(24, 7, 9, 4, F32, True, "fwd", backend)])
    _no_triton(monkeypatch)
    out = crossflow_kernels.attention(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention_ref(q, k, v, key_padding_mask=mask), atol=1e-5, rtol=1e-5)
    assert crossflow_kernels.dispatch_counts() == {("attention", backend): 1}


def test_a_batch_element_with_no_key_gives_zeros_where_sdpa_gives_nan(table_dir, monkeypatch):
    # The CPU kernels return 0 on a row whose keys are all masked; CUDA's fused ones give NaN. Emulate those: the
    # routed call must never hand SDPA such a row.
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def nan_on_empty_rows(q, k, v, attn_mask=None, **kw):
        out = sdpa(q, k, v, attn_mask=attn_mask, **kw)
        if attn_mask is not None:
            out = torch.where(attn_mask.any(-1, keepdim=True), out, float("nan"))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", nan_on_empty_rows)
    _table(table_dir, [_entry(24, 7, 9, 4, F32, True, "fwd_bwd", "sdpa_math")])
    q, k, v = (t.requires_grad_() for t in _qkv())
    mask = _mask(2, 9)
    out = crossflow_kernels.attention(q, k, v, key_padding_mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert crossflow_kernels.dispatch_counts() == {("attention", "sdpa_math"): 1}
    for t in (out[-1], *(g[-1] for g in grads)):
        assert torch.equal(t, torch.zeros_like(t))
    torch.testing.assert_close(out, attention_ref(q, k, v, key_padding_mask=mask))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_fused_sdpa_backends_gpu(table_dir, backend, masked):
    # The real fused kernels, bf16, the DiT-XL head dim and a ragged text length; a batch element with no key where
    # masked (SDPA's fused kernels give NaN there). Where the backend rejects the call, ours runs and is counted.
    b, h, tq, tk, d = 2, 4, 257, 77, 72
    _table(table_dir, [_entry(d, tq, tk, b * h, torch.bfloat16, masked, "fwd_bwd", backend)])
    q, k, v = _qkv(b, h, tq, tk, d, torch.bfloat16)
    mask = _mask(b, tk) if masked else None
    check_against_ref(lambda *a, **kw: crossflow_kernels.attention(*a, **kw), attention_ref, [q, k, v], names=("q", "k", "v"),
                      key_padding_mask=mask)
    counts = crossflow_kernels.dispatch_counts()
    assert sum(counts.values()) == 1 and set(counts) <= {("attention", backend), ("attention", "triton")}
    print(f"{backend} {'masked' if masked else 'unmasked'}: ran {counts}")


def test_no_table_no_entry_or_ours_entry_runs_ours(table_dir):
    q, k, v = _qkv()
    expect = attention_ref(q, k, v)
    torch.testing.assert_close(crossflow_kernels.attention(q, k, v), expect)  # no table file for the device at all
    _table(table_dir, [_entry(32, 7, 9, 4, F32, False, "fwd", "sdpa_math"),  # another head dim
                       _entry(24, 7, 9, 4, F32, False, "fwd_bwd", "sdpa_math"),  # the grad mode only
                       _entry(24, 7, 9, 4, F32, True, "fwd", "sdpa_math")])  # masked calls only
    ar.clear_cache()
    torch.testing.assert_close(crossflow_kernels.attention(q, k, v), expect)
    _table(table_dir, [_entry(24, 7, 9, 4, F32, False, "fwd", "triton")])  # measured: ours wins
    ar.clear_cache()
    torch.testing.assert_close(crossflow_kernels.attention(q, k, v), expect)
    assert crossflow_kernels.dispatch_counts() == {("attention", "triton"): 3}


def test_table_for_another_device_is_not_used(table_dir, monkeypatch):
    q, k, v = _qkv()
    path = _write(table_dir / "explicit.json", [_entry(24, 7, 9, 4, F32, False, "fwd", "sdpa_math")],
                  device="Some Other GPU")
    monkeypatch.setenv(ar.ENV, str(path))
    crossflow_kernels.attention(q, k, v)
    assert crossflow_kernels.dispatch_counts() == {("attention", "triton"): 1}


def test_forced_backends_and_switches_never_route(table_dir, monkeypatch):
    q, k, v = _qkv()
    _table(table_dir, [_entry(24, 7, 9, 4, F32, False, "fwd", "sdpa_math")])
    with crossflow_kernels.use_backend("triton"):
        crossflow_kernels.attention(q, k, v)
    with crossflow_kernels.use_backend("torch"):
        crossflow_kernels.attention(q, k, v)
    with crossflow_kernels.use_routing(False):
        crossflow_kernels.attention(q, k, v)
    for off in ("off", "0"):
        monkeypatch.setenv(ar.ENV, off)
        crossflow_kernels.attention(q, k, v)
    assert crossflow_kernels.dispatch_counts() == {("attention", "triton"): 4, ("attention", "torch"): 1}
    monkeypatch.setenv(ar.ENV, str(table_dir))
    crossflow_kernels.attention(q, k, v)  # and with every switch back on, the table routes
    assert crossflow_kernels.dispatch_counts()[("attention", "sdpa_math")] == 1


def test_decision_is_cached_and_logged_once_naming_the_entry(table_dir, caplog):
    q, k, v = _qkv()
    path = _table(table_dir, [_entry(32, 7, 9, 4, F32, False, "fwd", "triton"),
                              _entry(24, 8, 16, 4, F32, False, "fwd", "sdpa_math")])
    with caplog.at_level(logging.DEBUG, logger="crossflow_kernels"):
        crossflow_kernels.attention(q, k, v)
        path.unlink()  # cached: neither the table nor the decision is read again
        crossflow_kernels.attention(q, k, v)
    lines = [r.getMessage() for r in caplog.records if "routing" in r.getMessage()]
    assert len(lines) == 1 and str(path) in lines[0] and "entry 1" in lines[0] and "sdpa_math" in lines[0]
    assert crossflow_kernels.dispatch_counts() == {("attention", "sdpa_math"): 2}
    ar.clear_cache()
    crossflow_kernels.attention(q, k, v)
    assert crossflow_kernels.dispatch_counts()[("attention", "triton")] == 1


@pytest.mark.skipif(ON_GPU, reason="the CPU has no efficient/cuDNN SDPA kernel to refuse the call")
def test_backend_that_cannot_run_the_call_falls_back_to_ours(table_dir):
    q, k, v = _qkv()
    _table(table_dir, [_entry(24, 7, 9, 4, F32, False, "fwd", "sdpa_efficient")])
    torch.testing.assert_close(crossflow_kernels.attention(q, k, v), attention_ref(q, k, v))
    assert crossflow_kernels.dispatch_counts() == {("attention", "triton"): 1}


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"schema": "other/1", "device_name": FAKE, "entries": []}), "schema 'other/1'"),
    (json.dumps({"schema": ar.SCHEMA, "entries": []}), "no device_name"),
    (json.dumps({"schema": ar.SCHEMA, "device_name": FAKE, "entries": [{"head_dim": 24}]}), "entry 0: KeyError"),
    (json.dumps({"schema": ar.SCHEMA, "device_name": FAKE,
                 "entries": [_entry(24, 7, 9, 4, F32, False, "fwd", "sdpa_fast")]}), "backend 'sdpa_fast'"),
    (json.dumps({"schema": ar.SCHEMA, "device_name": FAKE,
                 "entries": [{**_entry(24, 7, 9, 4, F32, False, "fwd", "sdpa_math"), "tq_bucket": 7}]}),
     "not a power of two"),
    (json.dumps({"schema": ar.SCHEMA, "device_name": FAKE,
                 "entries": [_entry(24, 7, 9, 4, F32, False, "fwd", "sdpa_math")] * 2}), "appears twice"),
    (json.dumps({"schema": ar.SCHEMA, "device_name": FAKE, "smoke": True, "entries": []}), "CPU smoke run"),
    # invalid UTF-8 (a Latin-1 byte in a device name): the documented RuntimeError, not a UnicodeDecodeError
    (b'{"schema": "crossflow-attention-routes/1", "device_name": "Fake GPU 9000\xe9", "entries": []}',
     "not UTF-8"),
])
def test_a_corrupt_table_is_an_error_naming_the_file(table_dir, text, match):
    path = table_dir / ar.table_file_name(FAKE)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=match) as e:
        crossflow_kernels.attention(q, k, v)
    assert str(path) in str(e.value) and f"{ar.ENV}=off" in str(e.value)
    with crossflow_kernels.use_backend("triton"):  # the forced backend never reads it
        crossflow_kernels.attention(q, k, v)


def test_an_explicit_table_file_that_is_missing_is_an_error(table_dir, monkeypatch):
    monkeypatch.setenv(ar.ENV, str(table_dir / "nope.json"))
    with pytest.raises(RuntimeError, match="no such file"):
        crossflow_kernels.attention(*_qkv())


def test_import_reads_no_table(tmp_path):
    # A corrupt table in force: import must still succeed (the table is read on the first routed call only).
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    env = {**os.environ, ar.ENV: str(bad), "PYTHONPATH": os.pathsep.join(sys.path)}
    probe = "import crossflow_kernels, crossflow_kernels.attention_routes as ar; print(len(ar._TABLES))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


@pytest.mark.skipif(ON_GPU, reason="CPU compile of the routed graph (aot_eager); the GPU compile test is elsewhere")
def test_routed_call_compiles_fullgraph(table_dir, caplog):
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in _qkv())
    mask = _mask(2, 9)
    _table(table_dir, [_entry(24, 7, 9, 4, F32, True, "fwd_bwd", "sdpa_math")])

    def fn(q, k, v):
        return crossflow_kernels.attention(q, k, v, key_padding_mask=mask).square().sum()

    with caplog.at_level(logging.DEBUG, logger="crossflow_kernels"):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)  # a graph break would raise
    expect = attention_ref(q, k, v, key_padding_mask=mask).square().sum()
    torch.testing.assert_close(compiled, expect)
    for g, e in zip(torch.autograd.grad(compiled, (q, k, v)), torch.autograd.grad(expect, (q, k, v))):
        torch.testing.assert_close(g, e)
    assert crossflow_kernels.dispatch_counts() == {}  # a trace is not a call; the route taken is logged
    assert [r.getMessage() for r in caplog.records if "to sdpa_math" in r.getMessage()]


@pytest.mark.skipif(ON_GPU, reason="CPU compile of the routed graph (aot_eager)")
def test_dynamic_shape_compile_retraces_per_bucket_not_per_size(table_dir):
    torch._dynamo.reset()
    _table(table_dir, [_entry(24, t, t, 4, F32, False, "fwd", "sdpa_math") for t in (16, 32)])
    traces = []

    def count_traces(gm, example_inputs):
        traces.append(gm)
        return gm.forward

    fn = torch.compile(lambda q: crossflow_kernels.attention(q, q, q) * 2, fullgraph=True, dynamic=True, backend=count_traces)
    for t in (9, 12, 17):  # buckets 16, 16, 32
        q = torch.randn(2, 2, t, 24)
        torch.testing.assert_close(fn(q), 2 * attention_ref(q, q, q))
    assert len(traces) == 2  # one per bucket, not one per size


# ---------------------------------------------------------------------------------------------------------------------
# The table from a GPU-check result (benchmarks/report.py)
# ---------------------------------------------------------------------------------------------------------------------


def _case(shape, mode, provider, ms, status="ok"):
    return dict(shape=list(shape), mode=mode, provider=provider, dtype="bfloat16", status=status, ms_p50=ms,
                model="m", batch=shape[0] // 2)


def _gpu_check(cases, smoke=False):
    return {"schema": report.GPU_CHECK_SCHEMA, "smoke": smoke, "started": "2030-01-01T00:00:00+00:00",
            "env": {"device_name": FAKE, "torch": "2.11", "triton": "3.6", "commit": "abc"},
            "stages": {"attention": {"status": "ok", "cases": cases}}}


def test_routing_table_from_a_gpu_check_result(table_dir, monkeypatch):
    s1, s2 = (16, 16, 1024, 72), (16, 20, 1024, 72)  # B·H 256 and 320: different buckets
    s3 = (2, 16, 1000, 72)  # same bucket as s4 (T 1000 and 1024, B·H 32)
    s4 = (2, 16, 1024, 72)
    cases = [
        _case(s1, "fwd", "triton", 1.0), _case(s1, "fwd", "sdpa_cudnn", 0.8), _case(s1, "fwd", "sdpa_flash", 0.9),
        _case(s1, "fwd_bwd", "triton", 1.0), _case(s1, "fwd_bwd", "sdpa_cudnn", 0.97),  # within the 5% margin
        _case(s2, "fwd", "triton", 1.0, status="error"), _case(s2, "fwd", "sdpa_cudnn", 0.5),
        # s3 + s4 summed: ours 2.0, cudnn 1.8 (ran on both), flash only on s3 (not a candidate)
        _case(s3, "fwd", "triton", 1.0), _case(s3, "fwd", "sdpa_cudnn", 0.6), _case(s3, "fwd", "sdpa_flash", 0.1),
        _case(s4, "fwd", "triton", 1.0), _case(s4, "fwd", "sdpa_cudnn", 1.2),
        _case(s4, "fwd", "sdpa_flash", None, status="unavailable"),
    ]
    table = report.routing_table(_gpu_check(cases), "r.json")
    got = {(e["bh_bucket"], e["mode"]): (e["backend"], e["ours_ms"], e["sdpa_ms"]) for e in table["entries"]}
    assert got == {(256, "fwd"): ("sdpa_cudnn", 1.0, 0.8), (256, "fwd_bwd"): ("triton", 1.0, 0.97),
                   (32, "fwd"): ("sdpa_cudnn", 2.0, 1.8)}
    assert [(s["bh_bucket"], s["mode"]) for s in table["skipped"]] == [(512, "fwd")]  # ours failed: no route
    assert table["device_name"] == FAKE and table["source"]["file"] == "r.json"
    assert all(e["tq_bucket"] == e["tk_bucket"] == 1024 and e["head_dim"] == 72 for e in table["entries"])

    # Written where the loader looks, then used: a bf16 call can't run here, so ask the decision directly.
    src = table_dir / "r.json"
    src.write_text(json.dumps(_gpu_check(cases)))
    report.main([str(src), "--routing-table", str(table_dir)])
    key = ar.bucket(72, 1000, 1000, 32, "bfloat16", False, "fwd")
    assert ar._decide(DEV, key) == "sdpa_cudnn"
    assert ar._decide(DEV, ar.bucket(72, 1024, 1024, 256, "bfloat16", False, "fwd_bwd")) is None


def test_saving_a_gpu_check_result_writes_its_routing_table(tmp_path):
    from benchmarks.gpu_session import gpu_check

    src = tmp_path / "gpu_check.json"
    src.write_text(json.dumps(_gpu_check([_case((2, 2, 32, 72), "fwd", "triton", 1.0),
                                          _case((2, 2, 32, 72), "fwd", "sdpa_flash", 0.5)])))
    (tmp_path / "routes").mkdir()
    saved = gpu_check.save_result(src, tmp_path / "results", tmp_path / "routes")
    table = json.loads((tmp_path / "routes" / ar.table_file_name(FAKE)).read_text())
    assert table["source"]["file"] == saved.name and [e["backend"] for e in table["entries"]] == ["sdpa_flash"]


def test_routing_table_cli_errors(tmp_path, capsys, monkeypatch):
    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps(_gpu_check([_case((2, 2, 32, 72), "fwd", "triton", 1.0)], smoke=True)))
    with pytest.raises(SystemExit) as e:  # a smoke run's table never goes to benchmarks/results/
        report.main([str(smoke), "--routing-table"])
    assert e.value.code == 2 and "smoke" in capsys.readouterr().err
    report.main([str(smoke), "--routing-table", str(tmp_path / "t.json")])  # elsewhere is fine (the CI smoke)
    assert json.loads((tmp_path / "t.json").read_text())["smoke"] is True
    with pytest.raises(SystemExit) as e:
        report.main([str(smoke), "--routing-table", str(tmp_path / "t.json"), "--margin", "0.5"])
    assert e.value.code == 2 and "margin" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "t.json"), "--routing-table", str(tmp_path)])  # not a GPU-check result
    assert e.value.code == 2 and "not a GPU-check result" in capsys.readouterr().err


def test_default_tables_are_package_data():
    # The default table directory lies inside the package and setup.py ships its JSON files: an installed package
    # (no checkout beside it) finds the committed tables; `--routing-table` writes there.
    import ast
    from pathlib import Path
    pkg = Path(crossflow_kernels.__file__).resolve().parent
    assert ar.DEFAULT_DIR == pkg / "routes" and ar.DEFAULT_DIR.is_dir()
    setup = (pkg.parent / "setup.py").read_text()
    call = next(n for n in ast.walk(ast.parse(setup))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    assert "routes/*.json" in package_data["crossflow_kernels"]
    assert ar._table_location(FAKE) == ar.DEFAULT_DIR / ar.table_file_name(FAKE) or os.environ.get(ar.ENV)


def test_routing_table_decides_on_the_models_layout():
    # The routed calls are the model's (fused qkv views): where that layout was measured it decides the bucket, even
    # against contiguous inputs' verdict; results without layouts keep deciding on what they have.
    s = (16, 16, 1024, 72)
    cases = [dict(_case(s, "fwd", prov, ms), layout=lay)
             for lay, prov, ms in (("bhtd", "triton", 1.0), ("bhtd", "sdpa_flash", 1.2), ("qkv", "triton", 2.0),
                                   ("qkv", "sdpa_flash", 1.2))]
    (entry,) = report.routing_table(_gpu_check(cases), "r.json")["entries"]
    assert (entry["layout"], entry["backend"], entry["ours_ms"]) == ("qkv", "sdpa_flash", 2.0)
    (entry,) = report.routing_table(_gpu_check(cases[:2]), "r.json")["entries"]
    assert (entry["layout"], entry["backend"]) == ("bhtd", "triton")
