"""The A1111 API with a plain HTTP client, in the order Open WebUI and SillyTavern call it, over the
fake backend on a real server."""

import base64
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from tests.fake_backend import COMFY_SCHEDULERS, FakeBackend
from tests.server_harness import running_server

MODEL = "sd3.5_medium.safetensors"


class DefaultsBackend(FakeBackend):
    def model_defaults(self, name):
        return {"steps": 4, "cfg": 2.0, "width": 64, "height": 48}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    backend = DefaultsBackend(samplers=["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"], schedulers=COMFY_SCHEDULERS)
    with running_server(tmp_path_factory.mktemp("a1111"), backend) as running:
        yield running


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def png(b64_text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64_text)))
    image.load()
    return image


def b64_png(width=64, height=64) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_open_webui_flow(server, http):
    """Open WebUI's automatic1111 engine: options (the model), sd-models, set the model, txt2img
    {prompt, batch_size, width, height, steps?, negative_prompt?}; reads images and info."""
    options = http.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "sd3.5_large_fp8_scaled.safetensors"
    models = http.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["sd3.5_large_fp8_scaled.safetensors", MODEL]
    assert models[1]["model_name"] == "sd3.5_medium"
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd3.5_medium"}).status_code == 200
    assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == MODEL
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "batch_size": 2, "width": 64, "height": 32,
                                                     "negative_prompt": "blue", "seed": 42})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["info"], str)
    info = json.loads(body["info"])
    assert info["seed"] == 42 and info["all_seeds"] == [42, 42] and info["sd_model_name"] == MODEL
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"], info["sampler_name"]) == (64, 32, 4, 2.0, "Euler")
    images = [png(i) for i in body["images"]]
    assert [i.size for i in images] == [(64, 32)] * 2
    assert images[0].info["parameters"] == info["infotexts"][0] and "Batch index: 1" in info["infotexts"][1]
    request = server.backend.requests[-1]
    assert list(request.latent.samples.shape) == [2, 16, 4, 8] and request.seed == 42
    assert body["parameters"]["prompt"] == "a red circle" and body["parameters"]["steps"] == 4
    http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd3.5_large_fp8_scaled.safetensors"})


def test_sillytavern_lists(http):
    assert http.get("/sdapi/v1/upscalers").json() == []
    assert http.get("/sdapi/v1/latent-upscale-modes").json() == []
    assert http.get("/sdapi/v1/sd-vae").json() == []
    samplers = http.get("/sdapi/v1/samplers").json()
    assert [s["name"] for s in samplers] == ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE"]
    assert "euler_ancestral" in samplers[1]["aliases"] and "k_euler_a" in samplers[1]["aliases"]
    schedulers = http.get("/sdapi/v1/schedulers").json()
    assert schedulers[0]["name"] == "automatic" and {"karras", "sgm_uniform", "beta"} <= {s["name"] for s in schedulers}
    idle = http.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None


def test_sillytavern_txt2img_with_a1111_names(server, http):
    body = {"prompt": "x", "negative_prompt": "", "sampler_name": "DPM++ 2M Karras", "steps": 3, "cfg_scale": 7, "width": 32,
            "height": 32, "restore_faces": False, "enable_hr": False, "seed": -1, "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "save_images": False, "send_images": True, "do_not_save_grid": False,
            "clip_skip": 1, "denoising_strength": 0.7, "hr_scale": 2, "an_unknown_field": "ignored as A1111 ignores it"}
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    request = server.backend.requests[-1]
    assert (request.sampler_name, request.scheduler, request.steps, request.cfg) == ("dpmpp_2m", "karras", 3, 7.0)
    assert 0 <= json.loads(response.json()["info"])["seed"] < 2**32
    scheduled = http.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler a", "scheduler": "SGM Uniform"})
    assert scheduled.status_code == 200 and (server.backend.requests[-1].sampler_name, server.backend.requests[-1].scheduler) == (
        "euler_ancestral", "sgm_uniform")
    quiet = http.post("/sdapi/v1/txt2img", json={**body, "send_images": False}).json()
    assert quiet["images"] == []


@pytest.mark.parametrize(("field", "value", "text"), [
    ("enable_hr", True, "hires fix"),
    ("restore_faces", True, "restore_faces"),
    ("alwayson_scripts", {"ADetailer": {"args": []}}, "alwayson_scripts"),
    ("script_name", "x/y/z plot", "scripts"),
    ("subseed_strength", 0.3, "variation seeds"),
    ("styles", ["my style"], "styles"),
    ("width", 100, "multiples of 16"),
    ("sampler_name", "Restart", "unknown sampler"),
])
def test_what_cannot_be_honoured_is_refused(http, field, value, text):
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 32, "height": 32, field: value})
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"} and text in body["detail"]


def test_img2img(server, http):
    encodes = server.backend.calls["vae_encode"]
    body = {"prompt": "x", "init_images": ["data:image/png;base64," + b64_png(96, 48)], "denoising_strength": 0.35, "steps": 3,
            "seed": 5, "include_init_images": True}
    response = http.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    request = server.backend.requests[-1]
    assert server.backend.calls["vae_encode"] == encodes + 1 and request.denoise == 0.35 and request.seed == 5
    assert len(result["images"]) == 2 and png(result["images"][1]).size == (96, 48)  # + the init image
    assert png(result["images"][0]).size == (64, 32)  # no size sent: the model's pixel count at the picture's aspect
    assert result["parameters"]["init_images"] is None and json.loads(result["info"])["denoising_strength"] == 0.35
    refused = http.post("/sdapi/v1/img2img", json={**body, "mask": b64_png()})
    assert refused.status_code == 422 and "inpainting" in refused.json()["detail"]
    assert http.post("/sdapi/v1/img2img", json={"prompt": "x"}).status_code == 422


def test_progress_with_a_preview_and_interrupt(tmp_path):
    with running_server(tmp_path, DefaultsBackend(step_delay=0.05)) as running, httpx.Client(base_url=running.url, timeout=60) as http:
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=http.post("/sdapi/v1/txt2img", json={
            "prompt": "x", "steps": 400, "width": 64, "height": 64})))
        thread.start()
        deadline, progress = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            progress = http.get("/sdapi/v1/progress").json()
            if progress["state"]["sampling_step"] > 2 and progress["current_image"]:
                break
            time.sleep(0.05)
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 400 and progress["state"]["job_count"] == 1
        assert png(progress["current_image"]).size == (64, 64)
        assert http.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
        assert http.post("/sdapi/v1/interrupt").json() == {}
        thread.join(30)
        response = result["r"]
        assert response.status_code == 200 and response.json()["images"] == []  # A1111 answers an interrupted run normally
        assert http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
