"""The seam: backend selection rules, errors, the op table, torch.compile with no graph break."""

import importlib

import pytest
import torch

import crossflow_kernels
from crossflow_kernels import _dispatch, adaln, euler

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"


def test_op_table_has_the_public_ops_with_twins():
    assert set(crossflow_kernels.OPS) == {"adaln_modulate", "gated_residual_adaln", "attention", "euler_step", "cfg_euler_step",
                                "rms_norm", "geglu"}
    for name, fn in crossflow_kernels.OPS.items():
        assert fn is getattr(crossflow_kernels, name)
        assert callable(fn.ref) and callable(fn.triton) and fn.ref is not fn.triton
        assert fn.ref.__name__.endswith("_ref") and fn.triton.__name__.endswith("_triton")


def test_env_and_context_manager(monkeypatch):
    monkeypatch.setenv("CROSSFLOW_KERNELS_BACKEND", "torch")
    assert crossflow_kernels.get_backend() == "torch"
    with crossflow_kernels.use_backend("triton"):
        assert crossflow_kernels.get_backend() == "triton"
        with crossflow_kernels.use_backend("auto"):
            assert crossflow_kernels.get_backend() == "auto"
        assert crossflow_kernels.get_backend() == "triton"
    assert crossflow_kernels.get_backend() == "torch"
    monkeypatch.setenv("CROSSFLOW_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown kernels backend 'cuda'"):
        crossflow_kernels.get_backend()
    with pytest.raises(ValueError, match="unknown kernels backend"):
        with crossflow_kernels.use_backend("fast"):
            pass


def test_context_manager_restores_on_error(monkeypatch):
    monkeypatch.delenv("CROSSFLOW_KERNELS_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="boom"):
        with crossflow_kernels.use_backend("torch"):
            raise RuntimeError("boom")
    assert crossflow_kernels.get_backend() == "auto"


def _spy(monkeypatch):
    """Replace the twins of euler_step with recorders; return the list of calls."""
    calls = []
    op = crossflow_kernels.euler_step
    monkeypatch.setattr(op, "ref", lambda *a, **k: calls.append("torch") or euler.euler_step_ref(*a, **k))
    monkeypatch.setattr(op, "triton", lambda *a, **k: calls.append("triton") or euler.euler_step_triton(*a, **k))
    return calls


def test_auto_uses_triton_where_it_can_run():
    # This machine (CPU + interpreter, or a GPU) can run the kernels on DEV tensors, so `auto` must pick Triton.
    assert crossflow_kernels.triton_ok(torch.empty(1, device=DEV))
    x = torch.randn(4, device=DEV)
    with crossflow_kernels.use_backend("auto"):
        out = crossflow_kernels.euler_step(x, x, 0.5)
    torch.testing.assert_close(out, 1.5 * x)


def test_dispatch_rules(monkeypatch):
    x = torch.randn(4, device=DEV)
    calls = _spy(monkeypatch)
    monkeypatch.setattr(_dispatch, "triton_ok", lambda t: False)
    with crossflow_kernels.use_backend("auto"):
        crossflow_kernels.euler_step(x, x, 0.1)  # cannot run Triton → the reference, by design of `auto`
    with crossflow_kernels.use_backend("torch"):
        crossflow_kernels.euler_step(x, x, 0.1)
    with crossflow_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        crossflow_kernels.euler_step(x, x, 0.1)  # forced Triton that cannot run: an error, never a silent fallback
    assert calls == ["torch", "torch"]
    monkeypatch.setattr(_dispatch, "triton_ok", lambda t: True)
    with crossflow_kernels.use_backend("auto"):
        crossflow_kernels.euler_step(x, x, 0.1)
    with crossflow_kernels.use_backend("torch"):
        crossflow_kernels.euler_step(x, x, 0.1)  # forced torch wins even where Triton could run
    assert calls == ["torch", "torch", "triton", "torch"]


@pytest.mark.skipif(ON_GPU, reason="CPU-only rule")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "_INTERPRET", False)
    assert not crossflow_kernels.triton_ok(torch.empty(1))
    with crossflow_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        crossflow_kernels.euler_step(torch.ones(2), torch.ones(2), 0.1)


def _op_args(op_name, dtype):
    """Small valid arguments for each public op, on DEV in `dtype`."""
    r = lambda *shape: torch.randn(*shape, device=DEV, dtype=dtype)  # noqa: E731
    return {
        "adaln_modulate": lambda: (r(2, 3, 7), r(2, 7), r(2, 7)),
        "gated_residual_adaln": lambda: (r(2, 3, 7), r(2, 3, 7), r(2, 7), r(2, 7), r(2, 7)),
        "attention": lambda: (r(1, 2, 7, 32), r(1, 2, 7, 32), r(1, 2, 7, 32)),
        "euler_step": lambda: (r(3, 5), r(3, 5), 0.1),
        "cfg_euler_step": lambda: (r(3, 5), r(3, 5), r(3, 5), 0.1, 3.0),
        "rms_norm": lambda: (r(2, 3, 7), r(2, 1, 7)),
        "geglu": lambda: (r(3, 10),),
    }[op_name]()


# Float dtypes the kernels cannot run here: float64 everywhere (reference-only), bfloat16 under the interpreter.
NO_TRITON_DTYPES = [torch.float64] + ([torch.bfloat16] if not ON_GPU else [])


@pytest.mark.parametrize("dtype", NO_TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("op_name", sorted(crossflow_kernels.OPS))
def test_auto_falls_back_to_torch_for_dtypes_triton_cannot_run(op_name, dtype):
    """`auto` = Triton where it can run, else torch: a float64 (or, interpreted, bfloat16) call gets the reference's
    result, while a forced `triton` raises a RuntimeError naming the dtype."""
    op = crossflow_kernels.OPS[op_name]
    args = _op_args(op_name, dtype)
    expect = op.ref(*args)
    with crossflow_kernels.use_backend("auto"):
        got = op(*args)
    for g, e in zip(got if isinstance(got, tuple) else (got,), expect if isinstance(expect, tuple) else (expect,)):
        assert g.dtype == dtype
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    with crossflow_kernels.use_backend("triton"), pytest.raises(RuntimeError, match=f"backend 'triton' cannot run.*{dtype}"):
        op(*args)
    assert not crossflow_kernels.triton_ok(args[0])


def test_non_float_input_is_a_value_error_on_every_backend():
    x = torch.ones(2, 3, 7, dtype=torch.int32, device=DEV)
    s = torch.ones(2, 7, dtype=torch.int32, device=DEV)
    for backend in crossflow_kernels.BACKENDS:
        with crossflow_kernels.use_backend(backend), pytest.raises(ValueError, match="floating"):
            crossflow_kernels.adaln_modulate(x, s, s)


@pytest.mark.parametrize("module, ref_name, op_name, make", [
    (euler, "euler_step_ref", "euler_step", lambda: (torch.randn(3, 5), torch.randn(3, 5), 0.1)),
    (adaln, "adaln_modulate_ref", "adaln_modulate", lambda: (torch.randn(2, 3, 7), torch.randn(2, 7),
                                                             torch.randn(2, 7))),
    (adaln, "gated_residual_adaln_ref", "gated_residual_adaln",
     lambda: (torch.randn(2, 3, 7), torch.randn(2, 3, 7), torch.randn(2, 7), torch.randn(2, 7), torch.randn(2, 7))),
    # `crossflow_kernels.attention` is the op, which shadows its module of the same name: fetch the module itself.
    (importlib.import_module("crossflow_kernels.attention"), "attention_ref", "attention",
     lambda: tuple(torch.randn(1, 2, 7, 32) for _ in range(3))),
])
def test_the_triton_kernels_themselves_ran(monkeypatch, module, ref_name, op_name, make):
    """On this machine `auto` and `triton` run the real Triton kernels: with the torch reference sabotaged, the op
    still returns the right answer, which only the kernel can have produced."""
    args = tuple(a.to(DEV) if isinstance(a, torch.Tensor) else a for a in make())
    expect = getattr(module, ref_name)(*args)

    def sabotaged(*a, **k):
        raise AssertionError("the torch reference was called")

    monkeypatch.setattr(getattr(crossflow_kernels, op_name), "ref", sabotaged)
    for backend in ("auto", "triton"):
        with crossflow_kernels.use_backend(backend):
            got = getattr(crossflow_kernels, op_name)(*args)
        for g, e in zip(got if isinstance(got, tuple) else (got,), expect if isinstance(expect, tuple) else (expect,)):
            torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)
    if not ON_GPU:
        assert crossflow_kernels.interpreting(), "CPU test runs must use the Triton interpreter (tests/conftest.py sets it)"


def test_compile_fullgraph_torch_backend():
    """With the torch backend, torch.compile(fullgraph=True) traces through the seam with no graph break."""
    x = torch.randn(2, 9, 64)
    shift, scale, gate = torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 64)
    q = torch.randn(2, 2, 9, 32)

    def f(x):
        r, h = crossflow_kernels.gated_residual_adaln(x, x, gate, shift, scale)
        h = crossflow_kernels.adaln_modulate(h, shift, scale, norm="rms")
        a = crossflow_kernels.attention(q, q, q)
        return crossflow_kernels.cfg_euler_step(r, h, x, 0.1, 3.0) + a.sum()

    with crossflow_kernels.use_backend("torch"):
        eager = f(x)
        compiled = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager)


_IMPORT_PROBE = """
import sys, torch, crossflow_kernels
from crossflow_kernels import _triton, _utils
names = ("adaln_modulate_fwd", "adaln_modulate_bwd", "gated_residual_adaln_fwd", "gated_residual_adaln_bwd",
         "attention_fwd", "attention_bwd", "euler_step_fwd", "cfg_euler_step_fwd", "rms_norm_fwd", "rms_norm_bwd",
         "geglu_fwd", "geglu_bwd")
before = [hasattr(torch.ops.crossflow_kernels, n) for n in names]
print("inductor", "torch._inductor" in sys.modules, "can_run", _utils.triton_can_run_here())
print("triton", "triton" in sys.modules, _triton.LOADED)
print("before", all(before), any(before))
q = torch.randn(1, 2, 7, 24)
print("ref", tuple(crossflow_kernels.attention(q, q, q).shape), crossflow_kernels.dispatch_counts())
try:
    _utils.register_triton_ops()
    print("after", all(hasattr(torch.ops.crossflow_kernels, n) for n in names))
except RuntimeError as e:
    print("after", "RuntimeError", e)
"""


@pytest.mark.parametrize("interpret,import_triton", [("0", "0"), ("1", "0"), ("0", "1")])
def test_triton_and_custom_ops_load_only_where_triton_can_run(interpret, import_triton):
    """Where Triton can run (interpreter or a CUDA build) triton is imported and every launcher is a custom op right
    after `import crossflow_kernels`. On a CPU-only build neither triton (~0.25 s) nor torch._inductor (~1 s) is
    imported, the references still run, and asking for the Triton path raises a RuntimeError that says why; with
    CROSSFLOW_KERNELS_IMPORT_TRITON=1 (the compile report's case) triton loads and `register_triton_ops()` registers
    them all."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": interpret, "CROSSFLOW_KERNELS_IMPORT_TRITON": import_triton}
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], env=env, capture_output=True, text=True, check=True)
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    can_run = lines["inductor"].endswith("can_run True")
    assert can_run == (interpret == "1" or torch.backends.cuda.is_built())
    loaded = can_run or import_triton == "1"
    assert lines["triton"] == f"{loaded} {loaded}"
    assert lines["before"] == ("True True" if can_run else "False False")
    assert lines["ref"].startswith("(1, 2, 7, 24)")
    if loaded:
        assert lines["after"] == "True"
    else:
        assert lines["after"].startswith("RuntimeError") and "TRITON_INTERPRET=1" in lines["after"], lines["after"]
    if not can_run:
        assert lines["inductor"].startswith("False"), "import crossflow_kernels pulled in torch._inductor on a CPU-only build"
