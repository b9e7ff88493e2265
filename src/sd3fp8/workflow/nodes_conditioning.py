"""Text encoding and conditioning nodes (ComfyUI nodes.py / comfy_extras/nodes_sd3.py, v0.8.0).

The conditioning ops are pure: ComfyUI's semantics on our CondEntry tuples.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sd3fp8.workflow.backend import TextPrompts
from sd3fp8.workflow.spec import NodeContext, NodeDef, combo_v3
from sd3fp8.workflow.types import Clip, Conditioning, NodeError

_TEXT = {"multiline": True, "dynamicPrompts": True}


def _check_clip(clip) -> Clip:
    if not isinstance(clip, Clip):
        raise NodeError("clip input is not a CLIP: connect a loader's CLIP output")
    return clip


def encode(ctx: NodeContext, text: str, clip: Clip):
    return (tuple(ctx.backend.encode_text(_check_clip(clip).handle, TextPrompts.single(text))),)


def encode_sd3(ctx: NodeContext, clip: Clip, clip_l: str, clip_g: str, t5xxl: str, empty_padding: str):
    prompts = TextPrompts(clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl, empty_padding=empty_padding == "empty_prompt")
    return (tuple(ctx.backend.encode_text(_check_clip(clip).handle, prompts)),)


def zero_out(ctx: NodeContext, conditioning: Conditioning):
    """Context and pooled zeroed, options kept: for SD3 not the same as encoding ""."""
    return (tuple(replace(c, context=torch.zeros_like(c.context), pooled=torch.zeros_like(c.pooled)) for c in conditioning),)


def set_timestep_range(ctx: NodeContext, conditioning: Conditioning, start: float, end: float):
    """Entries used only while percent_to_sigma(end) <= sigma <= percent_to_sigma(start)."""
    return (tuple(replace(c, start_percent=start, end_percent=end) for c in conditioning),)


def combine(ctx: NodeContext, conditioning_1: Conditioning, conditioning_2: Conditioning):
    """The lists concatenated: the sampler averages the active entries' predictions."""
    return (tuple(conditioning_1) + tuple(conditioning_2),)


CLIP_TEXT_ENCODE = NodeDef(
    name="CLIPTextEncode",
    inputs=lambda o: {"required": {"text": ["STRING", {**_TEXT, "tooltip": "The text to be encoded."}],
                                   "clip": ["CLIP", {"tooltip": "The CLIP model used for encoding the text."}]}},
    function=encode,
    outputs=("CONDITIONING",),
    category="conditioning",
    display_name="CLIP Text Encode (Prompt)",
    description="Encodes a text prompt using a CLIP model into an embedding that can be used to guide the diffusion model "
                "towards generating specific images.",
    output_tooltips=("A conditioning containing the embedded text used to guide the diffusion model.",),
)

CLIP_TEXT_ENCODE_SD3 = NodeDef(
    name="CLIPTextEncodeSD3",
    inputs=lambda o: {"required": {"clip": ["CLIP", {}], "clip_l": ["STRING", dict(_TEXT)], "clip_g": ["STRING", dict(_TEXT)],
                                   "t5xxl": ["STRING", dict(_TEXT)], "empty_padding": combo_v3(["none", "empty_prompt"])}},
    function=encode_sd3,
    outputs=("CONDITIONING",),
    category="advanced/conditioning",
    python_module="comfy_extras.nodes_sd3",
    v3=True,
)

CONDITIONING_ZERO_OUT = NodeDef(
    name="ConditioningZeroOut",
    inputs=lambda o: {"required": {"conditioning": ["CONDITIONING"]}},
    function=zero_out,
    outputs=("CONDITIONING",),
    category="advanced/conditioning",
)

CONDITIONING_SET_TIMESTEP_RANGE = NodeDef(
    name="ConditioningSetTimestepRange",
    inputs=lambda o: {"required": {"conditioning": ["CONDITIONING"],
                                   "start": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}],
                                   "end": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}]}},
    function=set_timestep_range,
    outputs=("CONDITIONING",),
    category="advanced/conditioning",
)

CONDITIONING_COMBINE = NodeDef(
    name="ConditioningCombine",
    inputs=lambda o: {"required": {"conditioning_1": ["CONDITIONING"], "conditioning_2": ["CONDITIONING"]}},
    function=combine,
    outputs=("CONDITIONING",),
    category="conditioning",
    display_name="Conditioning (Combine)",
)

NODES = (CLIP_TEXT_ENCODE, CLIP_TEXT_ENCODE_SD3, CONDITIONING_ZERO_OUT, CONDITIONING_SET_TIMESTEP_RANGE, CONDITIONING_COMBINE)
