"""Fused q/k/v projections for FP8 layers: one FP8Linear per attention stream, so each activation
is quantized once instead of three times.

diffusers' ``Attention.fuse_projections()`` does not serve here: it concatenates ``weight.data``
into a new ``nn.Linear`` of the weight's dtype, dropping the FP8 scales (an FP8 ``nn.Linear`` with
unscaled numbers), and SD3's ``JointAttnProcessor2_0`` never reads ``to_qkv``; diffusers'
``FusedJointAttnProcessor2_0`` does, but skips SD3.5's q/k RMS norms and requires a context stream
(the MMDiT-X blocks' second attention has none). So: a fused FP8Linear built from the three layers
(concatenated weights, per-channel scales) and a processor that is ``JointAttnProcessor2_0`` with
the projections read from it.

Paper figures (docs/gpu.md): activation quantization as written moves 41 bytes per element, and
separate q/k/v quantize the same input three times: 9 D-wide quantizations per block and stream
become 7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sd3fp8.fp8.linear import Backend, FP8Linear
from sd3fp8.fp8.numerics import Granularity

PROJECTIONS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def fuse_linears(layers: list[FP8Linear]) -> FP8Linear | None:
    """One FP8Linear computing ``cat([layer(x) for layer in layers], -1)`` for a shared input, or
    None when the layers cannot share one (different formats, backends, devices or scalings)."""
    first = layers[0]
    shared = ("in_features", "fmt", "backend", "activation", "fast_accum")
    if any(getattr(layer, a) != getattr(first, a) for layer in layers for a in shared):
        return None
    if len({layer.weight.device for layer in layers}) > 1 or len({layer.input_scale is None for layer in layers}) > 1:
        return None
    out_features = sum(layer.out_features for layer in layers)
    scales = [layer.weight_scale.expand(layer.out_features) if layer.weight_scale.dim() == 0 else layer.weight_scale for layer in layers]
    scale = torch.cat(scales)
    per_tensor = all(layer.weight_scale.dim() == 0 for layer in layers) and bool((scale == scale[0]).all())
    bias = None
    if any(layer.bias is not None for layer in layers):
        dtype = next(layer.bias.dtype for layer in layers if layer.bias is not None)
        bias = torch.cat([layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features, dtype=dtype, device=scale.device)
                          for layer in layers])
    fused = FP8Linear(first.in_features, out_features, bias=bias is not None, fmt=first.fmt,
                      granularity=Granularity.TENSOR if per_tensor else Granularity.CHANNEL, backend=first.backend,
                      activation=first.activation, device="meta", fast_accum=first.fast_accum)
    fused.weight = torch.cat([layer.weight for layer in layers])
    fused.weight_scale = scale[0].clone() if per_tensor else scale
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    if first.input_scale is not None:
        # q, k and v read the same tensor, so calibration gives them the same range; the largest
        # covers all three should they differ
        fused.set_input_scale(torch.stack([layer.input_scale for layer in layers if layer.input_scale is not None]).max())
    fused.clip_watch = first.clip_watch  # renamed by fuse_qkv
    fused.parts = [layer.out_features for layer in layers]
    return fused


def _projections(attn, x: torch.Tensor, fused_name: str):
    fused = getattr(attn, fused_name, None)
    if fused is not None:
        return torch.split(fused(x), fused.parts, dim=-1)
    return tuple(getattr(attn, name)(x) for name in PROJECTIONS[fused_name])


class FusedFP8JointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (0.32-0.42), reading q/k/v from ``to_qkv`` and the
    context's from ``to_added_qkv`` when the attention has them."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        def heads(t):
            return t.view(batch_size, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(t) for t in _projections(attn, hidden_states, "to_qkv"))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            c_query, c_key, c_value = (heads(t) for t in _projections(attn, encoder_hidden_states, "to_added_qkv"))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query, key, value = torch.cat([query, c_query], dim=2), torch.cat([key, c_key], dim=2), torch.cat([value, c_value], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * query.shape[-1])
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1]:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


def fuse_qkv(model: nn.Module, backends: tuple[Backend, ...] = (Backend.SCALED_MM, Backend.EMULATED)) -> list[str]:
    """Fuse the FP8 q/k/v (and context q/k/v) projections of every joint attention in ``model`` whose
    layers run one of ``backends`` (weight-only quantizes no activation: nothing to save there).
    Returns the names of the fused layers."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    fused_names = []
    for name, attn in model.named_modules():
        if not isinstance(attn, Attention) or not isinstance(attn.processor, (JointAttnProcessor2_0, FusedFP8JointAttnProcessor)):
            continue
        for fused_name, parts in PROJECTIONS.items():
            layers = [getattr(attn, p, None) for p in parts]
            if not all(isinstance(layer, FP8Linear) and layer.backend in backends for layer in layers):
                continue
            fused = fuse_linears([layer for layer in layers if isinstance(layer, FP8Linear)])
            if fused is None:
                continue
            for p in parts:
                delattr(attn, p)
            setattr(attn, fused_name, fused)
            if fused.clip_watch is not None:
                fused.clip_watch = (fused.clip_watch[0], f"{name}.{fused_name}")
            fused_names.append(f"{name}.{fused_name}")
        if any(getattr(attn, f, None) is not None for f in PROJECTIONS):
            attn.set_processor(FusedFP8JointAttnProcessor())  # type: ignore[arg-type]  # diffusers annotates one processor class; any works
    return fused_names
