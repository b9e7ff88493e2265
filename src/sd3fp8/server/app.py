"""The FastAPI app: a thin adapter from ComfyUI's HTTP/WebSocket API to one executor and backend.

Every route is served bare and under /api (ComfyUI does both); the web UI's static files come last.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sd3fp8.server import frontend, imageapi, routes_files, routes_info, routes_jobs, routes_user
from sd3fp8.server.config import ServerConfig
from sd3fp8.server.hub import Hub
from sd3fp8.server.jobs import PromptQueue
from sd3fp8.server.routes_jobs import BadRequest
from sd3fp8.server.security import Guard
from sd3fp8.server.worker import Worker
from sd3fp8.workflow.backend import Backend
from sd3fp8.workflow.convert import ConversionError, is_ui_workflow, ui_to_api
from sd3fp8.workflow.executor import Executor
from sd3fp8.workflow.registry import build_registry
from sd3fp8.workflow.spec import Folders
from sd3fp8.workflow.validation import ValidationResult, prompt_error, validate_prompt

log = logging.getLogger(__name__)


class ServerState:
    """Everything the routes share: config, folders, registry, queue, hub, worker."""

    def __init__(self, config: ServerConfig, backend: Backend):
        for folder in (config.output, config.input, config.temp, config.user):
            folder.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.backend = backend
        self.folders = Folders(input=config.input.resolve(), output=config.output.resolve(), temp=config.temp.resolve())
        self.registry = build_registry(backend, self.folders)
        self.executor = Executor(self.registry, backend, previews=config.previews)
        self.hub = Hub()
        self.queue = PromptQueue(config.max_queue, config.max_history, on_change=self._queue_changed)
        self.worker = Worker(self.queue, self.executor, backend, self.hub)
        self.templates = frontend.Templates(self.registry)

    def _queue_changed(self) -> None:
        self.hub.post("status", {"status": {"exec_info": {"queue_remaining": self.queue.remaining()}}})

    def features(self) -> dict:
        return {"supports_preview_metadata": True, "max_upload_size": self.config.max_upload_size}

    def prepare(self, prompt, partial_targets=None) -> ValidationResult:
        """Validate an API prompt, converting a UI-format workflow first."""
        if is_ui_workflow(prompt):
            try:
                prompt = ui_to_api(prompt, self.registry)
            except ConversionError as e:
                return ValidationResult(False, prompt_error("invalid_prompt", str(e)))
        if partial_targets is not None and not isinstance(partial_targets, list):
            return ValidationResult(False, prompt_error("invalid_prompt", "partial_execution_targets must be a list"))
        return validate_prompt(self.registry, prompt, partial_targets)


def create_app(config: ServerConfig, backend: Backend) -> FastAPI:
    state = ServerState(config, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.hub.start()
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()
            await state.hub.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, title="sd3fp8")
    app.state.sd3fp8 = state
    for router in (routes_jobs.router, routes_info.router, routes_files.router, routes_user.router):
        app.include_router(router)
        app.include_router(router, prefix="/api")
    app.include_router(routes_info.internal, prefix="/internal")
    app.include_router(routes_info.internal, prefix="/api/internal")
    imageapi.install(app, state)  # OpenAI Images and A1111 routes; their jobs go into this queue
    app.include_router(frontend.router)
    app.add_exception_handler(BadRequest, _bad_request)
    app.add_exception_handler(Exception, _internal_error)
    if config.frontend is not None:
        frontend.mount_frontend(app, config.frontend)
    app.add_middleware(Guard, token=config.token, max_body=config.max_upload_size)
    return app


async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse({"error": prompt_error(exc.kind, str(exc)), "node_errors": {}}, status_code=exc.status)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": prompt_error("internal_error", "Internal server error; see the server log")}, status_code=500)
