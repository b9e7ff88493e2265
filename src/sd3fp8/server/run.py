"""Run the server with uvicorn: print the URL once listening, stop cleanly on Ctrl-C."""

from __future__ import annotations

import sys
from collections.abc import Callable

import uvicorn

from sd3fp8.server.app import create_app
from sd3fp8.server.config import ServerConfig
from sd3fp8.workflow.backend import Backend


class _Server(uvicorn.Server):
    """uvicorn's server, telling the caller the real URL once the socket listens."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str], None]):
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_ready(f"http://{f'[{host}]' if ':' in host else host}:{port}/")


def make_server(config: ServerConfig, backend: Backend, on_ready: Callable[[str], None] | None = None) -> uvicorn.Server:
    """A uvicorn server for the app (call ``.run()``; signals are handled in the main thread)."""
    app = create_app(config, backend)
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", lifespan="on",
                        timeout_graceful_shutdown=5, ws_max_size=config.max_upload_size)
    return _Server(uv, on_ready or (lambda url: None))


def serve(config: ServerConfig, backend: Backend) -> None:
    """Serve until Ctrl-C: the running job is interrupted and the worker stopped on the way out."""

    def ready(url: str) -> None:
        shown = url + (f"?token={config.token}" if config.token and config.frontend else "")
        ui = "the web UI and " if config.frontend else ""
        print(f"sd3fp8 serve: {ui}ComfyUI API at {shown} (Ctrl-C stops)", file=sys.stderr, flush=True)

    make_server(config, backend, ready).run()
