"""Checkpoint key layouts of the SD3 MMDiT: the original (Stability / ComfyUI) single-file names and
diffusers' names, the mapping between them, and the architecture read from keys and shapes.

The mapping works name by name (so conversion can stream tensor by tensor) and describes each
tensor's change as a small transform that applies equally to a weight, its bias and a
per-output-channel scale: fused ``qkv`` splits into thirds along dim 0, and the final layer's
adaLN halves swap from (shift, scale) to diffusers' (scale, shift).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING

from sd3fp8.errors import ModelLoadError

if TYPE_CHECKING:  # torch is imported where tensors are handled: reading keys and shapes needs none
    import torch

MMDIT_PREFIX = "model.diffusion_model."
HEAD_DIM = 64  # every released SD3/SD3.5 MMDiT uses 64-wide heads (depth = hidden / 64)


@dataclasses.dataclass(frozen=True)
class Transform:
    """How an original tensor becomes a diffusers tensor: part ``index`` of ``parts`` along dim 0,
    and whether the two halves (shift, scale) swap. Row-aligned: weights, biases, per-channel scales."""

    parts: int = 1
    index: int = 0
    swap_halves: bool = False

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0:  # a per-tensor scale is shared by every part
            return tensor
        if self.parts > 1:
            tensor = tensor.chunk(self.parts, dim=0)[self.index]
        if self.swap_halves:
            import torch

            shift, scale = tensor.chunk(2, dim=0)
            tensor = torch.cat([scale, shift], dim=0)
        return tensor


IDENTITY = Transform()
_QKV = {"x_block.attn": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "context_block.attn": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "x_block.attn2": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
_BLOCK_MODULES = {
    "x_block.attn.proj": "attn.to_out.0",
    "context_block.attn.proj": "attn.to_add_out",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "x_block.attn2.ln_q": "attn2.norm_q",
    "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "context_block.adaLN_modulation.1": "norm1_context.linear",
}
_TOP_MODULES = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_BLOCK = re.compile(r"joint_blocks\.(\d+)\.(.+)")


def original_module_to_diffusers(module: str, num_layers: int) -> list[tuple[str, Transform]]:
    """Diffusers module name(s) and transforms for an original module name (prefix stripped).

    ``module`` is the name without its tensor suffix (``joint_blocks.3.x_block.attn.qkv``).
    Raises KeyError for names that are not part of the SD3 MMDiT.
    """
    if module in _TOP_MODULES:
        return [(_TOP_MODULES[module], Transform(swap_halves=module == "final_layer.adaLN_modulation.1"))]
    match = _BLOCK.fullmatch(module)
    if not match:
        raise KeyError(module)
    i, rest = int(match[1]), match[2]
    base = f"transformer_blocks.{i}."
    if rest.endswith(".qkv") and rest[: -len(".qkv")] in _QKV:
        targets = _QKV[rest[: -len(".qkv")]]
        return [(base + t, Transform(parts=3, index=k)) for k, t in enumerate(targets)]
    if rest in _BLOCK_MODULES:
        # The last block's context side is AdaLayerNormContinuous in diffusers: (scale, shift).
        swap = rest == "context_block.adaLN_modulation.1" and i == num_layers - 1
        return [(base + _BLOCK_MODULES[rest], Transform(swap_halves=swap))]
    raise KeyError(module)


def original_key_to_diffusers(key: str, num_layers: int) -> list[tuple[str, Transform]]:
    """Diffusers key(s) for one original MMDiT key (prefix stripped): ``...qkv.weight`` -> 3 keys."""
    if key == "pos_embed":
        return [("pos_embed.pos_embed", IDENTITY)]
    module, _, suffix = key.rpartition(".")
    return [(f"{name}.{suffix}", t) for name, t in original_module_to_diffusers(module, num_layers)]


def convert_original_state_dict(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Whole-dict form of the mapping (for small models and tests; streaming code maps key by key)."""
    out = {}
    for key, tensor in state.items():
        for name, transform in original_key_to_diffusers(key.removeprefix(MMDIT_PREFIX), num_layers):
            out[name] = transform.apply(tensor)
    return out


def original_module_names(num_layers: int) -> list[str]:
    """Every module name the original layout can use for a model of this depth."""
    names = list(_TOP_MODULES)
    for i in range(num_layers):
        names += [f"joint_blocks.{i}.{m}.qkv" for m in _QKV] + [f"joint_blocks.{i}.{m}" for m in _BLOCK_MODULES]
    return names


def diffusers_state_to_original(state: dict[str, torch.Tensor], num_layers: int, prefix: str = MMDIT_PREFIX) -> dict[str, torch.Tensor]:
    """The inverse mapping: a diffusers SD3Transformer2DModel state dict in the original layout
    (q, k, v fused back into ``qkv``; swapped adaLN halves swapped back)."""
    import torch

    out = {prefix + "pos_embed": state["pos_embed.pos_embed"]} if "pos_embed.pos_embed" in state else {}
    for module in original_module_names(num_layers):
        targets = original_module_to_diffusers(module, num_layers)
        for suffix in ("weight", "bias"):
            keys = [f"{name}.{suffix}" for name, _ in targets]
            if not all(k in state for k in keys):
                continue
            parts = []
            for key, (_, transform) in zip(keys, targets):
                tensor = state[key]
                if transform.swap_halves:
                    scale, shift = tensor.chunk(2, dim=0)
                    tensor = torch.cat([shift, scale], dim=0)
                parts.append(tensor)
            out[f"{prefix}{module}.{suffix}"] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


def strip_prefix(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """MMDiT keys without ``model.diffusion_model.`` (files hold them with or without it)."""
    if any(k.startswith(MMDIT_PREFIX) for k in shapes):
        return {k[len(MMDIT_PREFIX):]: v for k, v in shapes.items() if k.startswith(MMDIT_PREFIX)}
    return dict(shapes)


def mmdit_config(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> dict:
    """SD3Transformer2DModel config read from original-layout key shapes (prefix stripped).

    Width from the patch embedder, head width from the qk-norm weights (else 64), dual-attention
    layers from ``attn2`` keys, qk-norm from ``ln_q`` keys, pos-embed size from ``pos_embed``.
    """

    def need(key):
        if key not in shapes:
            raise ModelLoadError(f"{source}: missing tensor {key!r} of the SD3 MMDiT")
        return shapes[key]

    proj = need("x_embedder.proj.weight")  # [hidden, in_channels, patch, patch]
    hidden, in_channels, patch = proj[0], proj[1], proj[2]
    # qk-norm weights are one head wide; without them, SD3's 64-wide heads are the convention
    head_dim = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight", (HEAD_DIM,))[0]
    if hidden % head_dim:
        raise ModelLoadError(f"{source}: patch embedder width {hidden} is not a multiple of the head width {head_dim}")
    blocks = sorted({int(m[1]) for k in shapes if (m := re.match(r"joint_blocks\.(\d+)\.", k))})
    if not blocks:
        raise ModelLoadError(f"{source}: no joint_blocks.* tensors: not an SD3 MMDiT")
    num_layers = blocks[-1] + 1
    if blocks != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(blocks))
        raise ModelLoadError(f"{source}: joint_blocks {missing} missing (found {len(blocks)} of {num_layers})")
    pos = need("pos_embed")  # [1, max_size^2, hidden]
    max_size = math.isqrt(pos[1])
    if max_size * max_size != pos[1]:
        raise ModelLoadError(f"{source}: pos_embed length {pos[1]} is not a square")
    context = need("context_embedder.weight")  # [hidden, joint_attention_dim]
    pooled = need("y_embedder.mlp.0.weight")  # [hidden, pooled_dim]
    final = need("final_layer.linear.weight")  # [patch^2 * out_channels, hidden]
    return {
        "sample_size": 128,
        "patch_size": patch,
        "in_channels": in_channels,
        "num_layers": num_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": context[1],
        "caption_projection_dim": context[0],
        "pooled_projection_dim": pooled[1],
        "out_channels": final[0] // (patch * patch),
        "pos_embed_max_size": max_size,
        "dual_attention_layers": tuple(i for i in range(num_layers) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
        "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in shapes else None,
    }


def variant_name(config: dict) -> str:
    """SD3 Medium, SD3.5 Medium, SD3.5 Large (or Large Turbo: same shapes), else a generic name."""
    depth, pos, dual = config["num_layers"], config["pos_embed_max_size"], config["dual_attention_layers"]
    if depth == 24 and pos == 192 and not dual:
        return "SD3 Medium"
    if depth == 24 and pos == 384 and dual:
        return "SD3.5 Medium"
    if depth == 38 and not dual:
        return "SD3.5 Large / Large Turbo"
    return f"SD3-family MMDiT (depth {depth}{', MMDiT-X' if dual else ''})"
