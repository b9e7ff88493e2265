"""The web UI: the frontend package's static files, and the workflow templates this server can run.

Templates come from the `comfyui-workflow-templates` pip package; only the local SD3.5 templates
whose nodes we all have are listed in /templates/index.json (the ControlNet ones appear when those
nodes exist), so the template browser offers nothing that would fail validation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from sd3fp8.server.security import TOKEN_COOKIE
from sd3fp8.workflow.convert import VIRTUAL_NODES
from sd3fp8.workflow.registry import Registry

log = logging.getLogger(__name__)
router = APIRouter()
_NO_CACHE = {"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"}


class Templates:
    """The runnable SD3.5 templates and their assets; computed on first use."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._assets: dict[str, Path] | None = None
        self._allowed: set[str] = set()

    def _load(self) -> dict[str, Path]:
        if self._assets is not None:
            return self._assets
        self._assets = {}
        try:
            from comfyui_workflow_templates_core import get_asset_path, iter_templates
        except ImportError:
            log.info("comfyui-workflow-templates is not installed: no templates")
            return self._assets
        entries = {entry.template_id: entry for entry in iter_templates()}
        index = entries.get("index")
        if index is None:
            return self._assets
        for category in json.loads(Path(get_asset_path("index", "index.json")).read_text()):
            for template in category.get("templates", []):
                if self._runnable(template, entries, get_asset_path):
                    self._allowed.add(template["name"])
        for template_id, entry in entries.items():
            if template_id in self._allowed or template_id.split(".")[0] == "index":
                for asset in entry.assets:
                    self._assets[asset.filename] = Path(get_asset_path(template_id, asset.filename))
        return self._assets

    def _runnable(self, template: dict, entries: dict, get_asset_path) -> bool:
        name = template.get("name", "")
        if "SD3.5" not in template.get("models", []) or name not in entries or template.get("openSource") is False:
            return False
        try:
            workflow = json.loads(Path(get_asset_path(name, f"{name}.json")).read_text())
        except (OSError, ValueError, KeyError, FileNotFoundError):
            return False
        types = {node.get("type") for node in workflow.get("nodes", [])}
        return all(t in self.registry or t in VIRTUAL_NODES for t in types)

    def index(self, filename: str) -> list | None:
        """An index file (index.json, index.fr.json, ...) with only the runnable templates."""
        path = self._load().get(filename)
        if path is None:
            return None
        categories = []
        for category in json.loads(path.read_text()):
            kept = [t for t in category.get("templates", []) if t.get("name") in self._allowed]
            if kept:
                categories.append({**category, "templates": kept})
        return categories

    def asset(self, filename: str) -> Path | None:
        return self._load().get(filename)

    def workflow(self, filename: str) -> dict | None:
        """A runnable template's workflow (``{name}.json``) fitted to this installation, else None."""
        path = self._load().get(filename)
        if path is None or not filename.endswith(".json") or filename.removesuffix(".json") not in self._allowed:
            return None
        return fit_workflow(json.loads(path.read_text()), self.registry.options)


_LATENTS = ("EmptySD3LatentImage", "EmptyLatentImage")


def fit_workflow(workflow: dict, options) -> dict:
    """A template fitted to what this server has, so it runs as loaded: a checkpoint it names that is
    not here becomes the first one that is (its download note dropped), and a checkpoint that cannot
    take the template's size (the bundled miniature model: 128 pixels a side at most) sets the empty
    latents to its own size."""
    checkpoints = options.model_files("checkpoints")
    nodes = workflow.get("nodes", [])
    size = None
    for node in nodes:
        values = node.get("widgets_values")
        if node.get("type") != "CheckpointLoaderSimple" or not values:
            continue
        if values[0] not in checkpoints and checkpoints:
            log.info("template checkpoint %s is not here: using %s", values[0], checkpoints[0])
            missing, values[0] = values[0], checkpoints[0]
            properties = node.get("properties", {})
            properties["models"] = [m for m in properties.get("models", []) if m.get("name") != missing]
            workflow["models"] = [m for m in workflow.get("models", []) if m.get("name") != missing]
        preferred = getattr(options, "preferred_size", lambda name: None)(values[0])
        size = size or preferred
    for node in nodes:
        if size and node.get("type") in _LATENTS and len(node.get("widgets_values") or []) >= 2:
            node["widgets_values"][:2] = list(size)
    return workflow


@router.get("/templates/{filename}")
async def template_file(request: Request, filename: str):
    templates: Templates = request.app.state.sd3fp8.templates
    if filename.startswith("index") and filename.endswith(".json") and filename != "index.schema.json":
        index = await run_in_threadpool(templates.index, filename)
        return Response(status_code=404) if index is None else JSONResponse(index)
    workflow = await run_in_threadpool(templates.workflow, filename)
    if workflow is not None:
        return JSONResponse(workflow)
    path = await run_in_threadpool(templates.asset, filename)
    return Response(status_code=404) if path is None else FileResponse(path)


def mount_frontend(app: FastAPI, static: Path) -> None:
    """GET / (index.html, uncached; remembers a `?token=` in a cookie) and the static files."""

    @app.get("/", include_in_schema=False)
    async def index(request: Request):
        response = FileResponse(static / "index.html", headers=_NO_CACHE)
        token = request.query_params.get("token")
        if token:  # the guard let it through, so it is the right one
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    app.mount("/", StaticFiles(directory=static), name="frontend")
