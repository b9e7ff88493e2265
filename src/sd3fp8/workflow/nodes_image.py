"""Image nodes: LoadImage, SaveImage, PreviewImage, SaveImageWebsocket (ComfyUI v0.8.0)."""

from __future__ import annotations

import secrets
import string

from sd3fp8.workflow.images import file_digest, load_image, png_info, resolve_image, save_images, to_pil
from sd3fp8.workflow.paths import PathEscape
from sd3fp8.workflow.spec import NodeContext, NodeDef, NodeResult, Preview, combo
from sd3fp8.workflow.types import check_image

_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
_SAMPLERS = ("KSampler", "KSamplerAdvanced")
_LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "UNETLoader": "unet_name"}


def _source(prompt: dict, value) -> tuple[str, dict] | None:
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
        return str(value[0]), prompt[str(value[0])]
    return None


def _literal(node: dict | None, name: str):
    """A literal (not linked) input of ``node``, else None."""
    if node is None:
        return None
    value = node.get("inputs", {}).get(name)
    return None if isinstance(value, list) else value


def workflow_parameters(prompt: dict, node_id: str) -> dict:
    """A summary of what made the images of ``node_id`` for our `sd3fp8` PNG chunk: the nearest
    sampler upstream, its texts, size and model (whatever of it is literal in the prompt)."""
    seen, queue, sampler = set(), [node_id], None
    while queue and sampler is None:
        current = queue.pop(0)
        if current in seen or current not in prompt:
            continue
        seen.add(current)
        if prompt[current].get("class_type") in _SAMPLERS:
            sampler = prompt[current]
            break
        queue += [str(v[0]) for v in prompt[current].get("inputs", {}).values() if isinstance(v, list) and len(v) == 2]
    params: dict = {"source": "sd3fp8 serve"}
    if sampler is None:
        return params
    inputs = sampler.get("inputs", {})
    for key in ("seed", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"):
        if key in inputs and not isinstance(inputs[key], list):
            params["seed" if key == "noise_seed" else key] = inputs[key]
    for key, out in (("positive", "prompt"), ("negative", "negative_prompt")):
        src = _source(prompt, inputs.get(key))
        if src and src[1].get("class_type") == "CLIPTextEncode" and _literal(src[1], "text") is not None:
            params[out] = _literal(src[1], "text")
    latent = _source(prompt, inputs.get("latent_image"))
    if latent and latent[1].get("class_type") in ("EmptySD3LatentImage", "EmptyLatentImage"):
        for key in ("width", "height", "batch_size"):
            params[key] = _literal(latent[1], key)
    model = _source(prompt, inputs.get("model"))
    while model and model[1].get("class_type") == "ModelSamplingSD3":
        params["shift"] = _literal(model[1], "shift")
        model = _source(prompt, model[1].get("inputs", {}).get("model"))
    if model and model[1].get("class_type") in _LOADERS:
        params["model"] = _literal(model[1], _LOADERS[model[1]["class_type"]])
    return params


def load_image_node(ctx: NodeContext, image: str):
    return load_image(resolve_image(ctx.folders, image))


def _image_changed(folders, image: str = "", **_) -> str:
    try:
        return file_digest(resolve_image(folders, image))
    except (OSError, PathEscape):
        return ""


def _image_exists(folders, image: str = "", **_) -> bool | str:
    try:
        ok = resolve_image(folders, image).is_file()
    except PathEscape:
        ok = False
    return True if ok else f"Invalid image file: {image}"


def save_image(ctx: NodeContext, images, filename_prefix: str = "ComfyUI"):
    info = png_info(ctx.prompt, ctx.extra_pnginfo, workflow_parameters(ctx.prompt, ctx.node_id))
    saved = save_images(images, ctx.folders.output, filename_prefix, "output", info=info, compress_level=4)
    return NodeResult(ui={"images": saved})


def preview_image(ctx: NodeContext, images):
    suffix = "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))
    info = png_info(ctx.prompt, ctx.extra_pnginfo, None)
    saved = save_images(images, ctx.folders.temp, f"ComfyUI_temp_{suffix}", "temp", info=info, compress_level=1)
    return NodeResult(ui={"images": saved})


def save_image_websocket(ctx: NodeContext, images):
    images = check_image(images)
    for step, image in enumerate(images):  # ComfyUI reports steps 0..n-1 with each PNG
        ctx.progress(step, images.shape[0], Preview(to_pil(image), format="PNG", max_size=None))
    return NodeResult()


LOAD_IMAGE = NodeDef(
    name="LoadImage",
    inputs=lambda o: {"required": {"image": combo(o.input_images(), image_upload=True)}},
    function=load_image_node,
    outputs=("IMAGE", "MASK"),
    category="image",
    display_name="Load Image",
    is_changed=_image_changed,
    validate=_image_exists,
    validate_inputs=("image",),
)

SAVE_IMAGE = NodeDef(
    name="SaveImage",
    inputs=lambda o: {"required": {"images": ["IMAGE", {"tooltip": "The images to save."}],
                                   "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": (
                                       "The prefix for the file to save. This may include formatting information such as "
                                       "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes.")}]},
                      "hidden": dict(_HIDDEN)},
    function=save_image,
    category="image",
    display_name="Save Image",
    description="Saves the input images to your ComfyUI output directory.",
    output_node=True,
)

PREVIEW_IMAGE = NodeDef(
    name="PreviewImage",
    inputs=lambda o: {"required": {"images": ["IMAGE"]}, "hidden": dict(_HIDDEN)},
    function=preview_image,
    category="image",
    display_name="Preview Image",
    description="Saves the input images to your ComfyUI output directory.",
    output_node=True,
)

SAVE_IMAGE_WEBSOCKET = NodeDef(
    name="SaveImageWebsocket",
    inputs=lambda o: {"required": {"images": ["IMAGE"]}},
    function=save_image_websocket,
    category="api/image",
    python_module="custom_nodes.websocket_image_save",
    output_node=True,
    is_changed=lambda folders, **_: secrets.token_hex(8),  # always runs: its output is the frames it sends
)

NODES = (LOAD_IMAGE, SAVE_IMAGE, PREVIEW_IMAGE, SAVE_IMAGE_WEBSOCKET)
