"""Loader nodes: checkpoints, diffusion models, text encoders, VAEs (ComfyUI v0.8.0 signatures)."""

from __future__ import annotations

from sd3fp8.workflow.backend import WEIGHT_DTYPES
from sd3fp8.workflow.spec import NodeContext, NodeDef, combo, combo_v3
from sd3fp8.workflow.types import Clip, Model, NodeError, Vae

# ComfyUI's own type lists, advertised as they are so workflows load; only "sd3" runs here.
CLIP_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos", "lumina2",
              "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2", "ovis"]
DUAL_CLIP_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image", "hunyuan_video_15", "kandinsky5",
                   "kandinsky5_image", "ltxv", "newbie"]
CLIP_DEVICES = ["default", "cpu"]


def _sd3_only(folders, type: str = "sd3", **_) -> bool | str:  # noqa: A002 - ComfyUI's input name
    return True if type == "sd3" else f"type '{type}' is not supported: sd3fp8 runs SD3/SD3.5 text encoders (type 'sd3')"


def load_checkpoint(ctx: NodeContext, ckpt_name: str):
    model, clip, vae = ctx.backend.load_checkpoint(ckpt_name)
    return Model(model, ckpt_name), Clip(clip, (ckpt_name,)), Vae(vae, ckpt_name)


def load_unet(ctx: NodeContext, unet_name: str, weight_dtype: str):
    if weight_dtype not in WEIGHT_DTYPES:
        raise NodeError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    return (Model(ctx.backend.load_diffusion_model(unet_name, weight_dtype), unet_name, weight_dtype),)


def _load_clip(ctx: NodeContext, names: tuple[str, ...], clip_type: str, device: str):
    if _sd3_only(None, clip_type) is not True:
        raise NodeError(_sd3_only(None, clip_type))
    return (Clip(ctx.backend.load_text_encoders(names, clip_type, device), names),)


def load_clip(ctx: NodeContext, clip_name: str, type: str, device: str = "default"):  # noqa: A002
    return _load_clip(ctx, (clip_name,), type, device)


def load_dual_clip(ctx: NodeContext, clip_name1: str, clip_name2: str, type: str, device: str = "default"):  # noqa: A002
    return _load_clip(ctx, (clip_name1, clip_name2), type, device)


def load_triple_clip(ctx: NodeContext, clip_name1: str, clip_name2: str, clip_name3: str):
    return _load_clip(ctx, (clip_name1, clip_name2, clip_name3), "sd3", "default")


def load_vae(ctx: NodeContext, vae_name: str):
    return (Vae(ctx.backend.load_vae(vae_name), vae_name),)


CHECKPOINT_LOADER = NodeDef(
    name="CheckpointLoaderSimple",
    inputs=lambda o: {"required": {"ckpt_name": combo(o.model_files("checkpoints"),
                                                      tooltip="The name of the checkpoint (model) to load.")}},
    function=load_checkpoint,
    outputs=("MODEL", "CLIP", "VAE"),
    category="loaders",
    display_name="Load Checkpoint",
    description="Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
    output_tooltips=("The model used for denoising latents.", "The CLIP model used for encoding text prompts.",
                     "The VAE model used for encoding and decoding images to and from latent space."),
)

TRIPLE_CLIP_LOADER = NodeDef(
    name="TripleCLIPLoader",
    inputs=lambda o: {"required": {f"clip_name{i}": combo_v3(o.model_files("text_encoders")) for i in (1, 2, 3)}},
    function=load_triple_clip,
    outputs=("CLIP",),
    category="advanced/loaders",
    description="[Recipes]\n\nsd3: clip-l, clip-g, t5",
    python_module="comfy_extras.nodes_sd3",
    v3=True,
)

CLIP_LOADER = NodeDef(
    name="CLIPLoader",
    inputs=lambda o: {"required": {"clip_name": combo(o.model_files("text_encoders")), "type": combo(CLIP_TYPES)},
                      "optional": {"device": combo(CLIP_DEVICES, advanced=True)}},
    function=load_clip,
    outputs=("CLIP",),
    category="advanced/loaders",
    display_name="Load CLIP",
    description="[Recipes]\n\nstable_diffusion: clip-l\nstable_cascade: clip-g\nsd3: t5 xxl/ clip-g / clip-l\nstable_audio: t5 base\n"
                "mochi: t5 xxl\ncosmos: old t5 xxl\nlumina2: gemma 2 2B\nwan: umt5 xxl\n hidream: llama-3.1 (Recommend) or t5\n"
                "omnigen2: qwen vl 2.5 3B",
    validate=_sd3_only,
    validate_inputs=("type",),
)

DUAL_CLIP_LOADER = NodeDef(
    name="DualCLIPLoader",
    inputs=lambda o: {"required": {"clip_name1": combo(o.model_files("text_encoders")),
                                   "clip_name2": combo(o.model_files("text_encoders")), "type": combo(DUAL_CLIP_TYPES)},
                      "optional": {"device": combo(CLIP_DEVICES, advanced=True)}},
    function=load_dual_clip,
    outputs=("CLIP",),
    category="advanced/loaders",
    display_name="DualCLIPLoader",
    description="[Recipes]\n\nsdxl: clip-l, clip-g\nsd3: clip-l, clip-g / clip-l, t5 / clip-g, t5\nflux: clip-l, t5\n"
                "hidream: at least one of t5 or llama, recommended t5 and llama\nhunyuan_image: qwen2.5vl 7b and byt5 small\n"
                "newbie: gemma-3-4b-it, jina clip v2",
    validate=_sd3_only,
    validate_inputs=("type",),
)

UNET_LOADER = NodeDef(
    name="UNETLoader",
    inputs=lambda o: {"required": {"unet_name": combo(o.model_files("diffusion_models")), "weight_dtype": combo(list(WEIGHT_DTYPES))}},
    function=load_unet,
    outputs=("MODEL",),
    category="advanced/loaders",
    display_name="Load Diffusion Model",
)

VAE_LOADER = NodeDef(
    name="VAELoader",
    inputs=lambda o: {"required": {"vae_name": combo(o.model_files("vae"))}},
    function=load_vae,
    outputs=("VAE",),
    category="loaders",
    display_name="Load VAE",
)

NODES = (CHECKPOINT_LOADER, TRIPLE_CLIP_LOADER, CLIP_LOADER, DUAL_CLIP_LOADER, UNET_LOADER, VAE_LOADER)
