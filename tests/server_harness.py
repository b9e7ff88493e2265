"""A real server on a loopback port, in a thread, over the fake backend; and a WebSocket reader."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass

import httpx
from websockets.sync.client import connect

from sd3fp8.server import ServerConfig, make_server
from tests.fake_backend import FakeBackend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str
    config: ServerConfig
    backend: FakeBackend
    server: object

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "ws"

    @property
    def state(self):
        return self.server.config.app.state.sd3fp8

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


@contextlib.contextmanager
def running_server(tmp_path, backend: FakeBackend | None = None, **options):
    backend = backend or FakeBackend()
    config = ServerConfig.under(tmp_path, port=free_port(), **options)
    ready = threading.Event()
    urls = []
    server = make_server(config, backend, on_ready=lambda url: (urls.append(url), ready.set()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    if not ready.wait(20):
        raise RuntimeError("the server did not start")
    try:
        yield Running(urls[0], config, backend, server)
    finally:
        server.should_exit = True
        thread.join(20)
        assert not thread.is_alive(), "the server did not stop"


class Events:
    """A WebSocket client that records every message (JSON as (type, data), binary as bytes)."""

    def __init__(self, url: str, client_id: str | None = None, features: dict | None = None, **kwargs):
        self.ws = connect(url + (f"?clientId={client_id}" if client_id else ""), **kwargs)
        self.messages: list = []
        self.sid = self.next_json()["sid"] if client_id is None else None
        if features is not None:
            self.ws.send(json.dumps({"type": "feature_flags", "data": features}))

    def next(self, timeout: float = 20):
        message = self.ws.recv(timeout=timeout)
        message = message if isinstance(message, bytes) else tuple(json.loads(message).values())
        self.messages.append(message)
        return message

    def next_json(self, timeout: float = 20) -> dict:
        message = self.next(timeout)
        assert isinstance(message, tuple) and message[0] == "status", message
        return message[1]

    def until(self, predicate, timeout: float = 30):
        """Read until a message satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.1, deadline - time.monotonic()))
            if predicate(message):
                return message

    def until_done(self, prompt_id: str, timeout: float = 30):
        """websockets_api_example.py's loop: wait for `executing` with node None for the prompt."""
        return self.until(lambda m: isinstance(m, tuple) and m[0] == "executing" and m[1]["node"] is None
                          and m[1]["prompt_id"] == prompt_id, timeout)

    def types(self) -> list:
        return [m[0] if isinstance(m, tuple) else "binary" for m in self.messages]

    def close(self) -> None:
        self.ws.close()
