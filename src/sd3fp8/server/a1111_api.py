"""A thin AUTOMATIC1111 API (`modules/api/api.py`), as Open WebUI, SillyTavern and bots call it.

txt2img / img2img become the same jobs as OpenAI requests (the shared queue). Only what a client
sends is honoured; what it leaves out takes the model's defaults (not A1111's 512x512, 50 steps,
cfg 7: those suit SD1.5, not this model). Fields A1111 has and we do not use are ignored the way
A1111 ignores unknown ones (eta, s_*, do_not_save_*, override settings other than the checkpoint,
image_cfg_scale, ...); fields asking for something we cannot do are refused with 422 and a message
rather than silently dropped: hires fix (enable_hr), restore_faces, tiling, scripts (script_name,
non-empty alwayson_scripts), styles, variation seeds (subseed_strength > 0, seed_resize_from_*),
the refiner, infotext, masks/inpainting, several init images, resize modes 2 and 3.

Seeds: -1 (or absent) picks one. ComfyUI's noise rule holds: the images of a batch are draws
0..n-1 of one seed's generator, so `all_seeds` repeats the seed and each infotext names its
"Batch index".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sd3fp8.server.imageapi import (
    A1111_SAMPLERS,
    A1111_SCHEDULERS,
    MAX_SIDE,
    ImageApi,
    api_of,
    aspect_size,
    b64,
    decode_upload,
    encode_image,
    fit_image,
    infotext,
    png_bytes,
    upscale,
)
from sd3fp8.server.imagejobs import INVALID, QUEUE_FULL, UNAVAILABLE, Failed, ImageJob

router = APIRouter(prefix="/sdapi/v1")

MAX_IMAGES = 64  # batch_size x n_iter (the engine's batch limit)
DEFAULT_DENOISE = 0.75  # A1111's img2img denoising_strength default
SAVE_PREFIX = "sd3fp8-a1111/image"


class A1111Error(Exception):
    def __init__(self, status: int, message: str, kind: str = "UnsupportedRequest"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def response(self) -> JSONResponse:
        # A1111's handle_exception shape: {error, detail, body, errors}
        return JSONResponse({"error": self.kind, "detail": self.message, "body": "", "errors": self.message}, status_code=self.status)


def refused(message: str) -> A1111Error:
    return A1111Error(422, message)


def _failure(failure: Failed) -> A1111Error:
    if failure.kind == INVALID:
        return A1111Error(422, failure.message, "ValidationError")
    if failure.kind == QUEUE_FULL:
        return A1111Error(429, failure.message, "QueueFull")
    if failure.kind == UNAVAILABLE:
        return A1111Error(503, failure.message, "ServiceUnavailable")
    return A1111Error(500, failure.message, "RuntimeError")


# ---- what we cannot honour -------------------------------------------------------------------------

def _truthy(value) -> bool:
    return bool(value) and value not in ("None", "none", "0", "false", "False")


REFUSALS = (
    ("enable_hr", _truthy, "hires fix (enable_hr) is not supported: generate at the size you want"),
    ("restore_faces", _truthy, "restore_faces is not supported (no face restoration model)"),
    ("tiling", _truthy, "tiling is not supported"),
    ("script_name", _truthy, "scripts (script_name) are not supported"),
    ("alwayson_scripts", _truthy, "alwayson_scripts (extensions such as ControlNet or ADetailer) are not supported"),
    ("styles", _truthy, "styles are not supported: put the text into the prompt"),
    ("subseed_strength", lambda v: isinstance(v, (int, float)) and v > 0, "variation seeds (subseed_strength > 0) are not supported"),
    ("seed_resize_from_h", lambda v: isinstance(v, (int, float)) and v > 0, "seed_resize_from_h/w is not supported"),
    ("seed_resize_from_w", lambda v: isinstance(v, (int, float)) and v > 0, "seed_resize_from_h/w is not supported"),
    ("refiner_checkpoint", _truthy, "the refiner (refiner_checkpoint) is not supported"),
    ("infotext", _truthy, "infotext parsing is not supported: send the fields themselves"),
    ("mask", _truthy, "masks (inpainting) are not supported: img2img redraws the whole picture"),
)


def _int(body: dict, name: str, default, low: int, high: int):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise A1111Error(422, f"{name} must be an integer in {low}..{high}, got {value!r}", "ValidationError")
    return value


def _float(body: dict, name: str, default, low: float, high: float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise A1111Error(422, f"{name} must be a number in {low:g}..{high:g}, got {value!r}", "ValidationError")
    return float(value)


def _text(body: dict, name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise A1111Error(422, f"{name} must be a string", "ValidationError")
    return value


def _decode_b64_image(value):
    if not isinstance(value, str):
        raise A1111Error(422, "init_images must hold base64 images", "ValidationError")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        data = base64.b64decode(value, validate=False)
        return decode_upload(data)
    except (binascii.Error, ValueError) as e:
        raise A1111Error(422, f"init image: {e}", "ValidationError") from None


def _requested_model(api: ImageApi, body: dict) -> str:
    """override_settings.sd_model_checkpoint, else the server's default model."""
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise A1111Error(422, "override_settings must be an object", "ValidationError")
    wanted = overrides.get("sd_model_checkpoint")
    if wanted:
        model = api.find_model(str(wanted))
        if model is None:
            raise refused(f"checkpoint {wanted!r} not found; GET /sdapi/v1/sd-models lists them")
    else:
        model = api.default_model()
        if model is None:
            raise A1111Error(503, "this server has no models", "ServiceUnavailable")
    return model


def _sampler_scheduler(body: dict, inventory) -> tuple[str, str]:
    from sd3fp8.errors import ConfigError
    from sd3fp8.sampling.aliases import parse_sampler_scheduler

    sampler_name = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    try:
        sampler, scheduler = parse_sampler_scheduler(str(sampler_name), body.get("scheduler") or None)
    except ConfigError as e:
        raise A1111Error(422, str(e), "ValidationError") from None
    scheduler = scheduler or "normal"  # A1111's "Automatic" for SD3 = the model's own schedule
    if sampler not in inventory.samplers or scheduler not in inventory.schedulers:
        raise refused(f"sampler {sampler!r} / scheduler {scheduler!r} is not available here; GET /sdapi/v1/samplers and /schedulers")
    return sampler, scheduler


def _init_image(body: dict):
    """img2img's one init image, decoded; the resize modes we follow."""
    images = body.get("init_images") or []
    if not isinstance(images, list) or not images:
        raise A1111Error(422, "img2img needs init_images (one base64 image)", "ValidationError")
    if len(images) > 1:
        raise refused(f"one init image is supported; {len(images)} were sent")
    init = _decode_b64_image(images[0])
    if body.get("resize_mode", 0) not in (0, 1):
        raise refused("resize_mode 0 (just resize) and 1 (crop and resize) are supported")
    return init


def build_job(api: ImageApi, body: dict, img2img: bool):
    """(job, init image or None) for a txt2img / img2img body."""
    for name, refuse, message in REFUSALS:
        if name in body and refuse(body[name]):
            raise refused(message)
    inventory = api.inventory()
    model = _requested_model(api, body)
    defaults = inventory.defaults[model]
    prompt, negative = _text(body, "prompt"), _text(body, "negative_prompt")
    batch = _int(body, "batch_size", 1, 1, MAX_IMAGES)
    n_iter = _int(body, "n_iter", 1, 1, MAX_IMAGES)
    if batch * n_iter > MAX_IMAGES:
        raise A1111Error(422, f"batch_size x n_iter must be at most {MAX_IMAGES}", "ValidationError")
    seed = body.get("seed", -1)
    if seed is None or seed == -1:
        seed = secrets.randbelow(2**32)
    seed = _int({"seed": seed}, "seed", 0, 0, 2**64 - 1)
    steps = _int(body, "steps", defaults["steps"], 1, 1000)
    cfg = _float(body, "cfg_scale", float(defaults["cfg"]), 0.0, 100.0)
    sampler, scheduler = _sampler_scheduler(body, inventory)
    init = _init_image(body) if img2img else None
    if img2img and body.get("width") is None and body.get("height") is None:
        width, height = aspect_size(*init.size, defaults["width"], defaults["height"])
    else:
        width = _int(body, "width", defaults["width"], 16, MAX_SIDE)
        height = _int(body, "height", defaults["height"], 16, MAX_SIDE)
    if width % 16 or height % 16:
        raise refused(f"width and height must be multiples of 16 (SD3's patch size), got {width}x{height}")
    denoise, init_png = 1.0, None
    if img2img:
        denoise = _float(body, "denoising_strength", DEFAULT_DENOISE, 0.0, 1.0)
        init_png = png_bytes(fit_image(init, width, height, crop=body.get("resize_mode", 0) == 1))
    job = ImageJob(model=model, prompt=prompt, negative=negative, seed=seed, n=batch * n_iter, width=width, height=height, steps=steps,
                   cfg=cfg, sampler=sampler, scheduler=scheduler, denoise=denoise, init_image=init_png, previews=True,
                   save_prefix=SAVE_PREFIX if body.get("save_images") is True else None, source="a1111")
    return job, init


def info(job: ImageJob) -> dict:
    texts = [infotext(job, i) for i in range(job.n)]
    seeds = job.seeds()
    return {
        "prompt": job.prompt, "all_prompts": [job.prompt] * job.n, "negative_prompt": job.negative,
        "all_negative_prompts": [job.negative] * job.n, "seed": seeds[0], "all_seeds": seeds, "subseed": -1,
        "all_subseeds": [-1] * job.n, "subseed_strength": 0, "width": job.width, "height": job.height,
        "sampler_name": A1111_SAMPLERS.get(job.sampler, job.sampler), "cfg_scale": job.cfg, "steps": job.steps,
        "batch_size": job.n, "restore_faces": False, "face_restoration_model": None, "sd_model_name": job.model,
        "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": job.denoise if job.init_image is not None else 0,
        "extra_generation_params": {"Schedule type": A1111_SCHEDULERS.get(job.scheduler, job.scheduler)},
        "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": "sd3fp8",
        "batch_indices": job.batch_indices(),
    }


async def _json_body(request: Request) -> dict:
    """The request's JSON object (an empty body is {}); A1111Error 422 otherwise."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise A1111Error(422, f"the body is not valid JSON: {e}", "ValidationError") from None
    if not isinstance(body, dict):
        raise A1111Error(422, "the body must be a JSON object", "ValidationError")
    return body


async def _generate(request: Request, img2img: bool):
    api = api_of(request)
    try:
        body = await _json_body(request)
        job, init = await asyncio.to_thread(build_job, api, body, img2img)
        result = await api.generate(job, request)
        if isinstance(result, Failed):
            if result.kind == "interrupted":  # A1111 answers an interrupted run normally: no images here
                images = []
            else:
                raise _failure(result)
        else:
            images = result.images
        send = body.get("send_images", True) is not False
        encoded = await asyncio.to_thread(lambda: [b64(encode_image(im, "png", None, infotext(job, i))) for i, im in enumerate(images)]
                                          if send else [])
        if img2img and send and body.get("include_init_images"):
            encoded.append(b64(png_bytes(init)))
        parameters = {**body, "seed": job.seed, "steps": job.steps, "cfg_scale": job.cfg, "width": job.width, "height": job.height}
        if img2img:
            parameters.update(init_images=None, mask=None)  # as A1111 does: not echoed back
        return {"images": encoded, "parameters": parameters, "info": json.dumps(info(job))}
    except A1111Error as e:
        return e.response()


@router.post("/txt2img")
async def txt2img(request: Request):
    return await _generate(request, img2img=False)


@router.post("/img2img")
async def img2img(request: Request):
    return await _generate(request, img2img=True)


# ---- settings and lists ---------------------------------------------------------------------------


@router.get("/options")
async def get_options(request: Request):
    api = api_of(request)
    return {**api.options, "sd_model_checkpoint": api.default_model(), "sd_checkpoint_hash": None, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "eta_noise_seed_delta": 0}


@router.post("/options")
async def set_options(request: Request):
    api = api_of(request)
    try:
        body = await _json_body(request)
        if body.get("sd_model_checkpoint"):
            model = api.find_model(str(body["sd_model_checkpoint"]))
            if model is None:
                raise A1111Error(422, f"checkpoint {body['sd_model_checkpoint']!r} not found; GET /sdapi/v1/sd-models lists them")
            body["sd_model_checkpoint"] = model
        api.options.update(body)
        return None
    except A1111Error as e:
        return e.response()


@router.get("/sd-models")
async def sd_models(request: Request):
    return [{"title": m, "model_name": m.rsplit("/", 1)[-1].rsplit(".", 1)[0], "hash": None, "sha256": None, "filename": m,
             "config": None} for m in api_of(request).inventory().models]


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(request: Request):
    return None


@router.get("/samplers")
async def samplers(request: Request):
    from sd3fp8.sampling.aliases import SAMPLER_ALIASES

    out = []
    for name in api_of(request).inventory().samplers:
        aliases = sorted({a for a, target in SAMPLER_ALIASES.items() if target == name and a != A1111_SAMPLERS.get(name, "").lower()}
                         | {name})
        out.append({"name": A1111_SAMPLERS.get(name, name), "aliases": aliases, "options": {}})
    return out


@router.get("/schedulers")
async def schedulers(request: Request):
    available = api_of(request).inventory().schedulers
    out = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]
    out += [{"name": name, "label": A1111_SCHEDULERS.get(name, name), "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name in available]
    return out


@router.get("/upscalers")
async def upscalers():
    return []


@router.get("/latent-upscale-modes")
async def latent_upscale_modes():
    return []


@router.get("/sd-vae")
async def sd_vae():
    return []


@router.get("/embeddings")
async def embeddings():
    return {"loaded": {}, "skipped": {}}


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False):
    api = api_of(request)
    running = api.tracker.current()
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": api.remaining(),
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if running is None:
        return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None, "current_task": None}
    fraction = running.step / running.total if running.total else 0.0
    elapsed = time.time() - (running.started or time.time())
    eta = elapsed / fraction - elapsed if fraction > 0 else 0
    state.update(job=f"sd3fp8-{running.job.source}", job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(running.queued)),
                 sampling_step=running.step, sampling_steps=running.total)
    image = None
    if not skip_current_image and running.preview is not None:
        preview = running.preview
        image = await asyncio.to_thread(lambda: b64(png_bytes(upscale(preview, running.job.width, running.job.height))))
    return {"progress": round(fraction, 4), "eta_relative": round(eta, 2), "state": state, "current_image": image,
            "textinfo": f"Step {running.step}/{running.total}", "current_task": None}


@router.post("/interrupt")
async def interrupt(request: Request):
    api_of(request).interrupt()
    return {}


@router.post("/skip")
async def skip(request: Request):
    api_of(request).interrupt()  # one image per run here: skipping it is interrupting it
    return {}
