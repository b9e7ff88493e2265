"""Read-mostly routes: /object_info, /system_stats, /features, models, and the small routes the
frontend calls at startup (/embeddings, /extensions, /i18n, /global_subgraphs, /workflow_templates,
/experiment/models, /internal/*)."""

from __future__ import annotations

import os
import platform
import sys

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

import sd3fp8
from sd3fp8.workflow.backend import MODEL_FOLDERS

router = APIRouter()
internal = APIRouter()
COMFYUI_API_VERSION = "0.8.0"  # the ComfyUI release whose API this server follows
FRONTEND_VERSION = "1.35.9"  # the frontend that release pins
TEMPLATES_VERSION = "0.7.67"
LEGACY_FOLDERS = {"clip": "text_encoders", "unet": "diffusion_models"}


def _state(request: Request):
    return request.app.state.sd3fp8


@router.get("/object_info")
async def object_info(request: Request):
    return await run_in_threadpool(_state(request).registry.object_info)


@router.get("/object_info/{node_class}")
async def object_info_node(request: Request, node_class: str):
    registry = _state(request).registry
    if node_class not in registry:
        return {}
    return {node_class: await run_in_threadpool(registry.node_info, node_class)}


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


def _devices(ram_total: int, ram_free: int) -> list[dict]:
    import torch

    if torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"name": f"cuda:{i} {torch.cuda.get_device_name(i)}", "type": "cuda", "index": i, "vram_total": total,
                            "vram_free": free, "torch_vram_total": torch.cuda.memory_reserved(i),
                            "torch_vram_free": torch.cuda.memory_reserved(i) - torch.cuda.memory_allocated(i)})
        return devices
    return [{"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free,
             "torch_vram_total": ram_total, "torch_vram_free": ram_free}]


def system_stats() -> dict:
    import torch

    ram_total, ram_free = _memory()
    return {
        "system": {"os": os.name, "ram_total": ram_total, "ram_free": ram_free, "comfyui_version": COMFYUI_API_VERSION,
                   "sd3fp8_version": sd3fp8.__version__, "required_frontend_version": FRONTEND_VERSION,
                   "installed_templates_version": _templates_version(), "required_templates_version": TEMPLATES_VERSION,
                   "python_version": sys.version, "pytorch_version": torch.__version__, "embedded_python": False,
                   "argv": ["sd3fp8", "serve"], "platform": platform.platform(terse=True)},
        "devices": _devices(ram_total, ram_free),
    }


def _templates_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("comfyui-workflow-templates")
    except PackageNotFoundError:
        return None


@router.get("/system_stats")
async def get_system_stats():
    return await run_in_threadpool(system_stats)


@router.get("/features")
async def features(request: Request):
    return _state(request).features()


@router.get("/embeddings")
async def embeddings():
    return []  # SD3.5 has no textual-inversion embeddings here


@router.get("/models")
async def model_folders():
    return list(MODEL_FOLDERS)


@router.get("/models/{folder}")
async def model_files(request: Request, folder: str):
    folder = LEGACY_FOLDERS.get(folder, folder)
    if folder not in MODEL_FOLDERS:
        return Response(status_code=404)
    return await run_in_threadpool(_state(request).backend.model_files, folder)


@router.get("/experiment/models")
async def experiment_models():
    return [{"name": name, "folders": [name]} for name in MODEL_FOLDERS]


@router.get("/experiment/models/{folder}")
async def experiment_model_files(request: Request, folder: str):
    folder = LEGACY_FOLDERS.get(folder, folder)
    if folder not in MODEL_FOLDERS:
        return Response(status_code=404)
    names = await run_in_threadpool(_state(request).backend.model_files, folder)
    return [{"name": name, "pathIndex": 0} for name in names]


@router.get("/experiment/models/preview/{folder}/{path_index}/{filename:path}")
async def experiment_model_preview(folder: str, path_index: int, filename: str):
    return Response(status_code=404)  # no preview pictures for model files


@router.get("/extensions")
async def extensions(request: Request):
    root = _state(request).config.frontend
    if root is None:
        return []
    scripts = sorted(p.relative_to(root).as_posix() for p in (root / "extensions").rglob("*.js"))
    return ["/" + s for s in scripts]


@router.get("/i18n")
async def i18n():
    return {}


@router.get("/global_subgraphs")
async def global_subgraphs():
    return {}


@router.get("/global_subgraphs/{subgraph_id}")
async def global_subgraph(subgraph_id: str):
    return Response(status_code=404)


@router.get("/workflow_templates")
async def workflow_templates():
    return {}  # templates of custom nodes: none; the SD3.5 templates are under /templates


@internal.get("/logs")
async def logs():
    return JSONResponse("")


@internal.get("/logs/raw")
async def logs_raw():
    return {"entries": [], "size": {"cols": None, "rows": None}}


@internal.patch("/logs/subscribe")
async def logs_subscribe():
    return Response(status_code=200)


@internal.get("/folder_paths")
async def folder_paths():
    return {}  # not disclosed


@internal.get("/files/{directory_type}")
async def internal_files(request: Request, directory_type: str):
    folder = _state(request).folders.by_type(directory_type)
    if folder is None:
        return Response(status_code=400)

    def listing():
        if not folder.is_dir():
            return []
        entries = sorted(os.scandir(folder), key=lambda e: e.stat().st_mtime, reverse=True)
        return [e.name for e in entries if e.is_file()]

    return await run_in_threadpool(listing)
