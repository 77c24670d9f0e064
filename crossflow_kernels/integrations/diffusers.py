"""Our kernels inside diffusers' DiT-family transformers, patched in one call.

    from crossflow_kernels.integrations import diffusers as ckd
    report = ckd.apply(pipe.transformer)   # DiTTransformer2DModel, PixArtTransformer2DModel, SD3..., Flux...
    print(report)                          # per layer type: what runs on our ops, what stays on torch and why
    ckd.remove(pipe.transformer)           # back to diffusers' own code

What `apply` changes, all in place and all undone by `remove`:
* attention: diffusers' public extension point, `Attention.set_processor` (what a model's `set_attn_processor` calls
  per module; `DiTTransformer2DModel` has no `set_attn_processor`), with our processors for self- and
  cross-attention (`AttnProcessor2_0`), joint attention (SD3's `JointAttnProcessor2_0`) and Flux's
  `FluxAttnProcessor`; the score/softmax/value product runs through `crossflow_kernels.attention` with `attn.scale`.
  A mask that is a pure key-padding mask (bool, or an additive bias of 0 and <= -1e4 such as PixArt's (B, 1, Tk)
  `encoder_attention_mask`) becomes our (B, Tk) key_padding_mask; any other mask (per query, per head, a real bias, a
  sample with every key masked) is handed to the processor we replaced, counted by reason
  (`Report.runtime_fallbacks()`). Checking a float mask's values costs one host sync per new mask tensor; under
  `torch.compile` that check would break the graph, so there a float mask goes to the replaced processor and a bool
  mask is taken as it is.
* norm modules: their class is swapped for a fused subclass (`FusedAdaLayerNormZero`, `...ZeroSingle`,
  `...Continuous`, `FusedRMSNorm`, `FusedTorchRMSNorm`) that adds no parameter or buffer, so `state_dict()`,
  `save_pretrained` and `from_pretrained` see the same names and shapes. Only the configurations our ops compute
  exactly are swapped (LayerNorm without affine, RMSNorm with a weight and no bias); any other is named in the report.
* blocks: a block's fixed forward is the only place where the gated residual meets the next norm, so for exactly the
  configurations below a subclass overrides `forward`, calling the block's own submodules (norm1, attn, ff, ...) and
  fusing `x + gate * attn` with the next LayerNorm + modulation through `crossflow_kernels.gated_residual_adaln`:
  `BasicTransformerBlock` of DiT (`ada_norm_zero`) and PixArt (`ada_norm_single`; there the cross-attention residual,
  gate 1), SD3's `JointTransformerBlock` without dual attention and Flux's `FluxTransformerBlock` (both streams). Any
  other use of those blocks (chunked feed-forward, GLIGEN, 4-d states) runs diffusers' own forward. Under autocast
  (fp32 weights, bf16/fp16 activations) a fused step whose inputs differ in dtype runs diffusers' torch math instead,
  and attention casts mixed q/k/v to the autocast dtype, as SDPA does.

Left on torch (named in the report): RoPE (Flux, applied in torch before our attention), the GELU MLPs, the patch and
timestep embeddings, the final `norm_out` modulation that DiT and PixArt write inline in the model's forward, the
residual of each block's MLP and of Flux's single-stream blocks (it feeds the next block's norm: a fusion across
blocks), SD3.5's dual-attention blocks and their `SD35AdaLayerNormZeroX` (one norm shared by two modulations; their
attention and QK norms are fused), weightless RMSNorms (left rather than multiplied by ones), and processors with
extra features (IP-adapter, fused QKV projections, custom or pre-SDPA processors).

Checked against diffusers 0.42.1 (`models/attention.py`, `attention_processor.py`, `normalization.py`,
`transformers/{dit_transformer_2d,pixart_transformer_2d,transformer_sd3,transformer_flux}.py`); its tests also pass
with 0.35.2, the oldest `setup.py` allows.
"""

from __future__ import annotations

import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

import crossflow_kernels as ck

try:
    from diffusers import __version__ as DIFFUSERS_VERSION
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import (
        AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle, RMSNorm, SD35AdaLayerNormZeroX,
    )
    from diffusers.models.transformers.transformer_flux import (
        FluxAttention, FluxAttnProcessor, FluxSingleTransformerBlock, FluxTransformerBlock,
    )
except ImportError as e:  # pragma: no cover - exercised only without diffusers (or with one that moved these)
    raise ImportError(f"crossflow_kernels.integrations.diffusers needs diffusers (checked with 0.35.2 and 0.42.1): "
                      f"{e}") from e

CHECKED_DIFFUSERS = ("0.35.2", "0.42.1")
# An additive mask entry at or below this drops its key (exp(-1e4) is 0 in fp32); 0 keeps it.
_MASKED = -1.0e4


def _plain_layer_norm(m) -> bool:
    """A LayerNorm without affine (what our adaLN ops normalise with)."""
    return isinstance(m, nn.LayerNorm) and m.weight is None and m.bias is None


def _same_dtype(*ts) -> bool:
    return len({t.dtype for t in ts}) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Fused norm modules: class-swapped subclasses, no new state
# ---------------------------------------------------------------------------------------------------------------------


class FusedAdaLayerNormZero(AdaLayerNormZero):
    """adaLN-Zero (DiT, SD3, Flux): the first shift/scale pair through `crossflow_kernels.adaln_modulate`."""

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        if self.emb is not None:
            emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
        if x.dim() != 3 or not _same_dtype(x, shift):
            x = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        else:
            x = ck.adaln_modulate(x, shift, scale, eps=self.norm.eps)
        return x, gate, shift_mlp, scale_mlp, gate_mlp


class FusedAdaLayerNormZeroSingle(AdaLayerNormZeroSingle):
    """Flux's single-block adaLN: `adaln_modulate`."""

    def forward(self, x, emb=None):
        shift, scale, gate = self.linear(self.silu(emb)).chunk(3, dim=1)
        if x.dim() != 3 or not _same_dtype(x, shift):
            return super().forward(x, emb)
        return ck.adaln_modulate(x, shift, scale, eps=self.norm.eps), gate


class FusedAdaLayerNormContinuous(AdaLayerNormContinuous):
    """The final / context-only adaLN of SD3 and Flux (scale first, then shift): `adaln_modulate`, LayerNorm or RMS."""

    def forward(self, x, conditioning_embedding):
        scale, shift = self.linear(self.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)
        if x.dim() != 3 or not _same_dtype(x, shift):
            return super().forward(x, conditioning_embedding)
        norm = "rms" if isinstance(self.norm, RMSNorm) else "layer"
        return ck.adaln_modulate(x, shift, scale, eps=self.norm.eps, norm=norm)


class FusedRMSNorm(RMSNorm):
    """diffusers' RMSNorm with a weight (SD3.5's QK norms): `crossflow_kernels.rms_norm`."""

    def forward(self, hidden_states):
        if not _same_dtype(hidden_states, self.weight):
            return super().forward(hidden_states)
        return ck.rms_norm(hidden_states, self.weight, self.eps)


class FusedTorchRMSNorm(nn.RMSNorm):
    """torch's RMSNorm with a weight (Flux's QK norms): `crossflow_kernels.rms_norm`; eps None = the dtype's eps."""

    def forward(self, x):
        if not _same_dtype(x, self.weight):
            return super().forward(x)
        return ck.rms_norm(x, self.weight, self.eps if self.eps is not None else torch.finfo(x.dtype).eps)


# ---------------------------------------------------------------------------------------------------------------------
# The DiT / PixArt block: gated residual + next adaLN in one op
# ---------------------------------------------------------------------------------------------------------------------


def _row(t: torch.Tensor) -> torch.Tensor:
    """A (B, C) modulation vector as (B, 1, C); (B, 1, C) as is."""
    return t if t.dim() == 3 else t[:, None]


def _residual_norm(x, a, gate, shift, scale, norm):
    """(x + gate * a, norm(that) * (1 + scale) + shift) in one op; in torch where dtypes differ (autocast)."""
    if _same_dtype(x, a, gate, shift, scale):
        return ck.gated_residual_adaln(x, a, gate, shift, scale, eps=norm.eps)
    x = x + _row(gate) * a
    return x, norm(x) * (1 + _row(scale)) + _row(shift)


def _gated_mlp(x, a, gate, shift, scale, gate_mlp, norm, ff):
    """The common block tail: the attention residual fused into the next adaLN, then the gated MLP residual."""
    x, h = _residual_norm(x, a, gate, shift, scale, norm)
    return x + _row(gate_mlp) * ff(h)


class FusedBasicTransformerBlock(BasicTransformerBlock):
    """DiT (`ada_norm_zero`) and PixArt (`ada_norm_single`) blocks with the residual after attention fused into the
    next norm + modulation (`gated_residual_adaln`); everything else is the block's own submodules."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        kw = dict(cross_attention_kwargs or {})
        if hidden_states.dim() != 3 or self._chunk_size is not None or "gligen" in kw or kw.get("scale") is not None:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        x = hidden_states
        if self.norm_type == "ada_norm_zero":  # DiT
            h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, timestep, class_labels, hidden_dtype=x.dtype)
            a = self.attn1(h, attention_mask=attention_mask, **kw)
            return _gated_mlp(x, a, gate_msa, shift_mlp, scale_mlp, gate_mlp, self.norm3, self.ff)
        # PixArt: six (B, 1, C) modulation rows from the block's table plus the shared timestep projection.
        mods = (self.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        if _same_dtype(x, shift_msa):
            h = ck.adaln_modulate(x, shift_msa, scale_msa, eps=self.norm1.eps)
        else:  # mixed dtypes (autocast): torch
            h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = gate_msa * self.attn1(h, attention_mask=attention_mask, **kw) + x
        a = self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kw)
        x, h = _residual_norm(x, a, torch.ones_like(gate_msa), shift_mlp, scale_mlp, self.norm2)
        return gate_mlp * self.ff(h) + x


class FusedJointTransformerBlock(JointTransformerBlock):
    """SD3's MMDiT block (single attention) with both streams' attention residual fused into their next adaLN."""

    def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        x, c = hidden_states, encoder_hidden_states
        if self.use_dual_attention or self._chunk_size is not None:
            return super().forward(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=temb)
        if self.context_pre_only:
            hc = self.norm1_context(c, temb)
        else:
            hc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, emb=temb)
        a, ac = self.attn(hidden_states=h, encoder_hidden_states=hc, **(joint_attention_kwargs or {}))
        x = _gated_mlp(x, a, gate_msa, shift_mlp, scale_mlp, gate_mlp, self.norm2, self.ff)
        if self.context_pre_only:
            return None, x
        return _gated_mlp(c, ac, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp, self.norm2_context,
                          self.ff_context), x


class FusedFluxTransformerBlock(FluxTransformerBlock):
    """Flux's double-stream block with both streams' attention residual fused into their next adaLN."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        x, c = hidden_states, encoder_hidden_states
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=temb)
        hc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, emb=temb)
        outs = self.attn(hidden_states=h, encoder_hidden_states=hc, image_rotary_emb=image_rotary_emb,
                         **(joint_attention_kwargs or {}))
        x = _gated_mlp(x, outs[0], gate_msa, shift_mlp, scale_mlp, gate_mlp, self.norm2, self.ff)
        if len(outs) == 3:  # an IP-adapter processor's extra output
            x = x + outs[2]
        c = _gated_mlp(c, outs[1], c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp, self.norm2_context,
                       self.ff_context)
        return (c.clip(-65504, 65504) if c.dtype == torch.float16 else c), x


def _two_stream_unfusable(b) -> str | None:
    if getattr(b, "use_dual_attention", False):
        return "SD3.5 dual-attention block (a second attention between the residuals): diffusers' forward"
    norms = [b.norm1.norm, b.norm2] + ([] if b.norm2_context is None else [b.norm2_context])
    if not isinstance(b.norm1, AdaLayerNormZero) or not all(_plain_layer_norm(n) for n in norms):
        return "its norms are not LayerNorms without affine under an adaLN-Zero"
    return None


def _block_unfusable(b: BasicTransformerBlock) -> str | None:
    """None when `FusedBasicTransformerBlock.forward` computes exactly what `b.forward` does, else why not."""
    if b.pos_embed is not None or hasattr(b, "fuser") or b.only_cross_attention:
        return "positional embedding, GLIGEN fuser or cross-attention-only block"
    if b.norm_type == "ada_norm_zero":
        if b.attn2 is not None:
            return "ada_norm_zero block with cross-attention"
        if not isinstance(b.norm1, AdaLayerNormZero) or not _plain_layer_norm(b.norm1.norm):
            return "norm1 is not an adaLN-Zero over a LayerNorm without affine"
        if not _plain_layer_norm(b.norm3):
            return "norm3 is a LayerNorm with affine"
        return None
    if b.norm_type == "ada_norm_single":
        if b.attn2 is None:
            return "ada_norm_single block without cross-attention"
        if not (_plain_layer_norm(b.norm1) and _plain_layer_norm(b.norm2)):
            return "norm1/norm2 are LayerNorms with affine"
        return None
    return f"norm_type {b.norm_type!r} (only ada_norm_zero and ada_norm_single are fused)"


# ---------------------------------------------------------------------------------------------------------------------
# Attention processors
# ---------------------------------------------------------------------------------------------------------------------

# One entry: the last float mask checked (weakly held), its version and the key_padding_mask or fallback reason it gave.
# PixArt passes the same mask tensor to every block, so its values are inspected once per forward.
_mask_memo: list = []


def key_padding_mask(mask: torch.Tensor, batch: int, keys: int) -> tuple[torch.Tensor | None, str | None]:
    """diffusers' attention mask -> (our bool (B, Tk) key_padding_mask, None), or (None, why it is not one).

    Accepted: bool (True = attend) or additive float masks of shape (B|1, Tk), (B|1, 1, Tk) or (B|1, 1, 1, Tk) whose
    entries are 0 (keep) or <= -1e4 (drop), with at least one key kept per sample."""
    m = mask
    while m.dim() > 2 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() != 2:
        return None, f"mask of shape {tuple(mask.shape)} is per query or per head, not a key-padding mask"
    if m.shape[-1] != keys or m.shape[0] not in (1, batch):
        return None, f"mask of shape {tuple(mask.shape)} does not match {batch} samples x {keys} keys"
    compiling = torch.compiler.is_compiling()
    if compiling:  # reading a mask's values would break the graph
        if m.dtype != torch.bool:
            return None, "float mask under torch.compile (its values cannot be checked without a graph break)"
        return m.expand(batch, keys), None  # a sample with no key: zeros here, where SDPA gives NaN
    if _mask_memo:
        ref, version, shape, out = _mask_memo[0]
        if ref() is mask and version == mask._version and shape == (batch, keys):
            return out
    if m.dtype == torch.bool:
        keep, why = m, None
    else:
        keep = m == 0
        why = None if bool((keep | (m <= _MASKED)).all()) else "additive mask holds a bias (values not 0 or <= -1e4)"
    if why is None and not bool(keep.any(-1).all()):
        why = "a sample has every key masked (SDPA averages all values there, ours returns zeros)"
    out = (None, why) if why else (keep.expand(batch, keys), None)
    _mask_memo[:] = [(weakref.ref(mask), mask._version, (batch, keys), out)]
    return out


class _Processor:
    """Base of our processors: keeps the one it replaced; a call we cannot take goes back to it, counted by reason."""

    def __init__(self, original):
        self.original = original
        self.fallbacks: Counter = Counter()

    def _fallback(self, why, *args, **kwargs):
        if not torch.compiler.is_compiling():  # counted in eager calls only
            self.fallbacks[why] += 1
        return self.original(*args, **kwargs)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D) view."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attend(q, k, v, scale=None, key_padding_mask=None):
    """`crossflow_kernels.attention`; under autocast, q/k/v of mixed dtypes (a QK norm with fp32 weights) are cast
    to the autocast dtype first, as SDPA's autocast rule does."""
    dev = q.device.type
    if not _same_dtype(q, k, v) and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return ck.attention(q, k, v, scale=scale, key_padding_mask=key_padding_mask)


def _merge(o: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    return o.transpose(1, 2).flatten(2)


class CrossflowAttnProcessor(_Processor):
    """Self- and cross-attention in place of `AttnProcessor2_0` (DiT, PixArt)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        call = (attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args)
        if args or kwargs or hidden_states.dim() != 3:
            return self._fallback("extra arguments or 4-d hidden states", *call, **kwargs)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = None
        if attention_mask is not None:
            mask, why = key_padding_mask(attention_mask, ctx.shape[0], ctx.shape[1])
            if why:
                return self._fallback(why, *call)
        q, k, v = (_heads(p(t), attn.heads) for p, t in ((attn.to_q, hidden_states), (attn.to_k, ctx),
                                                          (attn.to_v, ctx)))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        o = _attend(q, k, v, scale=attn.scale, key_padding_mask=mask)
        return attn.to_out[1](attn.to_out[0](_merge(o)))


class CrossflowJointAttnProcessor(_Processor):
    """SD3's joint attention (sample tokens, then context tokens) in place of `JointAttnProcessor2_0`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None or args or kwargs:
            return self._fallback("attention_mask or extra arguments (JointAttnProcessor2_0 has its own rules)",
                                  attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        n = hidden_states.shape[1]
        q, k, v = (_heads(p(hidden_states), attn.heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq, ck_, cv = (_heads(p(encoder_hidden_states), attn.heads)
                           for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq, ck_ = attn.norm_added_q(cq), attn.norm_added_k(ck_)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck_], 2), torch.cat([v, cv], 2)
        o = _merge(_attend(q, k, v, scale=attn.scale))
        out = attn.to_out[1](attn.to_out[0](o[:, :n]))
        if encoder_hidden_states is None:
            return out
        c = o[:, n:]
        return out, (c if attn.context_pre_only else attn.to_add_out(c))


class CrossflowFluxAttnProcessor(_Processor):
    """Flux's attention (context tokens, then sample tokens; RoPE in torch) in place of `FluxAttnProcessor`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        call = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            return self._fallback("attention_mask (left to FluxAttnProcessor's dispatcher)", *call)
        if getattr(attn, "fused_projections", False):
            return self._fallback("fused QKV projections", *call)
        split = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  (B, T, H, D), Flux's layout
        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            e = encoder_hidden_states
            cq, ck_, cv = split(attn.add_q_proj(e)), split(attn.add_k_proj(e)), split(attn.add_v_proj(e))
            cq, ck_ = attn.norm_added_q(cq), attn.norm_added_k(ck_)
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck_, k], 1), torch.cat([cv, v], 1)
        if image_rotary_emb is not None:  # RoPE stays in torch
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        o = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        o = _merge(o).to(q.dtype)
        if not joint:
            return o
        t = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](o[:, t:].contiguous())), attn.to_add_out(o[:, :t].contiguous())


def _attention_unfusable(m) -> tuple[type | None, str | None]:
    """(our processor class, None) for an attention module we can take, else (None, why not)."""
    p = m.processor
    if isinstance(m, FluxAttention):
        if type(p) is not FluxAttnProcessor:
            return None, f"processor {type(p).__name__} (IP-adapter or custom: extra features)"
        if not isinstance(m.norm_q, nn.RMSNorm):
            return None, "QK norms are not RMSNorm"
        return CrossflowFluxAttnProcessor, None
    if not isinstance(m, Attention):
        return None, f"attention module {type(m).__name__} is not one we patch"
    if type(p) not in (AttnProcessor2_0, JointAttnProcessor2_0):
        return None, f"processor {type(p).__name__} (IP-adapter, LoRA or custom: extra features)"
    if m.spatial_norm is not None or m.group_norm is not None or m.norm_cross is not None or m.residual_connection \
            or m.rescale_output_factor != 1.0:
        return None, "spatial/group/cross norm, residual connection or output rescale"
    head_dim = m.inner_dim // m.heads if hasattr(m, "inner_dim") else None
    if head_dim is None or abs(m.scale - head_dim ** -0.5) > 1e-12:
        return None, "attn.scale differs from SDPA's default that the processor uses"
    if m.norm_q is not None and not isinstance(m.norm_q, (RMSNorm, nn.LayerNorm)):
        return None, f"QK norm {type(m.norm_q).__name__}"
    if type(p) is JointAttnProcessor2_0:
        return CrossflowJointAttnProcessor, None
    return CrossflowAttnProcessor, None


# ---------------------------------------------------------------------------------------------------------------------
# apply / remove
# ---------------------------------------------------------------------------------------------------------------------

_FUSED = {
    AdaLayerNormZero: FusedAdaLayerNormZero,
    AdaLayerNormZeroSingle: FusedAdaLayerNormZeroSingle,
    AdaLayerNormContinuous: FusedAdaLayerNormContinuous,
    RMSNorm: FusedRMSNorm,
    nn.RMSNorm: FusedTorchRMSNorm,
    BasicTransformerBlock: FusedBasicTransformerBlock,
    JointTransformerBlock: FusedJointTransformerBlock,
    FluxTransformerBlock: FusedFluxTransformerBlock,
}
_BASE = {v: k for k, v in _FUSED.items()}
_PROCESSORS = (CrossflowAttnProcessor, CrossflowJointAttnProcessor, CrossflowFluxAttnProcessor)


def _norm_unfusable(m) -> str | None:
    if isinstance(m, (AdaLayerNormZero, AdaLayerNormZeroSingle)):
        return None if _plain_layer_norm(m.norm) else "its norm is not a LayerNorm without affine"
    if isinstance(m, AdaLayerNormContinuous):
        if _plain_layer_norm(m.norm) or (isinstance(m.norm, RMSNorm) and m.norm.weight is None):
            return None
        return "its norm has an affine weight (norm * weight * (1 + scale) is not our op)"
    if isinstance(m, (RMSNorm, nn.RMSNorm)):
        if m.weight is None:
            return "no weight (elementwise_affine=False): left to torch rather than multiplying by ones"
        return "has a bias" if getattr(m, "bias", None) is not None else None
    return None


@dataclass
class Report:
    """What `apply` did, per layer type: module names on our ops, and the ones left on torch with the reason."""

    model: str
    fused: dict = field(default_factory=lambda: defaultdict(list))  # layer type -> [module names]
    left: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))  # type -> reason -> [names]
    processors: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def add(self, layer: str, name: str, why: str | None = None) -> None:
        if why is None:
            self.fused[layer].append(name)
        else:
            self.left[layer][why].append(name)

    def as_dict(self) -> dict:
        """Counts per layer type (and reason), JSON-ready."""
        return {"model": self.model, "notes": list(self.notes),
                "fused": {k: len(v) for k, v in self.fused.items() if v},
                "left": {k: {why: len(n) for why, n in v.items()} for k, v in self.left.items()}}

    def runtime_fallbacks(self) -> dict[str, int]:
        """Calls our processors handed back to diffusers' since `apply`, by reason (masks we cannot take, ...)."""
        total: Counter = Counter()
        for p in self.processors:
            total.update(p.fallbacks)
        return dict(total)

    def __str__(self) -> str:
        lines = [f"crossflow_kernels on {self.model}:"] + [f"  note: {n}" for n in self.notes]
        for layer in sorted(set(self.fused) | set(self.left)):
            if self.fused.get(layer):
                lines.append(f"  {layer}: {len(self.fused[layer])} on crossflow_kernels")
            for why, names in self.left.get(layer, {}).items():
                lines.append(f"  {layer}: {len(names)} left on torch ({why})")
        return "\n".join(lines)


# Layer types no op of ours covers, with the reason (reported, never changed).
_TORCH_ONLY = {
    "FeedForward": "GELU MLP: two matmuls around a GELU, no fused op of ours",
    "FluxPosEmbed": "RoPE: applied in torch before our attention",
    "PatchEmbed": "patch embedding: a convolution",
}
_INLINE_TAIL = ("final norm_out modulation: written inline in the model's forward, left to torch")
_SINGLE_TAIL = ("gated residual: it feeds the next block's norm (a fusion across blocks); its adaLN and attention "
                "are fused")


def apply(model: nn.Module) -> Report:
    """Patch `model` (any diffusers transformer; DiT, PixArt, SD3 and Flux are the ones checked) in place to run on
    our ops; returns the `Report`. Raises RuntimeError if it is already patched (call `remove` first)."""
    if not isinstance(model, nn.Module):
        pipe = isinstance(getattr(model, "transformer", None), nn.Module)
        hint = " (a pipeline: pass pipe.transformer)" if pipe else ""
        raise ValueError(f"apply: expected a torch.nn.Module, got {type(model).__name__}{hint}")
    if any(type(m) in _BASE or isinstance(getattr(m, "processor", None), _PROCESSORS) for m in model.modules()):
        raise RuntimeError(f"apply: {type(model).__name__} is already patched; call remove(model) first")
    report = Report(type(model).__name__)
    if DIFFUSERS_VERSION not in CHECKED_DIFFUSERS:
        report.notes.append(f"diffusers {DIFFUSERS_VERSION} is not a version this was checked with "
                            f"({', '.join(CHECKED_DIFFUSERS)}): run tests/crossflow_kernels/"
                            "test_integrations_diffusers.py")
    for name, m in model.named_modules():
        kind = type(m).__name__
        if type(m) in _FUSED:
            why = (_block_unfusable(m) if isinstance(m, BasicTransformerBlock) else
                   _two_stream_unfusable(m) if isinstance(m, (JointTransformerBlock, FluxTransformerBlock)) else
                   _norm_unfusable(m))
            report.add(kind, name, why)
            if why is None:
                m.__class__ = _FUSED[type(m)]
        elif isinstance(m, SD35AdaLayerNormZeroX):
            report.add(kind, name, "one LayerNorm shared by two modulations: left to torch")
        elif isinstance(m, FluxSingleTransformerBlock):
            report.add(kind, name, _SINGLE_TAIL)
        elif kind in _TORCH_ONLY:
            report.add(kind, name, _TORCH_ONLY[kind])
        if isinstance(m, (Attention, FluxAttention)) and hasattr(m, "set_processor"):
            cls, why = _attention_unfusable(m)
            report.add(f"attention ({type(m.processor).__name__})", name, why)
            if cls is not None:
                p = cls(m.processor)
                m.set_processor(p)
                report.processors.append(p)
    if isinstance(getattr(model, "norm_out", None), nn.LayerNorm):  # DiT, PixArt
        report.add("norm_out", "norm_out", _INLINE_TAIL)
    return report


def remove(model: nn.Module) -> int:
    """Undo `apply`: original classes and processors back; returns how many modules were restored."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"remove: expected a torch.nn.Module, got {type(model).__name__}")
    n = 0
    for m in model.modules():
        if type(m) in _BASE:
            m.__class__ = _BASE[type(m)]
            n += 1
        p = getattr(m, "processor", None)
        if isinstance(p, _PROCESSORS):
            m.set_processor(p.original)
            n += 1
    return n
