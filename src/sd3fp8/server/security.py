"""Request guards, as one ASGI middleware over HTTP and WebSocket: ComfyUI's loopback Origin
check, the optional bearer token, and the request body size limit."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)
TOKEN_COOKIE = "sd3fp8_token"


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_allowed(host: str | None, origin: str | None) -> bool:
    """ComfyUI's origin_only_middleware (server.py v0.8.0): when the Host is a loopback address,
    a request with an Origin must come from that same host (a web page elsewhere cannot drive a
    local server). Ports are compared only when both sides carry one. Unlike ComfyUI, an opaque
    Origin (`null`) is refused too."""
    if not host or not origin:
        return True
    host_parts = urlsplit("//" + host.lower())
    origin_parts = urlsplit(origin.lower())
    if not _is_loopback(host_parts.hostname):
        return True
    if origin_parts.hostname is None:
        return False  # "null" (sandboxed frames, file:// pages): ComfyUI lets it through; we do not
    host_domain = host.lower() if origin_parts.port is not None else host_parts.hostname
    origin_domain = origin_parts.netloc if host_parts.port is not None else origin_parts.hostname
    if not host_domain or not origin_domain:
        return True
    return host_domain == origin_domain


def request_token(headers: dict[str, str], query: str) -> str | None:
    """The token a request carries: `Authorization: Bearer T`, the cookie set at page load, or a
    `token` query parameter (WebSocket clients that cannot set headers)."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - a malformed cookie header carries no token
        cookie = SimpleCookie()
    if TOKEN_COOKIE in cookie:
        return cookie[TOKEN_COOKIE].value
    values = parse_qs(query).get("token")
    return values[0] if values else None


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: 403 on a cross-site Origin, 401 without the token, 413 past the body limit."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not origin_allowed(headers.get("host"), headers.get("origin")):
            log.warning("refused a request from origin %s to host %s", headers.get("origin"), headers.get("host"))
            return await self._refuse(scope, receive, send, 403, "cross-origin request refused")
        if self.token is not None:
            given = request_token(headers, scope.get("query_string", b"").decode("latin-1"))
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return await self._refuse(scope, receive, send, 401, "missing or wrong token")
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._refuse(scope, receive, send, 413, "request body too large")
        return await self._limited(scope, receive, send)

    async def _limited(self, scope, receive, send):
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send, 413, "request body too large")

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str):
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": message})
            return
        body = json.dumps({"error": {"type": "forbidden" if status in (401, 403) else "too_large", "message": message,
                                     "details": "", "extra_info": {}}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
