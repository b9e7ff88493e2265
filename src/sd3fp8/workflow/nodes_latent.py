"""Latent, model-sampling, sampler and VAE nodes (ComfyUI nodes.py / comfy_extras, v0.8.0)."""

from __future__ import annotations

from dataclasses import replace

import torch

from sd3fp8.workflow.backend import SampleRequest
from sd3fp8.workflow.preview import latent_to_rgb
from sd3fp8.workflow.spec import NodeContext, NodeDef, Preview, combo
from sd3fp8.workflow.types import LATENT_CHANNELS, LATENT_DOWNSCALE, Latent, Model, NodeError, Vae, check_image

SEED_MAX = 0xFFFFFFFFFFFFFFFF  # ComfyUI accepts any 64-bit unsigned seed


def _empty(width: int, height: int, batch_size: int, channels: int) -> Latent:
    shape = [batch_size, channels, height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE]
    return Latent(torch.zeros(shape, dtype=torch.float32))


def empty_sd3_latent(ctx: NodeContext, width: int, height: int, batch_size: int):
    return (_empty(width, height, batch_size, LATENT_CHANNELS),)


def empty_latent(ctx: NodeContext, width: int, height: int, batch_size: int):
    # 4 channels like ComfyUI's (SD1.x-shaped); samplers widen an all-zero latent to 16
    return (_empty(width, height, batch_size, 4),)


def model_sampling_sd3(ctx: NodeContext, model: Model, shift: float):
    if not isinstance(model, Model):
        raise NodeError("model input is not a MODEL")
    return (replace(model, shift=float(shift)),)


def _step_callback(ctx: NodeContext):
    def callback(step: int, total: int, x0: torch.Tensor | None) -> None:
        image = latent_to_rgb(x0) if ctx.previews and x0 is not None else None
        ctx.progress(step, total, Preview(image) if image is not None else None)

    return callback


def _run(ctx: NodeContext, request: SampleRequest):
    if not isinstance(request.model, Model):
        raise NodeError("model input is not a MODEL")
    ctx.interrupt.check()
    samples = ctx.backend.sample(request, _step_callback(ctx), ctx.interrupt)
    latent = request.latent
    return (Latent(samples, batch_index=latent.batch_index, noise_mask=latent.noise_mask),)


def ksampler(ctx: NodeContext, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise):
    return _run(ctx, SampleRequest(model=model, positive=positive, negative=negative, latent=latent_image, seed=seed,
                                   steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise))


def ksampler_advanced(ctx: NodeContext, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                      latent_image, start_at_step, end_at_step, return_with_leftover_noise):
    return _run(ctx, SampleRequest(
        model=model, positive=positive, negative=negative, latent=latent_image, seed=noise_seed, steps=steps, cfg=cfg,
        sampler_name=sampler_name, scheduler=scheduler, denoise=1.0, add_noise=add_noise == "enable",
        start_step=start_at_step, last_step=end_at_step, force_full_denoise=return_with_leftover_noise != "enable"))


def vae_decode(ctx: NodeContext, samples: Latent, vae: Vae):
    return (check_image(ctx.backend.vae_decode(vae.handle, samples.samples), "decoded images"),)


def vae_encode(ctx: NodeContext, pixels: torch.Tensor, vae: Vae):
    pixels = check_image(pixels, "pixels")[..., :3]
    return (Latent(ctx.backend.vae_encode(vae.handle, pixels)),)


def _size(default: int, step: int, tooltip: str | None = None) -> list:
    extra = {"default": default, "min": 16, "max": 16384, "step": step}
    return ["INT", {**extra, "tooltip": tooltip} if tooltip else extra]


def _batch(tooltip: str | None = None) -> list:
    extra = {"default": 1, "min": 1, "max": 4096}
    return ["INT", {**extra, "tooltip": tooltip} if tooltip else extra]


EMPTY_SD3_LATENT = NodeDef(
    name="EmptySD3LatentImage",
    inputs=lambda o: {"required": {"width": _size(1024, 16), "height": _size(1024, 16), "batch_size": _batch()}},
    function=empty_sd3_latent,
    outputs=("LATENT",),
    category="latent/sd3",
    python_module="comfy_extras.nodes_sd3",
    v3=True,
)

EMPTY_LATENT = NodeDef(
    name="EmptyLatentImage",
    inputs=lambda o: {"required": {"width": _size(512, 8, "The width of the latent images in pixels."),
                                   "height": _size(512, 8, "The height of the latent images in pixels."),
                                   "batch_size": _batch("The number of latent images in the batch.")}},
    function=empty_latent,
    outputs=("LATENT",),
    category="latent",
    display_name="Empty Latent Image",
    description="Create a new batch of empty latent images to be denoised via sampling.",
    output_tooltips=("The empty latent image batch.",),
)

MODEL_SAMPLING_SD3 = NodeDef(
    name="ModelSamplingSD3",
    inputs=lambda o: {"required": {"model": ["MODEL"], "shift": ["FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01}]}},
    function=model_sampling_sd3,
    outputs=("MODEL",),
    category="advanced/model",
    python_module="comfy_extras.nodes_model_advanced",
)


def _ksampler_inputs(o) -> dict:
    return {"required": {
        "model": ["MODEL", {"tooltip": "The model used for denoising the input latent."}],
        "seed": ["INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                         "tooltip": "The random seed used for creating the noise."}],
        "steps": ["INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "The number of steps used in the denoising process."}],
        "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher "
                                     "values result in images more closely matching the prompt however too high values will "
                                     "negatively impact quality."}],
        "sampler_name": combo(o.sampler_names(), tooltip="The algorithm used when sampling, this can affect the quality, speed, "
                                                         "and style of the generated output."),
        "scheduler": combo(o.scheduler_names(), tooltip="The scheduler controls how noise is gradually removed to form the image."),
        "positive": ["CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to include in the image."}],
        "negative": ["CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to exclude from the image."}],
        "latent_image": ["LATENT", {"tooltip": "The latent image to denoise."}],
        "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "The amount of denoising applied, lower values will maintain the structure of the initial "
                                         "image allowing for image to image sampling."}],
    }}


def _ksampler_advanced_inputs(o) -> dict:
    return {"required": {
        "model": ["MODEL"],
        "add_noise": combo(["enable", "disable"]),
        "noise_seed": ["INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}],
        "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
        "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
        "sampler_name": combo(o.sampler_names()),
        "scheduler": combo(o.scheduler_names()),
        "positive": ["CONDITIONING"],
        "negative": ["CONDITIONING"],
        "latent_image": ["LATENT"],
        "start_at_step": ["INT", {"default": 0, "min": 0, "max": 10000}],
        "end_at_step": ["INT", {"default": 10000, "min": 0, "max": 10000}],
        "return_with_leftover_noise": combo(["disable", "enable"]),
    }}


KSAMPLER = NodeDef(
    name="KSampler",
    inputs=_ksampler_inputs,
    function=ksampler,
    outputs=("LATENT",),
    category="sampling",
    display_name="KSampler",
    description="Uses the provided model, positive and negative conditioning to denoise the latent image.",
    output_tooltips=("The denoised latent.",),
)

KSAMPLER_ADVANCED = NodeDef(
    name="KSamplerAdvanced",
    inputs=_ksampler_advanced_inputs,
    function=ksampler_advanced,
    outputs=("LATENT",),
    category="sampling",
    display_name="KSampler (Advanced)",
)

VAE_DECODE = NodeDef(
    name="VAEDecode",
    inputs=lambda o: {"required": {"samples": ["LATENT", {"tooltip": "The latent to be decoded."}],
                                   "vae": ["VAE", {"tooltip": "The VAE model used for decoding the latent."}]}},
    function=vae_decode,
    outputs=("IMAGE",),
    category="latent",
    display_name="VAE Decode",
    description="Decodes latent images back into pixel space images.",
    output_tooltips=("The decoded image.",),
)

VAE_ENCODE = NodeDef(
    name="VAEEncode",
    inputs=lambda o: {"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}},
    function=vae_encode,
    outputs=("LATENT",),
    category="latent",
    display_name="VAE Encode",
)

NODES = (EMPTY_SD3_LATENT, EMPTY_LATENT, MODEL_SAMPLING_SD3, KSAMPLER, KSAMPLER_ADVANCED, VAE_DECODE, VAE_ENCODE)
