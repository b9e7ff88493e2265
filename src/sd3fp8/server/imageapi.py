"""What the OpenAI and A1111 routes share: the model inventory and defaults, the runner the jobs go
to, the progress of running jobs (A1111's /progress), images kept for `response_format=url`, and
the image encoding (PNG with A1111's `parameters` chunk, JPEG, WebP).

One :class:`ImageApi` per app: ``install(app, state)`` puts it on ``sd3fp8 serve``'s app over the
shared queue; the Ray ingress builds one over its replicas (sd3fp8.scale.ray_serve).
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from PIL import Image, PngImagePlugin

import sd3fp8
from sd3fp8.server.imagejobs import EXECUTION, TERMINAL, Failed, Finished, ImageJob, Preview, Progress, Started

MAX_SIDE = 4096  # = sd3fp8.engine.request.MAX_SIDE (not imported: the ingress needs no engine)
MAX_PIXELS = MAX_SIDE * MAX_SIDE
DEFAULT_SAMPLER, DEFAULT_SCHEDULER = "euler", "normal"  # the engine's (GenerationRequest) defaults
FALLBACK_DEFAULTS = {"steps": 28, "cfg": 4.5, "width": 1024, "height": 1024}  # SD3.5's usual recipe (engine Recipe)
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


# ---- inventory --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inventory:
    """Models (checkpoint names), each one's defaults, and the sampler/scheduler names."""

    models: tuple[str, ...]
    defaults: dict  # model -> {"steps", "cfg", "width", "height"}
    samplers: tuple[str, ...]
    schedulers: tuple[str, ...]

    @classmethod
    def of_backend(cls, backend) -> Inventory:
        models = tuple(backend.model_files("checkpoints"))
        defaults_of = getattr(backend, "model_defaults", None)
        defaults = {m: {**FALLBACK_DEFAULTS, **(defaults_of(m) if callable(defaults_of) else {})} for m in models}
        return cls(models, defaults, tuple(backend.sampler_names()), tuple(backend.scheduler_names()))

    def to_dict(self) -> dict:
        return {"models": list(self.models), "defaults": self.defaults, "samplers": list(self.samplers),
                "schedulers": list(self.schedulers)}

    @classmethod
    def from_dict(cls, data: dict) -> Inventory:
        return cls(tuple(data["models"]), dict(data["defaults"]), tuple(data["samplers"]), tuple(data["schedulers"]))


# ---- progress (A1111 /progress) --------------------------------------------------------------------


@dataclass
class _Running:
    job: ImageJob
    queued: float
    started: float | None = None
    step: int = 0
    total: int = 0
    preview: Image.Image | None = None


class ProgressTracker:
    """The API jobs in flight: which runs, its step, its latest preview."""

    def __init__(self) -> None:
        self._jobs: dict[int, _Running] = {}
        self._lock = threading.Lock()

    def begin(self, key: int, job: ImageJob) -> None:
        with self._lock:
            self._jobs[key] = _Running(job, time.time())

    def update(self, key: int, event) -> None:
        with self._lock:
            running = self._jobs.get(key)
            if running is None:
                return
            if isinstance(event, Started):
                running.started = time.time()
            elif isinstance(event, Progress):
                running.started = running.started or time.time()
                running.step, running.total = event.step, event.total
            elif isinstance(event, Preview):
                running.preview = event.image

    def end(self, key: int) -> None:
        with self._lock:
            self._jobs.pop(key, None)

    def current(self) -> _Running | None:
        """The job running longest (None when none runs)."""
        with self._lock:
            running = [r for r in self._jobs.values() if r.started is not None]
            return min(running, key=lambda r: r.started) if running else None


# ---- images for response_format=url ----------------------------------------------------------------


class ImageStore:
    """Encoded images kept in memory for a while, by unguessable name (``{token}.{ext}``)."""

    def __init__(self, max_items: int = 256, max_bytes: int = 256 * 2**20, ttl: float = 3600.0):
        self.max_items, self.max_bytes, self.ttl = max_items, max_bytes, ttl
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, ext: str) -> str:
        name = f"{secrets.token_urlsafe(24)}.{ext}"
        with self._lock:
            self._items[name] = (data, time.monotonic() + self.ttl)
            self._bytes += len(data)
            self._evict()
        return name

    def get(self, name: str) -> bytes | None:
        with self._lock:
            self._evict()
            item = self._items.get(name)
            return item[0] if item else None

    def _evict(self) -> None:
        now = time.monotonic()
        while self._items:
            name, (data, expires) = next(iter(self._items.items()))
            if expires > now and len(self._items) <= self.max_items and self._bytes <= self.max_bytes:
                break
            del self._items[name]
            self._bytes -= len(data)


# ---- encoding -------------------------------------------------------------------------------------


def encode_image(image: Image.Image, fmt: str = "png", quality: int | None = None, infotext: str | None = None) -> bytes:
    """``image`` as png (with A1111's `parameters` text chunk), jpeg or webp (``quality`` 0-100)."""
    buffer = io.BytesIO()
    image = image.convert("RGB")
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if infotext:
            info.add_text("parameters", infotext)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=100 if quality is None else max(1, quality))
    elif fmt == "webp":
        q = 100 if quality is None else quality
        image.save(buffer, format="WEBP", quality=q, lossless=q == 100)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def upscale(preview: Image.Image, width: int, height: int) -> Image.Image:
    """A latent-sized preview (latent2rgb, 1/8 of the image per side) at the image's size."""
    return preview.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


def fit_image(image: Image.Image, width: int, height: int, crop: bool = True) -> Image.Image:
    """``image`` at width x height: scaled to cover and centre-cropped (``crop``), else stretched."""
    if not crop:
        return image.resize((width, height), Image.Resampling.LANCZOS) if image.size != (width, height) else image
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def aspect_size(width: int, height: int, default_width: int, default_height: int) -> tuple[int, int]:
    """About the model's default pixel count at the aspect of width x height, in multiples of 16
    (of the sizes next to the exact one, the closest in aspect, then in pixel count)."""
    area, ratio = default_width * default_height, width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    scale = min(1.0, MAX_SIDE / max(w, h))
    w, h = w * scale, h * scale
    candidates = [(cw, ch) for cw in {max(16, math.floor(w / 16) * 16), max(16, math.ceil(w / 16) * 16)}
                  for ch in {max(16, math.floor(h / 16) * 16), max(16, math.ceil(h / 16) * 16)}]
    return min(candidates, key=lambda c: (round(abs(math.log(c[0] / c[1] / ratio)), 6), abs(c[0] * c[1] - w * h), c))


def decode_upload(data: bytes) -> Image.Image:
    """An uploaded picture as RGB (EXIF orientation applied, transparency on white); ValueError
    when it is not a readable image or absurdly large."""
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise ValueError(f"the image is {opened.width}x{opened.height}: more than {MAX_SIDE}x{MAX_SIDE} pixels")
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"the image cannot be read: {e}") from None
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ---- A1111 names and infotext --------------------------------------------------------------------

# ComfyUI sampler -> A1111's display name (sd_samplers_kdiffusion); others show their ComfyUI name
A1111_SAMPLERS = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
                  "dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE",
                  "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM", "lcm": "LCM",
                  "uni_pc": "UniPC"}
# ComfyUI scheduler -> A1111's label (sd_schedulers)
A1111_SCHEDULERS = {"normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
                    "simple": "Simple", "beta": "Beta", "kl_optimal": "KL Optimal", "ddim_uniform": "DDIM",
                    "linear_quadratic": "Linear Quadratic"}


def infotext(job: ImageJob, index: int) -> str:
    """A1111's generation-parameters text for image ``index`` of ``job``."""
    seed, batch_index = job.seeds()[index], job.batch_indices()[index]
    lines = [job.prompt]
    if job.negative:
        lines.append(f"Negative prompt: {job.negative}")
    params = [f"Steps: {job.steps}", f"Sampler: {A1111_SAMPLERS.get(job.sampler, job.sampler)}",
              f"Schedule type: {A1111_SCHEDULERS.get(job.scheduler, job.scheduler)}", f"CFG scale: {job.cfg:g}", f"Seed: {seed}",
              f"Size: {job.width}x{job.height}", f"Model: {job.model}"]
    if job.init_image is not None:
        params.append(f"Denoising strength: {job.denoise:g}")
    if batch_index:
        params.append(f"Batch index: {batch_index}")  # ComfyUI noise: draw `batch_index` of the seed's generator
    params.append(f"Version: sd3fp8 {sd3fp8.__version__}")
    lines.append(", ".join(params))
    return "\n".join(lines)


# ---- the service -----------------------------------------------------------------------------------


@dataclass
class ImageApi:
    """``runner.run(job)`` yields job events; ``inventory()`` the models; ``interrupt()`` stops
    what runs (A1111); ``remaining()`` counts jobs waiting or running (all of the server's)."""

    runner: object
    inventory: Callable[[], Inventory]
    interrupt: Callable[[], bool]
    remaining: Callable[[], int]
    store: ImageStore = field(default_factory=ImageStore)
    tracker: ProgressTracker = field(default_factory=ProgressTracker)
    options: dict = field(default_factory=dict)  # A1111 options set by clients

    def default_model(self) -> str | None:
        models = self.inventory().models
        chosen = self.options.get("sd_model_checkpoint")
        return chosen if chosen in models else (models[0] if models else None)

    def find_model(self, name: str) -> str | None:
        """A model by its id, or its file stem (`x` for `x.safetensors`), or A1111's title `x [hash]`."""
        models = self.inventory().models
        if name in models:
            return name
        base = name.rsplit(" [", 1)[0] if name.endswith("]") else name
        matches = [m for m in models if base in (m, m.rsplit(".", 1)[0], m.rsplit("/", 1)[-1], m.rsplit("/", 1)[-1].rsplit(".", 1)[0])]
        return matches[0] if len(matches) == 1 else None

    async def events(self, job: ImageJob) -> AsyncIterator:
        """The job's events, tracked for /progress; ends after Finished or Failed."""
        key = next(_KEYS)
        self.tracker.begin(key, job)
        try:
            async with aclosing(self.runner.run(job)) as events:
                async for event in events:
                    self.tracker.update(key, event)
                    yield event
                    if isinstance(event, TERMINAL):
                        return
            yield Failed(EXECUTION, "the job ended without a result")
        finally:
            self.tracker.end(key)

    async def generate(self, job: ImageJob, request=None) -> Finished | Failed:
        """Run ``job`` to its end; when ``request`` (Starlette) disconnects first, the job is dropped."""
        async def consume():
            async with aclosing(self.events(job)) as events:
                async for event in events:
                    if isinstance(event, TERMINAL):
                        return event
            return Failed(EXECUTION, "the job ended without a result")

        if request is None:
            return await consume()
        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if not done and await request.is_disconnected():
                    task.cancel()
                    break
            return await task
        finally:
            if not task.done():
                task.cancel()


_KEYS = itertools.count()


def api_of(request) -> ImageApi:
    return request.app.state.sd3fp8_api


def install(app, state) -> ImageApi:
    """The OpenAI and A1111 routes on ``sd3fp8 serve``'s app, their jobs in its queue."""
    from sd3fp8.server import a1111_api, openai_api
    from sd3fp8.server.imagejobs import QueueRunner

    api = ImageApi(runner=QueueRunner(state), inventory=lambda: Inventory.of_backend(state.backend),
                   interrupt=lambda: state.worker.interrupt(), remaining=state.queue.remaining)
    app.state.sd3fp8_api = api
    app.include_router(openai_api.router)
    app.include_router(a1111_api.router)
    return api


def build_app(api: ImageApi, token: str | None = None, max_body: int = 100 * 2**20, lifespan=None):
    """A FastAPI app with only the OpenAI and A1111 routes over ``api`` (the Ray ingress), behind
    the same guards as ``sd3fp8 serve`` (loopback Origin check, bearer token, body limit)."""
    from fastapi import FastAPI

    from sd3fp8.server import a1111_api, openai_api
    from sd3fp8.server.security import Guard

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="sd3fp8", lifespan=lifespan)
    app.state.sd3fp8_api = api
    app.include_router(openai_api.router)
    app.include_router(a1111_api.router)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    app.add_middleware(Guard, token=token, max_body=max_body)
    return app


def dumps(data) -> str:
    return json.dumps(data, ensure_ascii=False)
