"""The WebSocket hub: sockets by client id, and one publisher task that sends every message in
the order it was posted, whichever thread posted it."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket

from sd3fp8.server.protocol import encode_image, preview_frame, preview_frame_with_metadata
from sd3fp8.workflow.spec import Preview

log = logging.getLogger(__name__)
SEND_TIMEOUT = 10.0  # seconds a client may take to accept one message before it is dropped


@dataclass
class Client:
    websocket: WebSocket
    features: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Message:
    event: str
    data: Any  # dict for JSON events; (Preview, node_id, prompt_id) for previews
    sid: str | None  # None: every socket


class Hub:
    """Post from any thread; messages go out from the event loop, in order.

    Posted messages wait in a deque; the event loop is woken once per burst (a sampler step posts
    progress_state, progress and a preview), not once per message: each wake-up is a pipe write and
    a GIL hand-over the sampling thread pays for."""

    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._pending: collections.deque[_Message] = collections.deque()
        self._lock = threading.Lock()
        self._woken = False  # a wake-up is on its way to the publisher
        self._wake: asyncio.Event | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._publish())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for client in list(self.clients.values()):
            try:
                await client.websocket.close(code=1001)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.clients.clear()

    def post(self, event: str, data: dict, sid: str | None = None) -> None:
        """Queue a JSON event `{"type": event, "data": data}` for ``sid`` (None: everyone)."""
        self._put(_Message(event, data, sid))

    def post_preview(self, preview: Preview, node_id: str, prompt_id: str, sid: str | None) -> None:
        self._put(_Message("preview", (preview, node_id, prompt_id), sid))

    def _put(self, message: _Message) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return  # not serving (yet / any more): nobody to tell
        with self._lock:
            self._pending.append(message)
            if self._woken:
                return
            self._woken = True
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _take(self) -> list[_Message]:
        with self._lock:
            batch = list(self._pending)
            self._pending.clear()
            self._woken = False
        return batch

    def register(self, sid: str, websocket: WebSocket) -> None:
        self.clients[sid] = Client(websocket)

    def unregister(self, sid: str, websocket: WebSocket) -> None:
        client = self.clients.get(sid)
        if client is not None and client.websocket is websocket:
            del self.clients[sid]

    def set_features(self, sid: str, features: dict) -> None:
        if sid in self.clients:
            self.clients[sid].features = dict(features)

    async def _publish(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for message in self._take():
                await self._send(message)

    async def _send(self, message: _Message) -> None:
        targets = [message.sid] if message.sid is not None else list(self.clients)
        frames: dict[str, bytes] = {}
        for sid in targets:
            client = self.clients.get(sid)
            if client is None:
                continue
            try:
                if message.event == "preview":
                    sending = client.websocket.send_bytes(self._frame(message.data, client, frames))
                else:
                    sending = client.websocket.send_json({"type": message.event, "data": message.data})
                await asyncio.wait_for(sending, SEND_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("websocket client %s is not reading: disconnected", sid)
                self.unregister(sid, client.websocket)
                asyncio.create_task(self._close(client))
            except Exception as e:  # noqa: BLE001 - a vanished client must not stop the others
                log.debug("websocket send to %s failed: %s", sid, e)

    @staticmethod
    async def _close(client: Client) -> None:
        try:
            await client.websocket.close(code=1008)
        except Exception:  # noqa: BLE001 - already gone
            pass

    @staticmethod
    def _frame(data, client: Client, frames: dict[str, bytes]) -> bytes:
        preview, node_id, prompt_id = data
        kind = "4" if client.features.get("supports_preview_metadata") else "1"
        if kind not in frames:
            image = frames.setdefault("image", encode_image(preview))
            frames[kind] = (preview_frame_with_metadata(preview, image, node_id, prompt_id) if kind == "4"
                            else preview_frame(preview, image))
        return frames[kind]
