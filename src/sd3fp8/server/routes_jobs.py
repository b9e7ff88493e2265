"""The job routes: /prompt, /queue, /interrupt, /free, /history and the /ws event stream.

Bodies are parsed from the raw request whatever its Content-Type (script_examples send JSON as
x-www-form-urlencoded, SillyTavern with none), as ComfyUI's aiohttp `request.json()` does.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from sd3fp8.server.jobs import QueueFull
from sd3fp8.workflow.validation import prompt_error

router = APIRouter()
SENSITIVE_EXTRA_DATA = ("auth_token_comfy_org", "api_key_comfy_org")  # never stored (ComfyUI keeps them out of history)


class BadRequest(Exception):
    def __init__(self, message: str, kind: str = "invalid_request", status: int = 400):
        super().__init__(message)
        self.kind, self.status = kind, status


def error_response(status: int, kind: str, message: str, details: str = "", node_errors: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": prompt_error(kind, message, details), "node_errors": node_errors or {}}, status_code=status)


async def json_body(request: Request, allow_empty: bool = False):
    raw = await request.body()
    if not raw.strip():
        if allow_empty:
            return {}
        raise BadRequest("the request has no body")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from e


def _state(request) -> object:
    return request.app.state.sd3fp8


def queue_info(state) -> dict:
    return {"exec_info": {"queue_remaining": state.queue.remaining()}}


@router.get("/prompt")
async def get_prompt(request: Request):
    return queue_info(_state(request))


@router.post("/prompt")
async def post_prompt(request: Request):
    state = _state(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    extra_data = body.get("extra_data") or {}
    if not isinstance(extra_data, dict):
        raise BadRequest("extra_data must be a JSON object")
    prompt = body.get("prompt")
    if prompt is None:
        prompt = (extra_data.get("extra_pnginfo") or {}).get("workflow")
    if prompt is None:
        return error_response(400, "no_prompt", "No prompt provided", "No prompt provided")
    result = await run_in_threadpool(state.prepare, prompt, body.get("partial_execution_targets"))
    if not result.ok:
        return JSONResponse({"error": result.error, "node_errors": result.node_errors}, status_code=400)
    try:
        number = state.queue.number_for(body.get("number"), bool(body.get("front")))
    except (TypeError, ValueError) as e:
        raise BadRequest(f"number must be a number: {e}") from e
    prompt_id = str(body["prompt_id"]) if body.get("prompt_id") not in (None, "") else str(uuid.uuid4())
    extra = {k: v for k, v in extra_data.items() if k not in SENSITIVE_EXTRA_DATA}
    if "client_id" in body:
        extra["client_id"] = body["client_id"]
    extra["create_time"] = int(time.time() * 1000)
    try:
        state.queue.put(prompt_id, number, result.prompt, extra, result.outputs)
    except QueueFull as e:
        return error_response(429, "queue_full", "The queue is full; try again later", str(e))
    return {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}


@router.get("/queue")
async def get_queue(request: Request):
    return _state(request).queue.snapshot()


@router.post("/queue")
async def post_queue(request: Request):
    queue, body = _state(request).queue, await json_body(request, allow_empty=True)
    if isinstance(body, dict):
        if body.get("clear"):
            queue.clear()
        if isinstance(body.get("delete"), list):
            queue.delete(body["delete"])
    return Response(status_code=200)


@router.post("/interrupt")
async def post_interrupt(request: Request):
    body = await json_body(request, allow_empty=True)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    _state(request).worker.interrupt(str(prompt_id) if prompt_id else None)
    return Response(status_code=200)


@router.post("/free")
async def post_free(request: Request):
    body = await json_body(request, allow_empty=True)
    if isinstance(body, dict):
        _state(request).worker.request_free(bool(body.get("unload_models")), bool(body.get("free_memory")))
    return Response(status_code=200)


def _int_query(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as e:
        raise BadRequest(f"{name} must be an integer") from e


@router.get("/history")
async def get_history(request: Request):
    offset = _int_query(request, "offset")
    return _state(request).queue.history(max_items=_int_query(request, "max_items"), offset=-1 if offset is None else offset)


@router.get("/history/{prompt_id}")
async def get_history_item(request: Request, prompt_id: str):
    return _state(request).queue.history(prompt_id=prompt_id)


@router.post("/history")
async def post_history(request: Request):
    queue, body = _state(request).queue, await json_body(request, allow_empty=True)
    if isinstance(body, dict):
        if body.get("clear"):
            queue.clear_history()
        if isinstance(body.get("delete"), list):
            queue.delete_history(body["delete"])
    return Response(status_code=200)


@router.websocket("/ws")
async def websocket_events(websocket: WebSocket):
    state = websocket.app.state.sd3fp8
    sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
    await websocket.accept()
    state.hub.register(sid, websocket)
    state.hub.post("status", {"status": queue_info(state), "sid": sid}, sid)
    if state.worker.current_client() == sid and state.worker.last_node is not None:
        state.hub.post("executing", {"node": state.worker.last_node}, sid)
    first = True
    try:
        while True:
            text = await websocket.receive_text()
            if first:
                _feature_flags(state, sid, text)
            first = False
    except (WebSocketDisconnect, RuntimeError, KeyError):
        pass  # closed (or a binary frame we do not read)
    finally:
        state.hub.unregister(sid, websocket)


def _feature_flags(state, sid: str, text: str) -> None:
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(message, dict) and message.get("type") == "feature_flags" and isinstance(message.get("data"), dict):
        state.hub.set_features(sid, message["data"])
        state.hub.post("feature_flags", state.features(), sid)
