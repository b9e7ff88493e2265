"""Safety: token, Origin check, confinement of /view, uploads and user data, size limits, no
tracebacks to clients."""

import json
import os

import httpx
import pytest
from PIL import Image
from websockets.exceptions import InvalidStatus

from sd3fp8.server.security import origin_allowed, request_token
from tests.server_harness import Events, running_server

TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def server(tmp_path):
    with running_server(tmp_path) as running:
        yield running


def test_token_is_enforced_on_every_route(tmp_path):
    with running_server(tmp_path, token=TOKEN) as server:
        for path in ("/prompt", "/api/object_info", "/history", "/view?filename=x.png", "/system_stats", "/api/settings"):
            assert httpx.get(server.url + path.lstrip("/")).status_code == 401, path
        assert httpx.post(server.url + "prompt", json={"prompt": {}}).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token-at-all"}
        assert httpx.get(server.url + "prompt", headers=wrong).status_code == 401
        right = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(server.url + "prompt", headers=right).status_code == 200
        assert httpx.get(server.url + "prompt", params={"token": TOKEN}).status_code == 200
        with pytest.raises(InvalidStatus):
            Events(server.ws_url, client_id="nope")
        events = Events(server.ws_url, client_id="yes", additional_headers=right)
        assert events.next()[0] == "status"
        events.close()


def test_the_web_ui_gets_the_token_as_a_cookie(tmp_path):
    from sd3fp8.server import installed_frontend

    frontend = installed_frontend()
    if frontend is None:
        pytest.skip("comfyui-frontend-package is not installed")
    with running_server(tmp_path, token=TOKEN, frontend=frontend) as server:
        with httpx.Client(base_url=server.url) as browser:
            assert browser.get("/").status_code == 401
            page = browser.get("/", params={"token": TOKEN})
            assert page.status_code == 200 and "<title>ComfyUI</title>" in page.text
            assert page.headers["cache-control"] == "no-cache"
            assert browser.get("/api/users").json() == {"storage": "server", "migrated": True}  # the cookie does it
            assert browser.get("/assets/" + next(p.name for p in (frontend / "assets").glob("index-*.js"))).status_code == 200


def test_cross_origin_requests_to_loopback_are_refused(server):
    host = server.url.split("//")[1].rstrip("/")
    assert httpx.get(server.url + "prompt", headers={"Origin": "https://evil.example"}).status_code == 403
    assert httpx.post(server.url + "prompt", headers={"Origin": "http://evil.example:8188"}, json={}).status_code == 403
    assert httpx.get(server.url + "prompt", headers={"Origin": f"http://{host}"}).status_code == 200
    assert httpx.get(server.url + "prompt").status_code == 200  # no Origin: scripts, curl
    with pytest.raises(InvalidStatus):
        Events(server.ws_url, client_id="x", origin="https://evil.example")


@pytest.mark.parametrize("host,origin,allowed", [
    ("127.0.0.1:8188", "http://127.0.0.1:8188", True),
    ("127.0.0.1:8188", "http://127.0.0.1:9999", False),
    ("localhost:8188", "http://evil.com", False),
    ("127.0.0.1:8188", "null", False),
    ("127.0.0.1", "http://127.0.0.1:3000", True),  # ports compared only when both carry one
    ("192.168.1.5:8188", "http://evil.com", True),  # ComfyUI checks loopback hosts only
    ("[::1]:8188", "http://[::1]:8188", True),
    (None, "http://evil.com", True),
])
def test_origin_rule(host, origin, allowed):
    assert origin_allowed(host, origin) is allowed


def test_request_token_sources():
    assert request_token({"authorization": "Bearer abc"}, "") == "abc"
    assert request_token({"cookie": "a=1; sd3fp8_token=xyz"}, "") == "xyz"
    assert request_token({}, "token=q&x=1") == "q"
    assert request_token({"cookie": "\x00bad"}, "") is None


def _place(folder, name, size=(4, 4)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "red").save(folder / name)


def test_view_is_confined(server, tmp_path):
    cfg = server.config
    _place(cfg.output, "ok.png")
    _place(cfg.output / "sub", "deep.png")
    _place(cfg.input, "in.png")
    (tmp_path / "secret.png").write_bytes((cfg.output / "ok.png").read_bytes())
    os.symlink(tmp_path, cfg.output / "link")
    os.symlink(tmp_path / "secret.png", cfg.output / "leak.png")
    with server.client() as client:
        def status(**params):
            return client.get("/view", params=params).status_code

        assert status(filename="ok.png") == 200
        assert status(filename="deep.png", subfolder="sub") == 200
        assert status(filename="in.png", type="input") == 200
        assert status(filename="in.png [input]") == 200
        assert status(filename="ok.png", type="nowhere") == 400
        assert status(filename="../secret.png") == 400
        assert status(filename="/etc/passwd") == 400
        assert status(filename="secret.png", subfolder="..") == 403
        assert status(filename="secret.png", subfolder="/tmp") == 403
        assert status(filename="secret.png", subfolder="link") == 403  # a symlinked folder leading out
        assert status(filename="leak.png") == 403  # a symlinked file leading out
        assert status(filename="missing.png") == 404
        assert client.get("/view").status_code == 404
        preview = client.get("/view", params={"filename": "ok.png", "preview": "webp;50"})
        assert preview.headers["content-type"] == "image/webp"
        assert client.get("/view", params={"filename": "ok.png", "channel": "rgb"}).content[:4] == b"\x89PNG"


def test_view_sends_non_images_as_downloads(server):
    (server.config.input / "page.html").write_text("<script>alert(1)</script>")
    response = httpx.get(server.url + "view", params={"filename": "page.html", "type": "input"})
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"].startswith("attachment") and response.headers["x-content-type-options"] == "nosniff"


def _upload(client, name, data, **fields):
    return client.post("/upload/image", files={"image": (name, data, "image/png")}, data=fields)


def test_upload_rename_reuse_overwrite_and_confinement(server):
    with server.client() as client:
        assert _upload(client, "a.png", b"one").json() == {"name": "a.png", "subfolder": "", "type": "input"}
        assert _upload(client, "a.png", b"one").json()["name"] == "a.png"  # identical: reused
        assert _upload(client, "a.png", b"two").json()["name"] == "a (1).png"  # different: renamed
        assert _upload(client, "a.png", b"three").json()["name"] == "a (2).png"
        assert _upload(client, "a.png", b"four", overwrite="true").json()["name"] == "a.png"
        assert (server.config.input / "a.png").read_bytes() == b"four"
        sub = _upload(client, "b.png", b"x", subfolder="clips", type="temp").json()
        assert sub == {"name": "b.png", "subfolder": "clips", "type": "temp"} and (server.config.temp / "clips" / "b.png").is_file()
        assert client.post("/api/upload/image", files={"image": ("c.png", b"y")}).status_code == 200  # Open WebUI's path
        for name, fields in [("../evil.png", {}), ("x.png", {"subfolder": "../.."}), ("x.png", {"subfolder": "/etc"}),
                             ("x.png", {"type": "models"})]:
            assert _upload(client, name, b"z", **fields).status_code == 400, (name, fields)
        assert client.post("/upload/image", data={"type": "input"}).status_code == 400
    assert not (server.config.input.parent / "evil.png").exists()


def test_body_and_upload_size_limits(tmp_path):
    with running_server(tmp_path, max_upload_size=64 * 1024) as server, server.client() as client:
        assert _upload(client, "big.png", b"0" * (100 * 1024)).status_code == 413
        assert client.post("/prompt", content=b"{" + b" " * (100 * 1024) + b"}").status_code == 413

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(100):
                yield b" " * 1024

        assert client.post("/prompt", content=chunks()).status_code == 413
        assert not any(server.config.input.iterdir())


def test_user_data_is_confined_and_works(server):
    with server.client() as client:
        assert client.get("/api/userdata", params={"dir": "workflows"}).status_code == 404
        saved = client.post("/api/userdata/workflows%2Fmine.json", content=b'{"nodes": []}')
        assert saved.status_code == 200 and saved.json() == "workflows/mine.json"
        assert client.post("/api/userdata/workflows%2Fmine.json?overwrite=false", content=b"{}").status_code == 409
        listing = client.get("/api/userdata", params={"dir": "workflows", "recurse": "true", "full_info": "true"}).json()
        assert [entry["path"] for entry in listing] == ["mine.json"]
        assert client.get("/api/userdata/workflows%2Fmine.json").json() == {"nodes": []}
        moved = client.post("/api/userdata/workflows%2Fmine.json/move/workflows%2Frenamed.json")
        assert moved.json() == "workflows/renamed.json"
        assert client.get("/api/v2/userdata").json()[0] == {"name": "workflows", "path": "workflows", "type": "directory"}
        for bad in ("..%2F..%2Fescape.json", "%2Fetc%2Fpasswd", "workflows%2F..%2F..%2Fx"):
            assert client.post(f"/api/userdata/{bad}", content=b"x").status_code == 403, bad
            assert client.get(f"/api/userdata/{bad}").status_code == 403
        assert client.get("/api/userdata", params={"dir": "../.."}).status_code == 403
        assert client.delete("/api/userdata/workflows%2Frenamed.json").status_code == 204
    assert not (server.config.user.parent / "escape.json").exists()


def test_settings_round_trip(server):
    with server.client() as client:
        assert client.get("/api/settings").json() == {}
        assert client.post("/api/settings/Comfy.TutorialCompleted", content=b"true").status_code == 200
        assert client.post("/api/settings", json={"Comfy.Locale": "en"}).status_code == 200
        assert client.get("/api/settings").json() == {"Comfy.TutorialCompleted": True, "Comfy.Locale": "en"}
        assert client.get("/api/settings/Comfy.Locale").json() == "en"
        assert client.get("/api/settings/Unset").json() is None
    assert json.loads((server.config.user / "comfy.settings.json").read_text())["Comfy.Locale"] == "en"


def test_no_traceback_reaches_a_client(server, monkeypatch):
    def boom():
        raise RuntimeError("internal detail /secret/path")

    monkeypatch.setattr(server.state.registry, "object_info", boom)
    response = httpx.get(server.url + "object_info")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "internal_error"
    assert "Traceback" not in response.text and "/secret/path" not in response.text
