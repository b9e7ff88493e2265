"""OpenAI's Images API (as the `openai` SDK, LibreChat and Open WebUI call it): generations (with
SSE streaming of partial images), edits (img2img), models, and files for `response_format=url`.

Field by field (serving.md §5):
- ``model``: a checkpoint name from /v1/models (or its file stem); absent: the default model;
  unknown: 404 ``model_not_found``.
- ``n`` 1-10: one sampler run with batch n (generations); n runs with seeds seed..seed+n-1 (edits).
- ``size``: ``WxH`` in multiples of 16, 16..4096 per side; ``auto``: the model's default size
  (edits: the model's default pixel count at the input image's aspect).
- ``quality`` -> steps: low 1/2, medium 3/4, high/auto/standard 1x, hd/xhigh 3/2, max 2x the model's
  default steps (an explicit ``steps`` wins).
- ``response_format``: ``b64_json`` (default) or ``url`` (served from /v1/images/files/..., kept
  in memory for an hour). ``output_format`` png (with A1111's parameters chunk) | jpeg | webp;
  ``output_compression`` 0-100 is the JPEG/WebP quality (100 = WebP lossless), ignored for PNG.
- ``background``: opaque/auto; ``transparent`` is refused (the model has no alpha channel).
- ``style``, ``moderation``, ``input_fidelity``: accepted, no effect. ``user`` /
  ``safety_identifier``: kept with the job in the queue.
- extras (``extra_body``): ``seed`` (default random), ``negative_prompt``, ``steps``, ``cfg``,
  ``sampler`` and ``scheduler`` (ComfyUI or A1111 names), ``strength`` (edits: the denoise,
  default 0.75, A1111's img2img default).
- ``stream`` + ``partial_images`` 0-3: SSE ``image_generation.partial_image`` (edits:
  ``image_edit.partial_image``) events from sampler steps evenly spaced through the run (latent2rgb
  previews scaled to the image size), then one ``.completed`` event per image. Errors mid-stream
  are an ``error`` event.
- any other field: 400 ``unknown_parameter`` (OpenAI's own behaviour).
Errors: ``{"error": {message, type, param, code}}``; ``x-should-retry: false`` on every error a
retry cannot fix (everything but 429 queue full and 503 worker lost).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile

from sd3fp8.server.imageapi import (
    MIME,
    ImageApi,
    api_of,
    b64,
    decode_upload,
    encode_image,
    infotext,
    upscale,
)
from sd3fp8.server.imagejobs import (
    Failed,
    Finished,
    ImageJob,
    Preview,
)
from sd3fp8.server.openai_request import OpenAIError, Reply, build_job, from_failure, invalid

router = APIRouter()
log = logging.getLogger(__name__)

# ---- responses --------------------------------------------------------------------------------------


def _encode(job: ImageJob, reply: Reply, image, index: int) -> bytes:
    text = infotext(job, index) if reply.output_format == "png" else None
    return encode_image(image, reply.output_format, reply.compression, text)


def render(api: ImageApi, job: ImageJob, reply: Reply, result: Finished, base_url: str) -> dict:
    """The ImagesResponse body for a finished job."""
    data = []
    for index, image in enumerate(result.images):
        encoded = _encode(job, reply, image, index)
        if reply.response_format == "url":
            name = api.store.put(encoded, reply.output_format)
            data.append({"url": f"{base_url.rstrip('/')}/v1/images/files/{name}", "revised_prompt": job.prompt})
        else:
            data.append({"b64_json": b64(encoded), "revised_prompt": job.prompt})
    return {"created": int(time.time()), "data": data, "background": "opaque", "output_format": reply.output_format,
            "quality": reply.quality, "size": f"{job.width}x{job.height}", "usage": reply.usage(job, len(data)),
            "seed": job.seed}


def partial_steps(total: int, count: int) -> set[int]:
    """The sampler steps whose previews become the ``count`` partial images: evenly spaced."""
    return {max(1, round(k * total / (count + 1))) for k in range(1, count + 1)}


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def stream_events(api: ImageApi, job: ImageJob, reply: Reply):
    """SSE: partial images from sampler previews, then one completed event per image (or an error)."""
    sent, chosen = 0, None
    common = {"background": "opaque", "output_format": reply.output_format, "quality": reply.quality, "size": f"{job.width}x{job.height}"}
    async with aclosing(api.events(job)) as events:
        async for event in events:
            if isinstance(event, Preview) and event.branch == 0 and sent < reply.partial_images:
                chosen = chosen if chosen is not None else partial_steps(event.total, reply.partial_images)
                if event.step in chosen:
                    encoded = await asyncio.to_thread(encode_image, upscale(event.image, job.width, job.height), reply.output_format,
                                                      reply.compression)
                    yield _sse(f"{reply.events}.partial_image", {"type": f"{reply.events}.partial_image", "b64_json": b64(encoded),
                                                                 "created_at": int(time.time()), "partial_image_index": sent, **common})
                    sent += 1
            elif isinstance(event, Finished):
                for index, image in enumerate(event.images):
                    encoded = await asyncio.to_thread(_encode, job, reply, image, index)
                    yield _sse(f"{reply.events}.completed", {"type": f"{reply.events}.completed", "b64_json": b64(encoded),
                                                             "created_at": int(time.time()), "usage": reply.usage(job, 1), **common})
            elif isinstance(event, Failed):
                yield _sse("error", {"type": "error", **from_failure(event).body()})


async def respond(request: Request, job: ImageJob, reply: Reply):
    api = api_of(request)
    if reply.stream:
        return StreamingResponse(stream_events(api, job, reply), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-sd3fp8-seed": str(job.seed)})
    result = await api.generate(job, request)
    if isinstance(result, Failed):
        raise from_failure(result)
    body = await asyncio.to_thread(render, api, job, reply, result, str(request.base_url))
    headers = {"x-sd3fp8-seed": str(job.seed)}
    if result.worker:
        headers["x-sd3fp8-worker"] = result.worker
    return JSONResponse(body, headers=headers)


async def _json_object(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object", code="invalid_json")
    return body


# ---- routes ---------------------------------------------------------------------------------------

STARTED = int(time.time())


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": "sd3fp8"}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model(m) for m in api_of(request).inventory().models]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    name = api_of(request).find_model(model_id)
    if name is None:
        return OpenAIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found").response()
    return _model(name)


@router.post("/v1/images/generations")
async def generations(request: Request):
    try:
        body = await _json_object(request)
        job, reply = await asyncio.to_thread(build_job, api_of(request), body)
        return await respond(request, job, reply)
    except OpenAIError as e:
        return e.response()
    except Exception:  # noqa: BLE001 - a bug: logged, answered in OpenAI's shape
        log.exception("POST /v1/images/generations failed")
        return OpenAIError(500, "internal server error; see the server log", code="internal_error", kind="server_error").response()


@router.post("/v1/images/edits")
async def edits(request: Request):
    try:
        if "multipart/form-data" not in request.headers.get("content-type", ""):
            raise invalid("an edit is a multipart/form-data request with the picture in 'image' (or 'image[]')", "image")
        form = await request.form()
        try:
            if form.getlist("mask"):
                raise invalid("'mask' is not supported: sd3fp8 has no inpainting (an edit redraws the whole picture from it); "
                              "send the image without a mask", "mask", "unsupported_parameter")
            uploads = form.getlist("image") + form.getlist("image[]")
            if not uploads:
                raise invalid("Missing required parameter: 'image' (or 'image[]').", "image", "missing_required_parameter")
            if len(uploads) > 1:
                raise invalid(f"an edit takes one image here (img2img from it); {len(uploads)} were sent", "image")
            if not isinstance(uploads[0], UploadFile):
                raise invalid("'image' must be a file", "image")
            data = await uploads[0].read()
            fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]", "mask")}
        finally:
            await form.close()
        try:
            init = await asyncio.to_thread(decode_upload, data)
        except ValueError as e:
            raise invalid(str(e), "image", "invalid_image") from None
        job, reply = await asyncio.to_thread(build_job, api_of(request), fields, init)
        return await respond(request, job, reply)
    except OpenAIError as e:
        return e.response()
    except Exception:  # noqa: BLE001 - a bug: logged, answered in OpenAI's shape
        log.exception("POST /v1/images/edits failed")
        return OpenAIError(500, "internal server error; see the server log", code="internal_error", kind="server_error").response()


@router.get("/v1/images/files/{name}")
async def image_file(request: Request, name: str):
    data = api_of(request).store.get(name)
    if data is None:
        return OpenAIError(404, "no such image (images for response_format=url are kept for an hour)", code="not_found").response()
    return Response(data, media_type=MIME.get(name.rsplit(".", 1)[-1], "application/octet-stream"),
                    headers={"cache-control": "private, max-age=3600"})
