"""SD3's other components from single files: CLIP-L, CLIP-G, T5-XXL and the VAE.

Files carry weights but no configs, so each config is read from the tensors' shapes (width,
depth, vocabulary, feed-forward size) plus the few facts shapes cannot tell, which are fixed for
SD3 (64-wide attention heads, CLIP-L's quick-GELU, the VAE's 32 norm groups and latent
scale/shift). Models are built with empty parameters and given the file's (read one at a time)
tensors; FP8 tensors follow the same rules as the MMDiT (see ``singlefile.materialize``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from sd3fp8.errors import ModelLoadError
from sd3fp8.fp8.numerics import all_finite
from sd3fp8.io.checkpoint import LazyTensors
from sd3fp8.io.comfyquant import quant_layers
from sd3fp8.io.singlefile import FP8Scheme, gather_folder, gather_tensors, materialize, same_name

HEAD_DIM = 64  # CLIP-L (768 = 12 x 64), CLIP-G (1280 = 20 x 64)
VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR = 1.5305, 0.0609  # SD3's latent normalisation (not in the weights)
VAE_NORM_GROUPS = 32
LDM_VAE_MARKER = "encoder.down.0.block.0.conv1.weight"
DIFFUSERS_VAE_MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"


@dataclasses.dataclass(frozen=True)
class FileSource:
    """One component inside one file: ``prefix`` is "" for a standalone file."""

    path: Path
    prefix: str = ""

    def __str__(self) -> str:
        return f"{self.path}" + (f" [{self.prefix}*]" if self.prefix else "")


def _shapes(files: LazyTensors, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v.shape for k, v in files.header.tensors.items() if k.startswith(prefix)}


def _depth(shapes, pattern: str) -> int:
    found = {int(m[1]) for k in shapes if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _need(shapes, key: str, source) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelLoadError(f"{source}: missing tensor {key!r}")
    return shapes[key]


def clip_config(shapes: dict, kind: str, eos_token_id: int, source) -> dict:
    """CLIPTextConfig fields from a CLIP text encoder's shapes. ``kind`` is clip-l or clip-g."""
    vocab, width = _need(shapes, "text_model.embeddings.token_embedding.weight", source)
    if width % HEAD_DIM:
        raise ModelLoadError(f"{source}: CLIP width {width} is not a multiple of {HEAD_DIM}")
    return {
        "vocab_size": vocab, "hidden_size": width, "num_hidden_layers": _depth(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
        "intermediate_size": _need(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", source)[0],
        "num_attention_heads": width // HEAD_DIM,
        "max_position_embeddings": _need(shapes, "text_model.embeddings.position_embedding.weight", source)[0],
        "projection_dim": shapes.get("text_projection.weight", (width,))[0],
        "hidden_act": "quick_gelu" if kind == "clip-l" else "gelu",  # OpenAI CLIP-L vs OpenCLIP bigG
        "eos_token_id": eos_token_id, "pad_token_id": eos_token_id, "bos_token_id": eos_token_id - 1,
    }


def t5_config(shapes: dict, source) -> dict:
    """T5Config fields of a T5 v1.1 encoder (gated-GELU feed-forward) from its shapes."""
    vocab, d_model = _need(shapes, "shared.weight", source)
    buckets, heads = _need(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", source)
    inner = _need(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", source)[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = _need(shapes, "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight", source)[0]
    return {
        "vocab_size": vocab, "d_model": d_model, "d_kv": inner // heads, "d_ff": d_ff, "num_heads": heads,
        "num_layers": _depth(shapes, r"encoder\.block\.(\d+)\."), "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu" if gated else "relu", "is_encoder_decoder": False,
        "pad_token_id": 0, "eos_token_id": 1,
    }


_VAE_NAMES = {  # layout -> (down-level pattern, first resnet conv of level i, resnet-in-level-0 pattern)
    "ldm": (r"encoder\.down\.(\d+)\.", "encoder.down.{}.block.0.conv1.weight", r"encoder\.down\.0\.block\.(\d+)\."),
    "diffusers": (r"encoder\.down_blocks\.(\d+)\.", "encoder.down_blocks.{}.resnets.0.conv1.weight",
                  r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
}


def vae_layout(shapes: dict) -> str:
    return "diffusers" if DIFFUSERS_VAE_MARKER in shapes else "ldm"


def vae_config(shapes: dict, source) -> dict:
    """AutoencoderKL config of a VAE in the LDM or diffusers layout (SD3's 16-channel 8x VAE or smaller)."""
    levels_pattern, conv1, blocks_pattern = _VAE_NAMES[vae_layout(shapes)]
    levels = _depth(shapes, levels_pattern)
    if not levels:
        raise ModelLoadError(f"{source}: no encoder down blocks: not a VAE")
    channels = [_need(shapes, conv1.format(i), source)[0] for i in range(levels)]
    return {
        "in_channels": _need(shapes, "encoder.conv_in.weight", source)[1],
        "out_channels": _need(shapes, "decoder.conv_out.weight", source)[0],
        "latent_channels": _need(shapes, "decoder.conv_in.weight", source)[1],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels, "layers_per_block": _depth(shapes, blocks_pattern),
        "norm_num_groups": VAE_NORM_GROUPS, "scaling_factor": VAE_SCALING_FACTOR, "shift_factor": VAE_SHIFT_FACTOR,
        "use_quant_conv": "quant_conv.weight" in shapes, "use_post_quant_conv": "post_quant_conv.weight" in shapes,
    }


def _empty(cls, config):
    """A model whose parameters are on meta (buffers real: CLIP's position ids are not in files)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls(config)


def _clip_key(key: str):
    return [] if key.endswith("position_ids") else same_name(key)


def load_clip(source: FileSource, kind: str, eos_token_id: int, dtype: torch.dtype, scheme: FP8Scheme | None):
    """CLIPTextModelWithProjection from a file (a missing ``text_projection`` is the identity)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with LazyTensors(source.path) as files:
        quant = quant_layers(files)
        shapes = _shapes(files, source.prefix)
        config = CLIPTextConfig(**clip_config(shapes, kind, eos_token_id, source))
        model = _empty(CLIPTextModelWithProjection, config)
        modules, others, weights_only = gather_tensors(files, source.prefix, _clip_key, quant)
        if "text_projection" not in modules:
            modules["text_projection"] = type(next(iter(modules.values())))(weight=torch.eye(config.hidden_size))
        names = materialize(model, modules, others, dtype, scheme, source.path, weights_only)
    return model.eval(), names


def load_t5(source: FileSource, dtype: torch.dtype, scheme: FP8Scheme | None):
    """T5EncoderModel from a file in any precision (16-bit, plain FP8 cast, ComfyUI scaled FP8).

    ``wo`` stays float32 beside 16-bit weights, as transformers keeps it (fp16 overflows there).
    """
    from transformers import T5Config, T5EncoderModel

    with LazyTensors(source.path) as files:
        quant = quant_layers(files)
        config = T5Config(**t5_config(_shapes(files, source.prefix), source))
        model = _empty(T5EncoderModel, config)
        modules, others, weights_only = gather_tensors(files, source.prefix, same_name, quant)
        fp32 = ("wo",) if dtype in (torch.float16, torch.bfloat16) else ()
        names = materialize(model, modules, others, dtype, scheme, source.path, weights_only, fp32_modules=fp32)
    return model.eval(), names


def load_folder_t5(folder: Path, scheme: FP8Scheme, dtype: torch.dtype):
    """T5EncoderModel from a transformers folder (``model.safetensors`` or shards), its FP8 layers
    quantized as they are read (never the 16-bit model in memory); ``wo`` float32 beside 16 bit."""
    import contextlib

    from transformers import T5Config, T5EncoderModel

    model = _empty(T5EncoderModel, T5Config.from_pretrained(folder, local_files_only=True))
    fp32 = ("wo",) if dtype in (torch.float16, torch.bfloat16) else ()
    with contextlib.ExitStack() as stack:
        modules, others, weights_only = gather_folder(stack, folder, "model.safetensors")
        names = materialize(model, modules, others, dtype, scheme, folder, weights_only, fp32_modules=fp32)
    return model.eval(), names


def load_vae(source: FileSource, dtype: torch.dtype):
    """AutoencoderKL from an LDM-layout VAE (``first_stage_model.*`` or standalone), converted with
    diffusers' own key converter, or from a diffusers-layout VAE file."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with LazyTensors(source.path) as files:
        shapes = _shapes(files, source.prefix)
        tensors = {k: files.get(source.prefix + k) for k in shapes}
    config = vae_config(shapes, source)
    model = _empty(AutoencoderKL.from_config, config)
    state = tensors if vae_layout(shapes) == "diffusers" else convert_ldm_vae_checkpoint(tensors, config)
    for key, tensor in state.items():
        if not all_finite(tensor):
            raise ModelLoadError(f"{source}: VAE tensor {key!r} holds NaN/Inf")
    state = {k: (v.float() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else v).to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(f"{source}: VAE tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
