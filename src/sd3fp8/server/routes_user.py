"""The frontend's per-user storage (single user): /users, /settings and /userdata, all confined to
the user folder (ComfyUI app/user_manager.py and app/app_settings.py, v0.8.0)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from sd3fp8.io.atomic import atomic_write
from sd3fp8.server.routes_jobs import BadRequest, json_body
from sd3fp8.workflow.paths import PathEscape, confined

router = APIRouter()
SETTINGS_FILE = "comfy.settings.json"
_settings_lock = threading.Lock()


def _user_root(request: Request) -> Path:
    return request.app.state.sd3fp8.config.user


@router.get("/users")
async def get_users(request: Request):
    return {"storage": "server", "migrated": _user_root(request).is_dir()}


@router.post("/users")
async def post_users():
    return JSONResponse({"error": "this server has a single user"}, status_code=400)


def _read_settings(root: Path) -> dict:
    try:
        data = json.loads((root / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _update_settings(root: Path, changes: dict) -> None:
    with _settings_lock:
        settings = {**_read_settings(root), **changes}
        with atomic_write(root / SETTINGS_FILE, "w") as f:
            json.dump(settings, f, indent=4)


@router.get("/settings")
async def get_settings(request: Request):
    return await run_in_threadpool(_read_settings, _user_root(request))


@router.get("/settings/{setting_id}")
async def get_setting(request: Request, setting_id: str):
    return JSONResponse((await run_in_threadpool(_read_settings, _user_root(request))).get(setting_id))


@router.post("/settings")
async def post_settings(request: Request):
    body = await json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("settings must be a JSON object")
    await run_in_threadpool(_update_settings, _user_root(request), body)
    return Response(status_code=200)


@router.post("/settings/{setting_id}")
async def post_setting(request: Request, setting_id: str):
    value = await json_body(request)
    await run_in_threadpool(_update_settings, _user_root(request), {setting_id: value})
    return Response(status_code=200)


def _file_info(path: Path, root: Path) -> dict:
    stat = path.stat()
    return {"path": path.relative_to(root).as_posix(), "size": stat.st_size, "modified": int(stat.st_mtime * 1000),
            "created": int(stat.st_ctime * 1000)}


def _list(root: Path, directory: str, recurse: bool, full_info: bool, split: bool):
    try:
        folder = confined(root, directory)
    except PathEscape:
        return Response(status_code=403)
    if not folder.is_dir():
        return Response("Directory not found", status_code=404)
    files = sorted(p for p in (folder.rglob("*") if recurse else folder.glob("*")) if p.is_file())
    if full_info:
        return [_file_info(p, folder) for p in files]
    names = [p.relative_to(folder).as_posix() for p in files]
    return [[n, *n.split("/")] for n in names] if split else names


@router.get("/userdata")
async def list_userdata(request: Request):
    q = request.query_params
    if not q.get("dir"):
        return Response("Directory not provided", status_code=400)
    flag = {k: q.get(k, "").lower() == "true" for k in ("recurse", "full_info", "split")}
    return await run_in_threadpool(_list, _user_root(request), q["dir"], flag["recurse"], flag["full_info"], flag["split"])


@router.get("/v2/userdata")
async def list_userdata_v2(request: Request):
    root = _user_root(request)

    def listing():
        try:
            folder = confined(root, unquote(request.query_params.get("path", "")))
        except PathEscape:
            return Response("Invalid path requested", status_code=400)
        if not folder.exists():
            return [] if folder == root.resolve() else Response("Requested path not found", status_code=404)
        entries = [{"name": p.name, "path": p.relative_to(root.resolve()).as_posix(), "type": "directory" if p.is_dir() else "file",
                    **({"size": p.stat().st_size, "modified": p.stat().st_mtime} if p.is_file() else {})} for p in folder.rglob("*")]
        return sorted(entries, key=lambda e: (e["type"] != "directory", e["name"].lower()))

    return await run_in_threadpool(listing)


def _raw_parts(request: Request) -> list[str]:
    """The path after /userdata/ split on raw slashes, each part percent-decoded (so a file named
    `workflows%2Fa.json` and the `/move/` separator stay apart)."""
    raw = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1").split("?")[0]
    marker = "/userdata/"
    return [unquote(p) for p in raw[raw.index(marker) + len(marker):].split("/")]


def _target(request: Request, parts: list[str]) -> Path | Response:
    if not parts or not all(parts):
        return Response(status_code=400)
    try:
        return confined(_user_root(request), *parts)
    except PathEscape:
        return Response(status_code=403)


@router.api_route("/userdata/{rest:path}", methods=["GET", "POST", "DELETE"])
async def userdata_file(request: Request, rest: str):
    parts = _raw_parts(request)
    if request.method == "POST" and "move" in parts[1:-1]:
        i = parts.index("move", 1)
        return await _move(request, _target(request, parts[:i]), _target(request, parts[i + 1:]))
    path = _target(request, parts)
    if isinstance(path, Response):
        return path
    if request.method == "GET":
        if not path.is_file():
            return Response(status_code=404)
        css = path == (_user_root(request) / "user.css").resolve()
        return FileResponse(path, media_type="text/css" if css else "application/octet-stream",
                            headers={"X-Content-Type-Options": "nosniff", "Content-Disposition": "inline" if css else "attachment"})
    if request.method == "DELETE":
        if not path.is_file():
            return Response(status_code=404)
        await run_in_threadpool(path.unlink)
        return Response(status_code=204)
    if request.query_params.get("overwrite", "true") == "false" and path.exists():
        return Response("File already exists", status_code=409)
    body = await request.body()

    def write():
        with atomic_write(path) as f:
            f.write(body)

    await run_in_threadpool(write)
    return _written(request, path)


def _written(request: Request, path: Path):
    root = _user_root(request).resolve()
    if request.query_params.get("full_info", "false").lower() == "true":
        return _file_info(path, root)
    return path.relative_to(root).as_posix()


async def _move(request: Request, source, dest):
    for path in (source, dest):
        if isinstance(path, Response):
            return path
    if not source.is_file():
        return Response(status_code=404)
    if request.query_params.get("overwrite", "true") == "false" and dest.exists():
        return Response("File already exists", status_code=409)
    os.makedirs(dest.parent, exist_ok=True)
    await run_in_threadpool(shutil.move, source, dest)
    return _written(request, dest)
