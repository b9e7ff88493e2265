"""The server as ComfyUI's clients use it: a real server on a loopback port, a real WebSocket
client, the fake backend."""

import json
import struct
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.fake_backend import FakeBackend
from tests.server_harness import Events, running_server

DATA = Path(__file__).parent / "data" / "comfyui"


def simple_prompt(seed=1, steps=3, size=64):
    p = json.loads((DATA / "sd3.5_simple_example.api.json").read_text())
    p["3"]["inputs"].update(seed=seed, steps=steps)
    p["53"]["inputs"].update(width=size, height=size)
    return p


def queue(client, prompt, **body):
    """POST /prompt the way script_examples do: JSON bytes, form content type."""
    response = client.post("/prompt", content=json.dumps({"prompt": prompt, **body}).encode(),
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    return response.json()


def wait_history(client, prompt_id, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = client.get("/history").json()  # SillyTavern polls the whole dict
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.05)
    raise AssertionError(f"{prompt_id} never reached the history")


@pytest.fixture
def server(tmp_path):
    with running_server(tmp_path) as running:
        yield running


def test_websockets_api_example_flow(server):
    """script_examples/websockets_api_example.py: WS with clientId, POST /prompt with client_id and
    prompt_id, wait for executing(None), GET /history/{id}, GET /view for every image."""
    client_id, prompt_id = str(uuid.uuid4()), str(uuid.uuid4())
    events = Events(server.ws_url, client_id=client_id)
    with server.client() as client:
        answer = queue(client, simple_prompt(), client_id=client_id, prompt_id=prompt_id)
        assert answer == {"prompt_id": prompt_id, "number": 0, "node_errors": {}}
        events.until_done(prompt_id)
        history = client.get(f"/history/{prompt_id}").json()[prompt_id]
        images = [image for output in history["outputs"].values() for image in output["images"]]
        assert images == [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]
        response = client.get("/view", params=images[0])
        assert response.status_code == 200 and response.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert response.headers["content-disposition"] == 'filename="ComfyUI_00001_.png"'
    assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
    assert [m[0] for m in history["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    item = history["prompt"]
    assert item[0] == 0 and item[1] == prompt_id and item[2]["3"]["inputs"]["seed"] == 1 and item[4] == ["9"]
    assert item[3]["client_id"] == client_id and isinstance(item[3]["create_time"], int)
    assert history["meta"]["9"]["node_id"] == "9"
    events.close()


def test_exact_event_order(server):
    events = Events(server.ws_url, client_id="c1")
    assert events.next() == ("status", {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "c1"})
    with server.client() as client:
        prompt_id = queue(client, simple_prompt(), client_id="c1")["prompt_id"]
    events.until_done(prompt_id)
    kinds = events.types()[1:]
    nodes = [m[1]["node"] for m in events.messages if isinstance(m, tuple) and m[0] == "executing"][:-1]
    expected = ["status", "status", "execution_start", "execution_cached"]
    for node in nodes:
        expected += ["progress_state", "executing"]
        if node == "3":
            expected += ["progress_state", "progress", "binary"] * 3
        if node == "9":
            expected += ["executed"]
        expected += ["progress_state"]
    expected += ["execution_success", "status", "executing"]
    assert kinds == expected
    statuses = [m[1]["status"]["exec_info"]["queue_remaining"] for m in events.messages if isinstance(m, tuple) and m[0] == "status"]
    assert statuses == [0, 1, 1, 0]
    first_frame = next(m for m in events.messages if isinstance(m, bytes))
    assert first_frame[:8] == struct.pack(">II", 1, 1) and first_frame[8:10] == b"\xff\xd8"  # format 1, JPEG


def test_sillytavern_polls_history_with_untyped_body(server):
    with server.client() as client:
        response = client.post("/prompt", content=json.dumps({"prompt": simple_prompt()}))  # no Content-Type
        assert response.status_code == 200
        entry = wait_history(client, response.json()["prompt_id"])
        assert entry["status"]["status_str"] == "success"
        assert client.get("/view", params=entry["outputs"]["9"]["images"][0]).status_code == 200


def test_preview_metadata_frames_when_negotiated(server):
    events = Events(server.ws_url, client_id="meta", features={"supports_preview_metadata": True})
    events.next_json()
    assert events.next() == ("feature_flags", {"supports_preview_metadata": True, "max_upload_size": 100 * 1024 * 1024})
    with server.client() as client:
        prompt_id = queue(client, simple_prompt(), client_id="meta")["prompt_id"]
    events.until_done(prompt_id)
    frame = next(m for m in events.messages if isinstance(m, bytes))
    kind, length = struct.unpack(">II", frame[:8])
    meta = json.loads(frame[8:8 + length])
    assert kind == 4 and meta == {"node_id": "3", "prompt_id": prompt_id, "display_node_id": "3", "parent_node_id": None,
                                  "real_node_id": "3", "image_type": "image/jpeg"}
    assert frame[8 + length:8 + length + 2] == b"\xff\xd8"


def test_websockets_api_example_ws_images(server):
    """..._ws_images.py: SaveImageWebsocket frames while that node executes, 8 bytes stripped."""
    prompt = simple_prompt()
    del prompt["9"]
    prompt["save_image_websocket_node"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]}}
    events = Events(server.ws_url, client_id="imgs")
    with server.client() as client:
        prompt_id = queue(client, prompt, client_id="imgs")["prompt_id"]
    images, current = {}, None
    while True:
        message = events.next()
        if isinstance(message, tuple) and message[0] == "executing" and message[1]["prompt_id"] == prompt_id:
            current = message[1]["node"]
            if current is None:
                break
        elif isinstance(message, bytes) and current == "save_image_websocket_node":
            images.setdefault(current, []).append(message[8:])
    assert [img[:8] for img in images["save_image_websocket_node"]] == [b"\x89PNG\r\n\x1a\n"]


def test_validation_errors_in_comfyuis_shape(server):
    with server.client() as client:
        bad = simple_prompt()
        bad["53"]["inputs"]["height"] = 8
        response = client.post("/prompt", json={"prompt": bad})
        assert response.status_code == 400
        body = response.json()
        assert body["error"]["type"] == "prompt_outputs_failed_validation"
        assert body["node_errors"]["53"]["errors"][0]["extra_info"]["input_name"] == "height"
        unknown = simple_prompt()
        unknown["99"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {}}
        body = client.post("/api/prompt", json={"prompt": unknown}).json()
        assert body["error"]["message"] == "Cannot execute because node ControlNetApplyAdvanced does not exist."
        assert client.post("/prompt", json={"client_id": "x"}).json()["error"]["type"] == "no_prompt"
        response = client.post("/prompt", content=b"{not json")
        assert response.status_code == 400 and "Traceback" not in response.text


def test_ui_format_workflows_are_converted(server):
    ui = json.loads((DATA / "sd3.5_simple_example.ui.json").read_text())
    for node in ui["nodes"]:  # small and short: the fake backend works at full size too, only slower
        if node["type"] == "EmptySD3LatentImage":
            node["widgets_values"][:2] = [64, 64]
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 2
    with server.client() as client:
        answer = queue(client, ui)  # the template as the frontend saves it
        entry = wait_history(client, answer["prompt_id"])
    assert entry["prompt"][2]["3"]["inputs"]["sampler_name"] == "euler" and entry["status"]["status_str"] == "success"


def test_interrupt_mid_run(tmp_path):
    with running_server(tmp_path, FakeBackend(step_delay=0.05)) as server:
        events = Events(server.ws_url, client_id="i")
        with server.client() as client:
            prompt_id = queue(client, simple_prompt(steps=400), client_id="i")["prompt_id"]
            events.until(lambda m: isinstance(m, tuple) and m[0] == "progress")
            other = client.post("/interrupt", json={"prompt_id": "not-this-one"})
            assert other.status_code == 200
            assert client.post("/interrupt", content=b"").status_code == 200  # empty body: interrupt whatever runs
            events.until_done(prompt_id, timeout=10)
            entry = client.get(f"/history/{prompt_id}").json()[prompt_id]
    progress = [m for m in events.messages if isinstance(m, tuple) and m[0] == "progress"]
    assert len(progress) < 50
    (interrupted,) = [m[1] for m in events.messages if isinstance(m, tuple) and m[0] == "execution_interrupted"]
    assert interrupted["node_id"] == "3" and interrupted["prompt_id"] == prompt_id
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


def test_cached_rerun_skips_unchanged_nodes(server):
    events = Events(server.ws_url, client_id="c")
    with server.client() as client:
        first = queue(client, simple_prompt(seed=1), client_id="c")["prompt_id"]
        events.until_done(first)
        events.messages.clear()
        second = queue(client, simple_prompt(seed=2), client_id="c")["prompt_id"]
        events.until_done(second)
    (cached,) = [m[1] for m in events.messages if isinstance(m, tuple) and m[0] == "execution_cached"]
    assert sorted(cached["nodes"], key=int) == ["4", "16", "40", "53"]
    executing = [m[1]["node"] for m in events.messages if isinstance(m, tuple) and m[0] == "executing"]
    assert sorted(executing[:-1], key=int) == ["3", "8", "9"] and executing[-1] is None
    assert server.backend.calls["load_checkpoint"] == 1 and server.backend.calls["encode_text"] == 2


def test_a_failing_job_is_reported_and_the_worker_goes_on(server):
    server.backend.fail_next_sample = "out of memory (pretend)"
    events = Events(server.ws_url, client_id="f")
    with server.client() as client:
        failed = queue(client, simple_prompt(), client_id="f")["prompt_id"]
        events.until_done(failed)
        ok = queue(client, simple_prompt(seed=5), client_id="f")["prompt_id"]
        events.until_done(ok)
        history = client.get("/history").json()
    (error,) = [m[1] for m in events.messages if isinstance(m, tuple) and m[0] == "execution_error"]
    assert error["exception_message"] == "out of memory (pretend)" and error["traceback"] == []
    assert history[failed]["status"]["status_str"] == "error" and history[ok]["status"]["status_str"] == "success"


def _blocked_server(tmp_path, **options):
    return running_server(tmp_path, FakeBackend(step_delay=0.02), **options)


def test_priority_front_and_queue_routes(tmp_path):
    with _blocked_server(tmp_path) as server, server.client() as client:
        running = queue(client, simple_prompt(steps=300))["prompt_id"]
        while client.get("/queue").json()["queue_running"] == []:
            time.sleep(0.02)
        a = queue(client, simple_prompt(seed=10, steps=1))
        b = queue(client, simple_prompt(seed=11, steps=1), front=True)
        c = queue(client, simple_prompt(seed=12, steps=1), number=-100)
        d = queue(client, simple_prompt(seed=13, steps=1))
        snapshot = client.get("/api/queue").json()
        assert [item[1] for item in snapshot["queue_running"]] == [running]
        assert [item[1] for item in snapshot["queue_pending"]] == [c["prompt_id"], b["prompt_id"], a["prompt_id"], d["prompt_id"]]
        assert client.get("/prompt").json() == {"exec_info": {"queue_remaining": 5}}
        assert client.post("/queue", json={"delete": [d["prompt_id"]]}).status_code == 200
        client.post("/interrupt")
        for item in (a, b, c):
            wait_history(client, item["prompt_id"])
        order = list(client.get("/history").json())
        assert order == [running, c["prompt_id"], b["prompt_id"], a["prompt_id"]]
        assert d["prompt_id"] not in order
        assert list(client.get("/history", params={"max_items": 2}).json()) == [b["prompt_id"], a["prompt_id"]]
        client.post("/history", json={"delete": [running]})
        assert running not in client.get("/history").json()
        client.post("/history", json={"clear": True})
        assert client.get("/history").json() == {}


def test_bounded_queue_answers_429(tmp_path):
    with _blocked_server(tmp_path, max_queue=2) as server, server.client() as client:
        queue(client, simple_prompt(steps=300))
        while client.get("/queue").json()["queue_running"] == []:
            time.sleep(0.02)
        queue(client, simple_prompt(seed=2))
        queue(client, simple_prompt(seed=3))
        response = client.post("/prompt", json={"prompt": simple_prompt(seed=4)})
        assert response.status_code == 429 and response.json()["error"]["type"] == "queue_full"
        client.post("/queue", json={"clear": True})
        assert client.get("/queue").json()["queue_pending"] == []
        client.post("/interrupt")


def test_history_is_capped(tmp_path):
    with running_server(tmp_path, max_history=2) as server, server.client() as client:
        ids = [queue(client, simple_prompt(seed=s, steps=1))["prompt_id"] for s in range(3)]
        wait_history(client, ids[-1])
        assert list(client.get("/history").json()) == ids[1:]


def test_http_api_client_without_websocket_and_bare_or_api_paths(server):
    with server.client() as client:
        for prefix in ("", "/api"):
            assert client.get(f"{prefix}/object_info/KSampler").json()["KSampler"]["name"] == "KSampler"
            assert client.get(f"{prefix}/object_info/Nope").json() == {}
            assert client.get(f"{prefix}/prompt").status_code == 200
        assert httpx.get(server.url + "api/system_stats").json()["system"]["comfyui_version"] == "0.8.0"
