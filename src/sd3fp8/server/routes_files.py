"""Image files: GET /view and POST /upload/image, confined to the input/output/temp folders."""

from __future__ import annotations

import hashlib
import io
import mimetypes
import os
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from sd3fp8.io.atomic import atomic_write
from sd3fp8.workflow.paths import PathEscape, confined, split_annotation

router = APIRouter()
_INLINE_TYPES = ("image/", "video/", "audio/")  # everything else is sent as a download (no stored XSS)


def _state(request: Request):
    return request.app.state.sd3fp8


def _view_path(folders, query) -> Path | Response:
    name = query.get("filename")
    if not name:
        return Response(status_code=404)
    name, annotated = split_annotation(name, default="")
    if name.startswith(("/", "\\")) or ".." in name or os.path.isabs(name):
        return Response(status_code=400)
    root = folders.by_type(annotated or query.get("type", "output"))
    if root is None:
        return Response(status_code=400)
    try:
        folder = confined(root, query.get("subfolder", ""))
        path = confined(folder, os.path.basename(name))
    except PathEscape:
        return Response(status_code=403)
    return path if path.is_file() else Response(status_code=404)


def _converted(path: Path, preview: str | None, channel: str | None) -> Response | None:
    """ComfyUI's `preview=webp;90` / `channel=rgb|a` variants of an image, or None for the file."""
    if preview is None and channel in (None, "rgba"):
        return None
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, UnidentifiedImageError):
        return Response(status_code=415)
    if channel == "a":
        alpha = image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)
        image = Image.new("RGBA", image.size)
        image.putalpha(alpha)
    elif channel == "rgb" or (preview or "").startswith("jpeg"):
        image = image.convert("RGB")
    fmt, quality = "png", 90
    if preview:
        parts = preview.split(";")
        fmt = parts[0] if parts[0] in ("webp", "jpeg") and channel != "a" else "webp"
        quality = int(parts[-1]) if parts[-1].isdigit() else 90
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper(), quality=quality)
    name = path.name.rsplit(".", 1)[0] + "." + fmt
    return Response(buffer.getvalue(), media_type=f"image/{fmt}", headers={"Content-Disposition": f'filename="{name}"'})


@router.get("/view")
async def view(request: Request):
    query = request.query_params
    path = _view_path(_state(request).folders, query)
    if isinstance(path, Response):
        return path
    converted = await run_in_threadpool(_converted, path, query.get("preview"), query.get("channel"))
    if converted is not None:
        return converted
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    inline = media_type.startswith(_INLINE_TYPES) and media_type != "image/svg+xml"
    headers = {"Content-Disposition": f'{"" if inline else "attachment; "}filename="{path.name}"',
               "X-Content-Type-Options": "nosniff"}
    return FileResponse(path, media_type=media_type if inline else "application/octet-stream", headers=headers)


def _digest_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def store_upload(root: Path, subfolder: str, filename: str, data: bytes, overwrite: bool) -> str:
    """Write an upload under root/subfolder; return the name used: the same name when overwriting
    or when an identical file is there, else ComfyUI's `name (1).ext` for a different one."""
    folder = confined(root, subfolder)
    path = confined(folder, filename)
    if path.parent != folder:
        raise PathEscape("a file name may not contain a folder")
    stem, suffix = os.path.splitext(filename)
    digest = hashlib.sha256(data).hexdigest()
    i = 1
    while not overwrite and path.exists():
        if path.is_file() and _digest_file(path) == digest:
            return path.name  # identical: reuse
        path = folder / f"{stem} ({i}){suffix}"
        i += 1
    with atomic_write(path) as f:
        f.write(data)
    return path.name


@router.post("/upload/image")
async def upload_image(request: Request):
    state = _state(request)
    form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
    image = form.get("image")
    if image is None or isinstance(image, str) or not image.filename:
        return Response(status_code=400)
    kind = form.get("type") or "input"
    root = state.folders.by_type(kind)
    if root is None:
        return Response(status_code=400)
    subfolder = str(form.get("subfolder") or "")
    overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
    data = await image.read(state.config.max_upload_size + 1)
    if len(data) > state.config.max_upload_size:
        return Response(status_code=413)
    try:
        name = await run_in_threadpool(store_upload, root, subfolder, image.filename, data, overwrite)
    except PathEscape:
        return Response(status_code=400)
    return {"name": name, "subfolder": subfolder, "type": kind}
