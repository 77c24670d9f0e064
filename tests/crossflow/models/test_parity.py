"""Backend parity on the `tiny` preset: the same weights and inputs through `crossflow_kernels.use_backend("torch")` and
`crossflow_kernels.use_backend("triton")` (the Triton interpreter on CPU, compiled kernels on CUDA) must agree on the
outputs and on the gradient of every parameter.

Tolerance (fp32): atol 1e-4, rtol 1e-4. The two backends compute the same math in a different order (online softmax
in base 2 vs exp of full rows; one-pass fused residual + LayerNorm vs separate ops; blocked reductions in the
backward), so each op differs by a few fp32 ulps of its output (~1e-6 relative); these errors pass through two blocks,
the final projection and, for gradients, sums over the batch and up to 16 tokens x 64 channels, with values of
order 1-10. 1e-4 leaves ~10x headroom over that while still catching any real kernel bug (a wrong mask, scale or
gradient term shows up at 1e-2 or more).
"""

import pytest
import torch

import crossflow_kernels
from crossflow.config import CrossFlowConfig
from crossflow.models.model import FlowTransformer
from crossflow.models.text_ve import TextVE
from crossflow_kernels.testing import assert_close_to_ref

TINY = CrossFlowConfig.from_name("tiny")
ATOL = RTOL = 1e-4


def _run(module, backend, make_out, device):
    module.zero_grad(set_to_none=True)
    with crossflow_kernels.use_backend(backend):
        outs = make_out()
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device=device).view_as(o)).sum() for o in outs)
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}
    return [o.detach() for o in outs], grads


def _compare(module, make_out, device):
    ref_out, ref_grads = _run(module, "torch", make_out, device)
    out, grads = _run(module, "triton", make_out, device)
    for i, (o, r) in enumerate(zip(out, ref_out, strict=True)):
        assert_close_to_ref(o, r, name=f"output[{i}]", atol=ATOL, rtol=RTOL)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        assert ref_grads[n].abs().sum() > 0, f"{n}: zero gradient, the test would not see a bug"
        assert_close_to_ref(grads[n], ref_grads[n], name=f"grad {n}", atol=ATOL, rtol=RTOL)


def test_flow_transformer_torch_vs_triton(device, perturb):
    flow = perturb(FlowTransformer(TINY).to(device), std=0.2)  # adaLN-Zero / output layers non-zero: every grad is
    B = 2
    x = torch.randn(B, *TINY.latent_shape, device=device)
    t = torch.tensor([0.3, 0.8], device=device)
    ind = torch.tensor([0, 1], device=device)
    _compare(flow, lambda: [flow(x, t, ind)], device)


@pytest.mark.parametrize("variant", ["linear-head", "compressor-adaptor"])
def test_text_ve_torch_vs_triton(device, variant):
    cfg = TINY if variant == "linear-head" else TINY.replace(
        text_dim=48, ve_compress_dim=32, ve_adaptor=True, ve_adaptor_grid=8, text_scale=10.0)
    ve = TextVE(cfg).to(device).eval()  # eval: dropout off, so both runs see the same network
    B = 2
    emb = torch.randn(B, cfg.text_len, cfg.text_dim, device=device)
    mask = torch.ones(B, cfg.text_len, dtype=torch.bool, device=device)
    mask[0, 3:] = False  # ragged: one prompt of 3 tokens, one of 7
    _compare(ve, lambda: list(ve(emb, mask)), device)
