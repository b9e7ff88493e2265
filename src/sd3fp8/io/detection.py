"""What a checkpoint file is, from its keys, shapes and dtypes alone (never its file name).

``detect(header)`` recognises the SD3 MMDiT in the original layout (with or without the
``model.diffusion_model.`` prefix, alone or in an all-in-one file with VAE and text encoders),
diffusers' transformer layout, standalone CLIP-L / CLIP-G / T5-XXL encoders, and the FP8 flavours:
plain casts, ComfyUI scaled fp8 (``scaled_fp8`` marker, ``scale_weight``/``scale_input``) and
ComfyUI's per-layer ``comfy_quant`` format. Other architectures are named and refused.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from sd3fp8.errors import ModelLoadError
from sd3fp8.io.checkpoint import Header
from sd3fp8.io.comfyquant import ENTRY_SUFFIX, HEADER_KEY, check_header
from sd3fp8.io.layouts import MMDIT_PREFIX, mmdit_config, strip_prefix, variant_name

COMPONENT_PREFIXES = {
    "vae": "first_stage_model.",
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
# Keys that identify architectures we do not run, so the error can name them.
FOREIGN = {
    "SDXL / SD1.x UNet": ("model.diffusion_model.input_blocks.", "input_blocks.", "down_blocks.0.resnets.0."),
    "Flux transformer": ("double_blocks.", "model.diffusion_model.double_blocks.", "single_transformer_blocks."),
    "PixArt / DiT": ("blocks.0.attn.qkv.",),
}


@dataclasses.dataclass(frozen=True)
class Detection:
    kind: str  # mmdit-original | mmdit-diffusers | clip-l | clip-g | t5-xxl | vae
    variant: str  # human-readable architecture
    fp8: str  # none | plain-cast | comfy-scaled | comfy-quant | sd3fp8
    components: tuple[str, ...]  # what the file holds (transformer, vae, text encoders)
    mmdit_config: dict | None
    dtypes: dict[str, int]  # dtype name -> tensor count

    def describe(self) -> str:
        fp8 = {"none": "no FP8", "plain-cast": "FP8 plain cast (no scales)", "comfy-scaled": "ComfyUI scaled FP8",
               "sd3fp8": "sd3fp8 FP8 (weight_scale per layer)",
               "comfy-quant": "ComfyUI per-layer quantization"}[self.fp8]
        return f"{self.variant} [{self.kind}], {fp8}; holds {', '.join(self.components)}"


def _has_prefix(keys, prefixes) -> bool:
    return any(k.startswith(p) for k in keys for p in prefixes)


def fp8_flavour(header: Header) -> str:
    keys = header.tensors.keys()
    if header.metadata.get("sd3fp8_layout") == "sd3fp8":  # ours, any version (v2 also carries comfy_quant entries)
        return "sd3fp8"
    if any(k.endswith(ENTRY_SUFFIX) for k in keys) or HEADER_KEY in header.metadata:
        return "comfy-quant"
    if any(k == "scaled_fp8" or k.endswith(".scaled_fp8") for k in keys):
        return "comfy-scaled"
    if "sd3fp8_format_version" in header.metadata:
        return "sd3fp8"
    if any(t.dtype_name in ("F8_E4M3", "F8_E5M2") for t in header.tensors.values()):
        return "plain-cast"
    return "none"


def _text_encoder_kind(shapes: dict[str, tuple[int, ...]]) -> tuple[str, str] | None:
    if any(k.startswith("encoder.block.") for k in shapes) and "shared.weight" in shapes:
        d = shapes["shared.weight"][1]
        depth = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block."))
        return "t5-xxl", f"T5 encoder (d_model {d}, {depth} blocks{', T5-XXL' if (d, depth) == (4096, 24) else ''})"
    emb = shapes.get("text_model.embeddings.token_embedding.weight")
    if emb is not None:
        depth = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("text_model.encoder.layers."))
        name = {768: "CLIP-L", 1280: "CLIP-G (OpenCLIP bigG)"}.get(emb[1], "CLIP text encoder")
        return ("clip-g" if emb[1] == 1280 or depth == 32 else "clip-l"), f"{name} (width {emb[1]}, {depth} layers)"
    return None


def detect(header: Header) -> Detection:
    """Identify a checkpoint; raise ModelLoadError naming anything we cannot run."""
    keys = list(header.tensors)
    shapes = header.shapes()
    dtypes = dict(Counter(t.torch_name for t in header.tensors.values()))
    flavour = fp8_flavour(header)
    for name, prefixes in FOREIGN.items():
        if _has_prefix(keys, prefixes):
            raise ModelLoadError(f"{header.path}: this is a {name} checkpoint, not Stable Diffusion 3")
    check_header(header)  # what the header declares per layer matches the stored tensors (tensor entries: comfyquant)

    stripped = strip_prefix(shapes)
    if any(k.startswith("joint_blocks.") for k in stripped):
        config = mmdit_config(stripped, str(header.path))
        components = ["transformer"] + [c for c, p in COMPONENT_PREFIXES.items() if _has_prefix(keys, [p])]
        return Detection("mmdit-original", variant_name(config), flavour, tuple(components), config, dtypes)
    if any(k.startswith("transformer_blocks.") for k in keys) and "pos_embed.proj.weight" in shapes:
        hidden = shapes["pos_embed.proj.weight"][0]
        return Detection("mmdit-diffusers", f"SD3-family MMDiT, diffusers layout (width {hidden})", flavour, ("transformer",), None, dtypes)
    encoder = _text_encoder_kind(shapes)
    if encoder:
        kind, variant = encoder
        component = {"clip-l": "text_encoder", "clip-g": "text_encoder_2", "t5-xxl": "text_encoder_3"}[kind]
        return Detection(kind, variant, flavour, (component,), None, dtypes)
    vae_prefix = COMPONENT_PREFIXES["vae"] if _has_prefix(keys, [COMPONENT_PREFIXES["vae"]]) else ""
    if f"{vae_prefix}decoder.conv_in.weight" in shapes and _has_prefix(keys, [f"{vae_prefix}encoder.down"]):
        layout = "diffusers" if _has_prefix(keys, [f"{vae_prefix}encoder.down_blocks."]) else "LDM"
        latent = shapes[f"{vae_prefix}decoder.conv_in.weight"][1]
        return Detection("vae", f"VAE ({layout} layout, {latent} latent channels)", flavour, ("vae",), None, dtypes)
    if any(k.startswith(MMDIT_PREFIX) for k in keys):
        raise ModelLoadError(f"{header.path}: has {MMDIT_PREFIX}* keys but no joint_blocks: not an SD3 MMDiT")
    sample = ", ".join(keys[:3])
    raise ModelLoadError(f"{header.path}: not an SD3 checkpoint or text encoder I recognise (first keys: {sample})")
