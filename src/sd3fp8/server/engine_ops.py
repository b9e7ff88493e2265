"""The work the SD3.5 nodes ask of the engine, ComfyUI's way: text encoding (CLIPTextEncode and
CLIPTextEncodeSD3), one KSampler run (comfy/sample.py + KSampler.sample, v0.8.0) on the sampling
layer, and the VAE both ways. Handles come from `engine_models`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sd3fp8.engine.denoise import transformer_predictor
from sd3fp8.engine.text import ENCODER_KEYS, TOKENIZER_KEYS, comfy_tokens, encode_comfy_tokens, token_rules, tokenize_weighted
from sd3fp8.sampling import Cond, FlowSampling, cfg_denoiser, fix_empty_latent_channels, initial_noise, sample, sigmas_for
from sd3fp8.server.engine_models import ModelHandle, TextHandle, VaeHandle
from sd3fp8.workflow.backend import SampleRequest, StepCallback, TextPrompts
from sd3fp8.workflow.types import CondEntry, InterruptFlag, NodeError

VAE_DOWNSCALE = 8  # pixels per latent cell (SD3's VAE)


# -- text ---------------------------------------------------------------------------------------------


def sd3_tokens(prompts: TextPrompts, tokenizers: dict, encoders: dict, layout) -> dict:
    """Each present encoder's (rules, windows), as ComfyUI tokenizes for CLIPTextEncode (one text
    for all: sd3_clip.py SD3Tokenizer) or CLIPTextEncodeSD3 (comfy_extras/nodes_sd3.py: a text per
    encoder; with empty_padding "none" an empty text gives no windows; CLIP-L and CLIP-G padded with
    the empty prompt's windows to the same count; no CLIP windows at all leaves CLIP out)."""
    if prompts.clip_l == prompts.clip_g == prompts.t5xxl and prompts.empty_padding:
        return comfy_tokens(prompts.t5xxl, tokenizers, encoders, layout)
    texts = dict(zip(ENCODER_KEYS, (prompts.clip_l, prompts.clip_g, prompts.t5xxl)))
    tokens = {}
    for key, tok_key in zip(ENCODER_KEYS, TOKENIZER_KEYS):
        tokenizer = tokenizers.get(tok_key)
        if tokenizer is None or (key == "text_encoder_3" and encoders.get(key) is None):
            continue
        rules = token_rules(key, tokenizer, layout)
        empty = not prompts.empty_padding and texts[key] == ""
        tokens[key] = rules, [] if empty else tokenize_weighted(texts[key], tokenizer, rules)
    clip = [k for k in ENCODER_KEYS[:2] if k in tokens]
    if all(not tokens[k][1] for k in clip):
        for k in clip:  # SD3ClipModel: no CLIP tokens at all, no CLIP part
            del tokens[k]
    elif len(clip) == 2:
        for k in clip:
            rules, windows = tokens[k]
            padding = tokenize_weighted("", tokenizers[TOKENIZER_KEYS[ENCODER_KEYS.index(k)]], rules)
            while len(windows) < max(len(tokens[c][1]) for c in clip):
                windows = windows + padding
            tokens[k] = rules, windows
    if "text_encoder_3" in tokens and not tokens["text_encoder_3"][1]:
        rules = tokens["text_encoder_3"][0]  # sd1_clip.py encodes gen_empty_tokens: the end token alone
        tokens["text_encoder_3"] = rules, [[(rules.end, 1.0)]]
    return {k: v for k, v in tokens.items() if encoders.get(k) is not None}


def encode_text(clip: TextHandle, prompts: TextPrompts) -> tuple[CondEntry, ...]:
    """One conditioning entry: context [1, T, width], pooled [1, 2048] (the engine's compute dtype)."""
    with torch.no_grad(), clip.open() as (tokenizers, encoders, layout):
        tokens = sd3_tokens(prompts, tokenizers, encoders, layout)
        context, pooled = encode_comfy_tokens(tokens, encoders, clip.device, clip.dtype, layout=layout)
    return (CondEntry(context=context, pooled=pooled),)


# -- sampling -----------------------------------------------------------------------------------------


def ksampler_sigmas(sigmas: torch.Tensor, start_step: int | None, last_step: int | None,
                    force_full_denoise: bool) -> torch.Tensor | None:
    """KSampler.sample's cut of the schedule (comfy/samplers.py): up to last_step (its last sigma 0
    with force_full_denoise), from start_step; None when start_step leaves nothing to run."""
    sigmas = sigmas.clone()
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1]
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return None
        sigmas = sigmas[start_step:]
    return sigmas


def _conds(conditioning, model: ModelHandle, what: str) -> tuple[Cond, ...]:
    out = []
    for entry in conditioning:
        if entry.context.shape[-1] != model.context_width or entry.pooled.shape[-1] != model.pooled_width:
            raise NodeError(f"the {what} conditioning (context width {entry.context.shape[-1]}, pooled {entry.pooled.shape[-1]}) "
                            f"does not fit {model.name} (context {model.context_width}, pooled {model.pooled_width}): "
                            "the text encoders and the model do not belong together")
        out.append(Cond(entry.context.to(model.device), entry.pooled.to(model.device), entry.start_percent, entry.end_percent,
                        entry.strength))
    return tuple(out)


def check_latent(model: ModelHandle, latent: torch.Tensor) -> None:
    """The latent fits the model: channels, sides in whole patches, within the position table."""
    if latent.shape[1] != model.latent_channels:
        raise NodeError(f"{model.name} takes {model.latent_channels}-channel latents, got {latent.shape[1]} channels")
    patch, table = model.config.get("patch_size", 2), model.config.get("pos_embed_max_size")
    h, w = latent.shape[-2:]
    size = f"{w * VAE_DOWNSCALE}x{h * VAE_DOWNSCALE}"
    if h % patch or w % patch:
        raise NodeError(f"{size} pixels: SD3 needs width and height in multiples of {patch * VAE_DOWNSCALE}")
    if table is not None and max(h, w) > table * patch:
        side = table * patch * VAE_DOWNSCALE
        raise NodeError(f"{model.name} generates at most {side}x{side} pixels (its position table holds {table}x{table} "
                        f"patches); this latent is {size}")


def run_ksampler(request: SampleRequest, callback: StepCallback, interrupt: InterruptFlag) -> torch.Tensor:
    """common_ksampler: the latent's samples [B, C, h, w] denoised, VAE latent space, float32 (CPU)."""
    model: ModelHandle = request.model.handle
    latent = fix_empty_latent_channels(request.latent.samples.to(torch.float32), model.latent_channels)
    check_latent(model, latent)
    sampling = FlowSampling(shift=model.shift if request.model.shift is None else request.model.shift)
    sigmas = sigmas_for(sampling, request.scheduler, request.steps, request.denoise, request.sampler_name)
    sigmas = ksampler_sigmas(sigmas, request.start_step, request.last_step, request.force_full_denoise)
    if sigmas is None:
        return latent
    positive, negative = _conds(request.positive, model, "positive"), _conds(request.negative, model, "negative")
    batch_index = request.latent.batch_index
    noise = (initial_noise(latent.shape, request.seed, batch_index) if request.add_noise
             else torch.zeros(latent.shape, dtype=torch.float32))

    def on_step(info: dict) -> None:
        callback(info["i"] + 1, len(sigmas) - 1, info["denoised"])

    with torch.no_grad(), model.transformer() as transformer:
        predictor = _interruptible(transformer_predictor(transformer, model.compute_dtype), interrupt)
        denoiser = cfg_denoiser(predictor, sampling, positive, negative, request.cfg)
        out = sample(denoiser, sampling, noise=noise.to(model.device), latent=latent.to(model.device),
                     sigmas=sigmas.to(model.device), sampler=request.sampler_name, seed=request.seed, callback=on_step,
                     disable=True, latent_format=model.latent_format)
    return out.to("cpu", torch.float32)


def _interruptible(predict: Callable, interrupt: InterruptFlag) -> Callable:
    def checked(*args):
        interrupt.check()  # before every model evaluation: /interrupt stops within one step
        return predict(*args)

    return checked


# -- VAE --------------------------------------------------------------------------------------------


def vae_decode(vae: VaeHandle, samples: torch.Tensor) -> torch.Tensor:
    """VAE-space latents [B, 16, h, w] -> IMAGE [B, 8h, 8w, 3] in [0, 1] (diffusers' denormalisation)."""
    module = vae.vae
    with torch.no_grad():
        image = module.decode(samples.to(module.device, module.dtype), return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).movedim(1, -1).to("cpu", torch.float32).contiguous()


def vae_encode(vae: VaeHandle, pixels: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in [0, 1] -> VAE-space latents (the posterior's mode), cropped to whole
    latent cells around the centre as ComfyUI's vae_encode_crop_pixels does."""
    for dim in (1, 2):
        size = pixels.shape[dim] // VAE_DOWNSCALE * VAE_DOWNSCALE
        if size == 0:
            raise NodeError(f"an image of {pixels.shape[2]}x{pixels.shape[1]} pixels is smaller than one latent cell")
        pixels = pixels.narrow(dim, (pixels.shape[dim] % VAE_DOWNSCALE) // 2, size)
    module = vae.vae
    with torch.no_grad():
        x = (pixels.movedim(-1, 1) * 2 - 1).to(module.device, module.dtype)
        return module.encode(x).latent_dist.mode().to("cpu", torch.float32)
