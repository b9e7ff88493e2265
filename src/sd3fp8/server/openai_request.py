"""OpenAI Images requests: the fields of generations and edits checked one by one (the rules are in
server/openai_api.py's docstring), the :class:`ImageJob` they become and the :class:`Reply`
options, and OpenAI's error shape."""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from sd3fp8.server.imageapi import (
    DEFAULT_SAMPLER,
    DEFAULT_SCHEDULER,
    MAX_SIDE,
    ImageApi,
    aspect_size,
    fit_image,
    png_bytes,
)
from sd3fp8.server.imagejobs import (
    INTERRUPTED,
    INVALID,
    OUT_OF_MEMORY,
    QUEUE_FULL,
    UNAVAILABLE,
    Failed,
    ImageJob,
)

router = APIRouter()
log = logging.getLogger(__name__)

MAX_N = 10
MAX_PROMPT = 32000  # characters, OpenAI's limit for GPT image models
DEFAULT_STRENGTH = 0.75
QUALITY_STEPS = {"low": 0.5, "medium": 0.75, "high": 1.0, "auto": 1.0, "standard": 1.0, "hd": 1.5, "xhigh": 1.5, "max": 2.0}
QUALITY_NAME = {"auto": "high", "standard": "high", "hd": "xhigh"}
OUTPUT_FORMATS = ("png", "jpeg", "webp")
COMMON_FIELDS = {"prompt", "model", "n", "size", "quality", "response_format", "output_format", "output_compression", "background",
                 "user", "safety_identifier", "stream", "partial_images", "moderation", "style",
                 "seed", "negative_prompt", "steps", "cfg", "sampler", "scheduler"}
EDIT_FIELDS = COMMON_FIELDS | {"strength", "input_fidelity"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.retry = status, message, param, code, kind, retry

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers={} if self.retry else {"x-should-retry": "false"})


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param, code)


def from_failure(failure: Failed) -> OpenAIError:
    if failure.kind == INVALID:
        return invalid(failure.message, failure.param)
    if failure.kind == QUEUE_FULL:
        return OpenAIError(429, failure.message, code="queue_full", kind="rate_limit_error", retry=True)
    if failure.kind == UNAVAILABLE:
        return OpenAIError(503, failure.message, code="worker_unavailable", kind="server_error", retry=True)
    if failure.kind == OUT_OF_MEMORY:
        return OpenAIError(500, failure.message, code="out_of_memory", kind="server_error")
    if failure.kind == INTERRUPTED:
        return OpenAIError(500, failure.message, code="interrupted", kind="server_error")
    return OpenAIError(500, failure.message, code="generation_failed", kind="server_error")


# ---- field parsing ----------------------------------------------------------------------------------


def _int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise invalid(f"'{name}' must be an integer, got {value!r}", name) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise invalid(f"'{name}' must be in {low}..{high}, got {value}", name)
    return value


def _float(value, name: str, low: float, high: float) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise invalid(f"'{name}' must be a number, got {value!r}", name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise invalid(f"'{name}' must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise invalid(f"'{name}' must be in {low:g}..{high:g}, got {value:g}", name)
    return float(value)


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise invalid(f"'{name}' must be a boolean, got {value!r}", name)


def _str(value, name: str, choices: tuple | None = None) -> str:
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a string, got {value!r}", name)
    if choices is not None and value not in choices:
        raise invalid(f"Invalid value for '{name}': {value!r}. Supported values are: {', '.join(repr(c) for c in choices)}.", name)
    return value


def parse_size(value: str) -> tuple[int, int] | None:
    """(width, height) of "WxH", or None for "auto"."""
    value = _str(value, "size").strip().lower()
    if value == "auto":
        return None
    match = re.fullmatch(r"(\d{1,5})\s*x\s*(\d{1,5})", value)
    if not match:
        raise invalid(f"Invalid size {value!r}: expected 'WIDTHxHEIGHT' (for example '1024x1024') or 'auto'", "size")
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        if side % 16 or not 16 <= side <= MAX_SIDE:
            raise invalid(f"Invalid size {value!r}: width and height must be multiples of 16 in 16..{MAX_SIDE}", "size")
    return width, height


@dataclass(frozen=True)
class Reply:
    """How the images go back (everything of the request that is not the job itself)."""

    response_format: str
    output_format: str
    compression: int | None
    quality: str
    stream: bool
    partial_images: int
    events: str  # SSE event prefix: image_generation | image_edit
    text_tokens: int
    image_tokens: int

    def usage(self, job: ImageJob, images: int) -> dict:
        output = images * (job.width // 16) * (job.height // 16)  # the MMDiT's image tokens
        prompt = self.text_tokens + self.image_tokens
        return {"input_tokens": prompt, "input_tokens_details": {"image_tokens": self.image_tokens, "text_tokens": self.text_tokens},
                "output_tokens": output, "total_tokens": prompt + output}


def _requested_model(api: ImageApi, fields: dict) -> str:
    """The model a request names (a file name or its stem), else the server's default."""
    if fields.get("model") is None:
        model = api.default_model()
        if model is None:
            raise OpenAIError(404, "this server has no models", "model", "model_not_found")
        return model
    model = api.find_model(_str(fields["model"], "model"))
    if model is None:
        raise OpenAIError(404, f"The model '{fields['model']}' does not exist (GET /v1/models lists this server's models)",
                          "model", "model_not_found")
    return model


def _sampling(fields: dict, defaults: dict, inventory) -> tuple[int, float, str, str, str]:
    """steps, cfg, sampler, scheduler and the quality name; omitted ones from the model's defaults."""
    from sd3fp8.errors import ConfigError
    from sd3fp8.sampling.aliases import parse_sampler, parse_scheduler

    quality = _str(fields.get("quality", "auto"), "quality", tuple(QUALITY_STEPS))
    if fields.get("steps") is not None:
        steps = _int(fields["steps"], "steps", 1, 1000)
    else:
        steps = max(1, round(defaults["steps"] * QUALITY_STEPS[quality]))
    cfg = _float(fields["cfg"], "cfg", 0.0, 100.0) if fields.get("cfg") is not None else float(defaults["cfg"])
    try:
        sampler = parse_sampler(_str(fields.get("sampler", DEFAULT_SAMPLER), "sampler"))
    except ConfigError as e:
        raise invalid(str(e), "sampler") from None
    try:
        scheduler = parse_scheduler(_str(fields.get("scheduler", DEFAULT_SCHEDULER), "scheduler"))
    except ConfigError as e:
        raise invalid(str(e), "scheduler") from None
    if sampler not in inventory.samplers:
        raise invalid(f"sampler {sampler!r} is not available here; available: {', '.join(inventory.samplers)}", "sampler")
    if scheduler not in inventory.schedulers:
        raise invalid(f"scheduler {scheduler!r} is not available here; available: {', '.join(inventory.schedulers)}", "scheduler")
    return steps, cfg, sampler, scheduler, quality


def _output(fields: dict) -> tuple[str, str, int | None, str | None, bool, int]:
    """response_format, output_format, compression, user, stream, partial_images; the accepted
    fields we do not act on are still type-checked."""
    response_format = _str(fields.get("response_format", "b64_json"), "response_format", ("b64_json", "url"))
    output_format = _str(fields.get("output_format", "png"), "output_format", OUTPUT_FORMATS)
    compression = _int(fields["output_compression"], "output_compression", 0, 100) if fields.get("output_compression") is not None else None
    background = _str(fields.get("background", "auto"), "background")
    if background == "transparent":
        raise invalid("background 'transparent' is not supported: the model makes opaque RGB images (no alpha channel); "
                      "use 'opaque' or 'auto'", "background", "unsupported_value")
    _str(background, "background", ("opaque", "auto"))
    for name in ("style", "moderation", "input_fidelity"):
        if fields.get(name) is not None:
            _str(fields[name], name)
    user = fields.get("safety_identifier") or fields.get("user")
    if user is not None:
        user = _str(user, "safety_identifier" if fields.get("safety_identifier") else "user")[:256]
    stream = _bool(fields.get("stream", False), "stream")
    partial_images = _int(fields.get("partial_images", 0), "partial_images", 0, 3)
    return response_format, output_format, compression, user, stream, partial_images


def build_job(api: ImageApi, fields: dict, init=None) -> tuple[ImageJob, Reply]:
    """The job and reply options of a generations (``init`` None) or edits request; OpenAIError
    naming the field otherwise."""
    edit = init is not None
    unknown = sorted(set(fields) - (EDIT_FIELDS if edit else COMMON_FIELDS))
    if unknown:
        raise invalid(f"Unknown parameter: '{unknown[0]}'.", unknown[0], "unknown_parameter")
    if "prompt" not in fields:
        raise invalid("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    prompt = _str(fields["prompt"], "prompt")
    if not prompt.strip() or len(prompt) > MAX_PROMPT:
        raise invalid(f"'prompt' must be a non-empty string of at most {MAX_PROMPT} characters", "prompt")
    inventory = api.inventory()
    model = _requested_model(api, fields)
    defaults = inventory.defaults[model]
    n = _int(fields.get("n", 1), "n", 1, MAX_N)
    size = parse_size(fields.get("size", "auto"))
    if size is None:
        size = aspect_size(*init.size, defaults["width"], defaults["height"]) if edit else (defaults["width"], defaults["height"])
    width, height = size
    steps, cfg, sampler, scheduler, quality = _sampling(fields, defaults, inventory)
    seed = _int(fields["seed"], "seed", 0, 2**64 - 1) if fields.get("seed") is not None else secrets.randbelow(2**32)
    negative = _str(fields.get("negative_prompt", ""), "negative_prompt")
    response_format, output_format, compression, user, stream, partial_images = _output(fields)
    denoise, init_png, image_tokens = 1.0, None, 0
    if edit:
        denoise = _float(fields.get("strength", DEFAULT_STRENGTH), "strength", 0.0, 1.0)
        init_png = png_bytes(fit_image(init, width, height))
        image_tokens = (width // 16) * (height // 16)
    job = ImageJob(model=model, prompt=prompt, negative=negative, seed=seed, n=n, width=width, height=height, steps=steps, cfg=cfg,
                   sampler=sampler, scheduler=scheduler, denoise=denoise, init_image=init_png, previews=stream and partial_images > 0,
                   source="openai", user=user)
    reply = Reply(response_format, output_format, compression, QUALITY_NAME.get(quality, quality), stream, partial_images,
                  "image_edit" if edit else "image_generation", len(prompt.split()), image_tokens)
    return job, reply


