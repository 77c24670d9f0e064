"""crossflow_kernels.integrations.diffusers: diffusers' DiT, PixArt (alpha, sigma), SD3 (with and without QK norm) and
Flux transformers, patched vs unpatched, on tiny random-init configurations built here (no hub access).

Policy (`crossflow_kernels.testing`): fp32 against the unpatched model in fp64 (the table, else 2x PyTorch's own fp32
error); fp16 against the unpatched model in fp32 within 2x the unpatched fp16 model's error plus a floor. Planted bugs
(`test_parity_catches_planted_bug`) show each check can fail.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crossflow_kernels as ck
from crossflow_kernels.testing import assert_close_to_ref

diffusers = pytest.importorskip("diffusers")
from crossflow_kernels.integrations import diffusers as ckd  # noqa: E402  (an import error here must fail, not skip)

ROOT = Path(__file__).resolve().parents[2]
ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"


# ---------------------------------------------------------------------------------------------------------------------
# Tiny models and inputs
# ---------------------------------------------------------------------------------------------------------------------


def _perturb(model, std=0.05):
    """Move every parameter off its init (adaLN-Zero starts at zero, which would hide a wrong modulation)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _dit():
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    return m, dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 500]),
                   class_labels=torch.tensor([1, 7]))


def _pixart(alpha: bool):
    # alpha: resolution / aspect-ratio conditions (PixArt-alpha 1024); sigma: none, interpolation scale 2.
    m = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=24, caption_channels=12, use_additional_conditions=alpha,
        interpolation_scale=None if alpha else 2)
    kw = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 12),
              encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), timestep=torch.tensor([3, 500]))
    kw["added_cond_kwargs"] = (dict(resolution=torch.tensor([[64.0, 64.0]] * 2), aspect_ratio=torch.tensor([[1.0]] * 2))
                               if alpha else dict(resolution=None, aspect_ratio=None))
    return m, kw


def _sd3(qk_norm, dual=()):
    m = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16, qk_norm=qk_norm, dual_attention_layers=dual)
    return m, dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 12),
                   pooled_projections=torch.randn(2, 12), timestep=torch.tensor([3.0, 500.0]))


def _flux():
    m = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=12, axes_dims_rope=(2, 2, 4))
    S, T = 16, 5
    yx = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2).float()
    return m, dict(hidden_states=torch.randn(2, S, 8), encoder_hidden_states=torch.randn(2, T, 12),
                   pooled_projections=torch.randn(2, 12), timestep=torch.tensor([0.3, 0.9]),
                   img_ids=torch.cat([torch.zeros(S, 1), yx], 1), txt_ids=torch.zeros(T, 3))


MODELS = {
    "dit": _dit,
    "pixart-alpha": lambda: _pixart(True),
    "pixart-sigma": lambda: _pixart(False),
    "sd3": lambda: _sd3(None),
    "sd3.5-qknorm": lambda: _sd3("rms_norm"),
    "sd3.5-dual": lambda: _sd3("rms_norm", dual=(0,)),  # SD3.5 medium's MMDiT-X block first, left on diffusers' forward
    "flux": _flux,
}
# What each must run on our ops (a patch that silently did nothing fails here).
EXPECTED_OPS = {
    "dit": {"adaln_modulate", "gated_residual_adaln", "attention"},
    "pixart-alpha": {"adaln_modulate", "gated_residual_adaln", "attention"},
    "pixart-sigma": {"adaln_modulate", "gated_residual_adaln", "attention"},
    "sd3": {"adaln_modulate", "gated_residual_adaln", "attention"},
    "sd3.5-qknorm": {"adaln_modulate", "gated_residual_adaln", "attention", "rms_norm"},
    "sd3.5-dual": {"adaln_modulate", "gated_residual_adaln", "attention", "rms_norm"},
    "flux": {"adaln_modulate", "gated_residual_adaln", "attention", "rms_norm"},
}


def _cast(kw, dtype=None, device=None):
    """Floating tensors of `kw` (nested dicts too) to `dtype`, every tensor to `device`."""
    def one(v):
        if isinstance(v, dict):
            return _cast(v, dtype, device)
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
    return {k: one(v) for k, v in kw.items()}


def _build(name, seed=0):
    """The tiny model (parameters off their init) and its inputs, on the test device."""
    torch.manual_seed(seed)
    m, kw = MODELS[name]()
    return _perturb(m).to(DEV), _cast(kw, device=DEV)


def _run(model, kw, dtype):
    return model.to(dtype)(**_cast(kw, dtype)).sample


def _check_forward(name, backend, dtype, setup=None):
    """Patched `dtype` forward on `backend` vs the unpatched model (fp64 oracle for fp32, fp32 for fp16)."""
    model, kw = _build(name)
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    ref_hi = _run(copy.deepcopy(model), kw, hi)
    ref_lp = _run(copy.deepcopy(model), kw, dtype)
    report = ckd.apply(model)
    if setup is not None:
        setup(model)
    ck.reset_dispatch_counts()
    with ck.use_backend(backend):
        out = _run(model, kw, dtype)
    ran = {op for (op, b), n in ck.dispatch_counts().items() if n and b == backend}
    assert EXPECTED_OPS[name] <= ran, f"{name}: expected {EXPECTED_OPS[name]} on {backend}, ran {ran}"
    assert report.runtime_fallbacks() == {}, report.runtime_fallbacks()
    assert_close_to_ref(out, ref_hi, ref_lp, name=f"{name} {backend} {dtype}")


# ---------------------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_torch_backend_fp32(name):
    _check_forward(name, "torch", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_triton(name, dtype):
    if not ck.interpreting() and not ON_GPU:
        pytest.skip("Triton cannot run here")
    _check_forward(name, "triton", dtype)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_under_autocast_bf16(name):
    # fp32 weights, bf16 autocast: the fused blocks take mixed dtypes piece by piece (torch where they differ).
    model, kw = _build(name)
    ref32 = _run(copy.deepcopy(model), kw, torch.float32)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        ref_lp = copy.deepcopy(model)(**kw).sample
    ckd.apply(model)
    with torch.autocast(DEV, dtype=torch.bfloat16), ck.use_backend("torch"):
        out = model(**kw).sample
    assert_close_to_ref(out, ref32, ref_lp, name=f"{name} autocast bf16")


def _grads(model, kw, dtype):
    model = model.to(dtype)
    kw = _cast(kw, dtype)
    x = kw["hidden_states"].clone().requires_grad_(True)
    out = model(**{**kw, "hidden_states": x}).sample
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    out.backward(g)
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()], ["out", "dx"] + [
        n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["dit", "pixart-sigma"])
def test_backward_fp32(name, backend):
    if backend == "triton" and not ck.interpreting() and not ON_GPU:
        pytest.skip("Triton cannot run here")
    model, kw = _build(name)
    model.train()  # dropout is 0 in these configs; train mode is what a fine-tune runs
    ref_hi, names = _grads(copy.deepcopy(model), kw, torch.float64)
    ref_lp, _ = _grads(copy.deepcopy(model), kw, torch.float32)
    ckd.apply(model)
    with ck.use_backend(backend):
        got, _ = _grads(model, kw, torch.float32)
    for n, o, r, rl in zip(names, got, ref_hi, ref_lp):
        if r is None:  # parameters outside the graph (e.g. DiT's unused label-dropout row) have no grad in either
            assert o is None, n
            continue
        assert_close_to_ref(o, r, rl, name=f"{name} {backend} {n}")


# ---------------------------------------------------------------------------------------------------------------------
# Planted bugs: each parity check above fails when the processor or a fused norm is wrong
# ---------------------------------------------------------------------------------------------------------------------


def _plant(monkeypatch, bug):
    if bug == "processor-scale":  # attention with a 2 % wrong softmax scale
        real = ckd.ck.attention
        monkeypatch.setattr(ckd.ck, "attention", lambda q, k, v, scale=None, **kw: real(
            q, k, v, scale=(scale or q.shape[-1] ** -0.5) * 1.02, **kw))
    elif bug == "processor-mask":  # the key-padding mask ignored
        real = ckd.ck.attention
        monkeypatch.setattr(ckd.ck, "attention", lambda q, k, v, scale=None, key_padding_mask=None: real(
            q, k, v, scale=scale))
    elif bug == "norm-shift-scale":  # a fused adaLN that swaps shift and scale
        real = ckd.ck.adaln_modulate
        monkeypatch.setattr(ckd.ck, "adaln_modulate", lambda x, shift, scale, **kw: real(x, scale, shift, **kw))
    elif bug == "norm-gate":  # the fused residual drops its gate
        real = ckd.ck.gated_residual_adaln
        monkeypatch.setattr(ckd.ck, "gated_residual_adaln", lambda x, y, gate, shift, scale, **kw: real(
            x, y, torch.ones_like(gate), shift, scale, **kw))
    elif bug == "rms-weight":  # QK RMSNorm without its weight
        real = ckd.ck.rms_norm
        monkeypatch.setattr(ckd.ck, "rms_norm", lambda x, w, eps: real(x, torch.ones_like(w), eps))


@pytest.mark.parametrize("name, bug", [
    ("dit", "processor-scale"), ("pixart-sigma", "processor-mask"), ("dit", "norm-shift-scale"),
    ("dit", "norm-gate"), ("sd3", "norm-shift-scale"), ("sd3", "norm-gate"), ("flux", "norm-gate"),
    ("flux", "rms-weight"), ("sd3.5-qknorm", "rms-weight"),
])
def test_parity_catches_planted_bug(monkeypatch, name, bug):
    _plant(monkeypatch, bug)
    with pytest.raises(AssertionError, match=r"max \|err\|"):  # the parity check's own message
        _check_forward(name, "torch", torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# State dict, save/load, remove, report
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_and_remove(name, tmp_path):
    model, kw = _build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    ref = _run(model, kw, torch.float32)
    ckd.apply(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).to(DEV).eval()  # an unpatched model from the patched one's files
    with ck.use_backend("torch"):
        assert torch.equal(_run(loaded, kw, torch.float32), ref)
    assert ckd.remove(model) > 0
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == procs
    assert torch.equal(_run(model, kw, torch.float32), ref)


def test_report_names_fused_and_left():
    model, _ = _build("flux")
    text = str(ckd.apply(model))
    assert "attention (FluxAttnProcessor): 2 on crossflow_kernels" in text
    assert "FluxPosEmbed: 1 left on torch (RoPE" in text
    model, _ = _build("dit")
    report = ckd.apply(model)
    assert len(report.fused["BasicTransformerBlock"]) == 2 and len(report.fused["AdaLayerNormZero"]) == 2
    assert "norm_out" in report.left
    d = report.as_dict()
    assert d["fused"]["BasicTransformerBlock"] == 2 and "norm_out" in d["left"]
    assert d["model"] == "DiTTransformer2DModel"
    model, _ = _build("sd3.5-dual")
    report = ckd.apply(model)
    assert len(report.fused["JointTransformerBlock"]) == 1 and "SD35AdaLayerNormZeroX" in report.left


def test_report_notes_an_unchecked_diffusers_version(monkeypatch):
    monkeypatch.setattr(ckd, "DIFFUSERS_VERSION", "9.9.9")
    model, _ = _build("dit")
    assert "diffusers 9.9.9 is not a version this was checked with" in str(ckd.apply(model))


def test_apply_twice_and_bad_input_raise():
    model, _ = _build("dit")
    ckd.apply(model)
    with pytest.raises(RuntimeError, match="already patched"):
        ckd.apply(model)
    with pytest.raises(ValueError, match="torch.nn.Module"):
        ckd.apply("not a model")
    with pytest.raises(ValueError, match="torch.nn.Module"):
        ckd.remove(None)
    pipe = diffusers.DiTPipeline(transformer=_build("dit")[0], vae=_tiny_vae(), scheduler=diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="pass pipe.transformer"):
        ckd.apply(pipe)


def test_unsupported_processor_is_left_and_named():
    from diffusers.models.attention_processor import AttnProcessor

    model, kw = _build("pixart-sigma")
    model.transformer_blocks[0].attn2.set_processor(AttnProcessor())  # the pre-SDPA processor: not ours to replace
    ref = _run(copy.deepcopy(model), kw, torch.float32)
    report = ckd.apply(model)
    assert report.left["attention (AttnProcessor)"]  # named, with its reason
    assert type(model.transformer_blocks[0].attn2.processor) is AttnProcessor
    with ck.use_backend("torch"):
        torch.testing.assert_close(_run(model, kw, torch.float32), ref)


def test_per_query_mask_falls_back_to_the_original_processor():
    model, kw = _build("dit")
    blk = model.transformer_blocks[0]
    x = torch.randn(2, 16, 16, device=DEV)
    mask = torch.zeros(2, 16, 16, device=DEV)
    mask[:, :, 3] = -1e4
    mask[0, 5, 7] = -2.5  # a per-query bias: not a key-padding mask
    ref = blk.attn1(x, attention_mask=mask)
    report = ckd.apply(model)
    with ck.use_backend("torch"):
        out = blk.attn1(x, attention_mask=mask)
    torch.testing.assert_close(out, ref)
    assert list(report.runtime_fallbacks().values()) == [1]


def test_key_padding_mask_conversion():
    kpm = ckd.key_padding_mask
    add = torch.tensor([[0.0, 0.0, -10000.0], [0.0, -float("inf"), 0.0]])[:, None]  # PixArt's (B, 1, Tk) bias
    m, why = kpm(add, 2, 3)
    assert why is None and m.tolist() == [[True, True, False], [True, False, True]]
    m, why = kpm(torch.tensor([[True, False, True]]), 2, 3)  # batch 1 broadcast
    assert why is None and m.shape == (2, 3)
    assert "bias" in kpm(torch.tensor([[0.0, -3.0, 0.0]] * 2), 2, 3)[1]
    assert "every key masked" in kpm(torch.tensor([[-1e4] * 3, [0.0] * 3]), 2, 3)[1]
    assert "per query" in kpm(torch.zeros(2, 4, 3), 2, 3)[1]
    assert "does not match" in kpm(torch.zeros(2, 4), 2, 3)[1]


# ---------------------------------------------------------------------------------------------------------------------
# Pipelines from tiny random components
# ---------------------------------------------------------------------------------------------------------------------


def _tiny_vae():
    torch.manual_seed(3)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                                   latent_channels=4, norm_num_groups=8, sample_size=8).to(DEV).eval()


def _images(pipe, **kw):
    return torch.from_numpy(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                                 output_type="np", **kw).images)


@pytest.mark.parametrize("kind", ["dit", "pixart-sigma"])
def test_pipeline_same_images(kind):
    model, _ = _build(kind)
    if kind == "dit":
        pipe = diffusers.DiTPipeline(transformer=model, vae=_tiny_vae(), scheduler=diffusers.DDIMScheduler())
        kw = dict(class_labels=[1, 7])
    else:
        pipe = diffusers.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae(), transformer=model,
                                             scheduler=diffusers.DPMSolverMultistepScheduler())
        g = torch.Generator().manual_seed(4)
        kw = _cast(dict(prompt_embeds=torch.randn(1, 5, 12, generator=g),
                        prompt_attention_mask=torch.tensor([[1, 1, 1, 0, 0]]),
                        negative_prompt_embeds=torch.randn(1, 5, 12, generator=g),
                        negative_prompt_attention_mask=torch.tensor([[1, 1, 0, 0, 0]])), device=DEV)
        kw.update(negative_prompt=None, height=8, width=8, use_resolution_binning=False)
    pipe.set_progress_bar_config(disable=True)
    ref = _images(pipe, **kw)
    ckd.apply(pipe.transformer)
    with ck.use_backend("torch"):
        out = _images(pipe, **kw)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)  # images in [0, 1]
    if ck.interpreting() or ON_GPU:
        with ck.use_backend("triton"):
            out = _images(pipe, **kw)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Import isolation and torch.compile
# ---------------------------------------------------------------------------------------------------------------------


def test_import_crossflow_kernels_does_not_import_diffusers():
    code = ("import sys, crossflow_kernels, crossflow_kernels.integrations; "
            "bad = [m for m in ('diffusers', 'crossflow_kernels.integrations.diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# PixArt's float caption mask cannot be checked inside a graph: its cross-attention falls back, with no graph break.
@pytest.mark.parametrize("name", ["dit", "pixart-sigma"])
def test_compile_fullgraph_torch_backend(name):
    model, kw = _build(name)
    ckd.apply(model)
    torch._dynamo.reset()
    with ck.use_backend("torch"):
        ref = model(**kw).sample
        compiled = torch.compile(model, fullgraph=True, backend="eager")  # dynamo's trace: a graph break raises
        torch.testing.assert_close(compiled(**kw).sample, ref)


@pytest.mark.gpu
def test_compile_fullgraph_dit_triton_gpu():
    model, kw = _build("dit")
    ref = model(**kw).sample
    ckd.apply(model)
    torch._dynamo.reset()
    with ck.use_backend("triton"):
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(**kw).sample, ref, atol=1e-4, rtol=1e-4)
