"""The OpenAI Images API as the real `openai` SDK calls it, on a real server over the fake backend:
generations (b64, url, n > 1, formats), streaming partial images, edits, models, errors and
retries, the token, and the jobs sharing ComfyUI's queue."""

import base64
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from tests.fake_backend import FakeBackend  # noqa: E402
from tests.server_harness import running_server  # noqa: E402
from tests.test_server_api import queue, simple_prompt, wait_history  # noqa: E402

MODEL = "sd3.5_medium.safetensors"


class DefaultsBackend(FakeBackend):
    """The fake backend with model_defaults, the optional method the API reads recipes from."""

    def model_defaults(self, name):
        return {"steps": 4, "cfg": 2.0, "width": 64, "height": 48}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("openai"), DefaultsBackend()) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0, timeout=60)


def picture(b64_json: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64_json)))
    image.load()
    return image


def png_upload(width=128, height=64, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_models(client):
    assert [m.id for m in client.models.list()] == ["sd3.5_large_fp8_scaled.safetensors", MODEL]
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "sd3fp8"
    assert client.models.retrieve("sd3.5_medium").id == MODEL  # the file stem works too
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("dall-e-3")
    assert e.value.code == "model_not_found"


def test_generate_b64_with_the_model_defaults(server, client):
    response = client.images.generate(model=MODEL, prompt="a red circle", extra_body={"seed": 7})
    request = server.backend.requests[-1]
    assert (request.steps, request.cfg, request.seed, request.sampler_name, request.scheduler) == (4, 2.0, 7, "euler", "normal")
    assert list(request.latent.samples.shape) == [1, 16, 6, 8]
    assert response.size == "64x48" and response.output_format == "png" and response.quality == "high"
    assert len(response.data) == 1 and response.data[0].revised_prompt == "a red circle"
    image = picture(response.data[0].b64_json)
    assert image.size == (64, 48) and image.format == "PNG"
    assert "Seed: 7" in image.info["parameters"] and image.info["parameters"].startswith("a red circle\n")
    assert response.usage.output_tokens == 4 * 3 and response.model_extra["seed"] == 7
    low = client.images.generate(model=MODEL, prompt="a red circle", quality="low")
    assert server.backend.requests[-1].steps == 2 and low.quality == "low"


def test_n_and_our_extras(server, client):
    response = client.images.generate(
        model=MODEL, prompt="three blue squares", n=3, size="32x64",
        extra_body={"seed": 11, "negative_prompt": "red", "steps": 3, "cfg": 5.5, "sampler": "Euler a", "scheduler": "SGM Uniform"})
    request = server.backend.requests[-1]
    assert list(request.latent.samples.shape) == [3, 16, 8, 4]  # one sampler run, batch 3
    assert (request.seed, request.steps, request.cfg, request.sampler_name, request.scheduler) == (
        11, 3, 5.5, "euler_ancestral", "sgm_uniform")
    images = [picture(d.b64_json) for d in response.data]
    assert [im.size for im in images] == [(32, 64)] * 3
    texts = [im.info["parameters"] for im in images]
    assert all("Negative prompt: red" in t and "Sampler: Euler a" in t for t in texts)
    assert "Batch index" not in texts[0] and "Batch index: 2" in texts[2]


def test_url_response_and_formats(server, client):
    as_b64 = client.images.generate(model=MODEL, prompt="a cat", size="64x64", extra_body={"seed": 5})
    as_url = client.images.generate(model=MODEL, prompt="a cat", size="64x64", response_format="url", extra_body={"seed": 5})
    url = as_url.data[0].url
    assert url.startswith(server.url + "v1/images/files/") and as_url.data[0].b64_json is None
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content == base64.b64decode(as_b64.data[0].b64_json)  # same seed, same bytes
    assert httpx.get(server.url + "v1/images/files/nothing.png").status_code == 404
    jpeg = client.images.generate(model=MODEL, prompt="a cat", size="64x64", output_format="jpeg", output_compression=40,
                                  extra_body={"seed": 5})
    webp = client.images.generate(model=MODEL, prompt="a cat", size="64x64", output_format="webp", extra_body={"seed": 5})
    assert picture(jpeg.data[0].b64_json).format == "JPEG" and jpeg.output_format == "jpeg"
    assert picture(webp.data[0].b64_json).format == "WEBP"


def test_stream_partial_images(server, client):
    stream = client.images.generate(model=MODEL, prompt="a green star", size="64x64", stream=True, partial_images=2,
                                    extra_body={"seed": 3, "steps": 6})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(picture(e.b64_json).size == (64, 64) for e in events)
    assert events[-1].usage.output_tokens == 16 and events[-1].size == "64x64"
    assert "Seed: 3" in picture(events[-1].b64_json).info["parameters"]


def test_edits(server, client):
    encodes = server.backend.calls["vae_encode"]
    response = client.images.edit(model=MODEL, image=("in.png", png_upload(), "image/png"), prompt="make it blue",
                                  extra_body={"strength": 0.4, "seed": 9})
    request = server.backend.requests[-1]
    assert server.backend.calls["vae_encode"] == encodes + 1 and request.denoise == 0.4 and request.seed == 9
    assert response.size == "64x32"  # size auto: about the model's default pixel count (64x48) at the picture's 2:1 aspect
    assert picture(response.data[0].b64_json).size == (64, 32)
    two = client.images.edit(model=MODEL, image=[("in.png", png_upload(), "image/png")], prompt="x", n=2, size="32x32",
                             extra_body={"seed": 20})  # image[] as Open WebUI sends it; n runs, seeds 20 and 21
    assert len(two.data) == 2 and [r.seed for r in server.backend.requests[-2:]] == [20, 21]
    with pytest.raises(openai.BadRequestError, match="inpainting"):
        client.images.edit(image=("in.png", png_upload(), "image/png"), mask=("m.png", png_upload(), "image/png"), prompt="x")
    with pytest.raises(openai.BadRequestError, match="one image"):
        client.images.edit(image=[("a.png", png_upload(), "image/png"), ("b.png", png_upload(), "image/png")], prompt="x")
    with pytest.raises(openai.BadRequestError, match="cannot be read"):
        client.images.edit(image=("a.png", b"not a picture", "image/png"), prompt="x")


def test_stream_edit_events(client):
    events = list(client.images.edit(image=("in.png", png_upload(64, 64), "image/png"), prompt="x", stream=True, partial_images=1,
                                     size="64x64", extra_body={"steps": 4}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]


@pytest.mark.parametrize(("kwargs", "param", "text"), [
    ({"size": "100x100"}, "size", "multiples of 16"),
    ({"size": "8192x16"}, "size", "multiples of 16"),
    ({"n": 11}, "n", "1..10"),
    ({"background": "transparent"}, "background", "no alpha"),
    ({"output_format": "gif"}, "output_format", "Supported values"),
    ({"extra_body": {"sead": 1}}, "sead", "Unknown parameter"),
    ({"extra_body": {"sampler": "warp_drive"}}, "sampler", "unknown sampler"),
    ({"extra_body": {"steps": 0}}, "steps", "1..1000"),
])
def test_bad_requests_raise_bad_request_error(client, kwargs, param, text):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=MODEL, prompt="x", **kwargs)
    assert e.value.param == param and text in e.value.message
    assert e.value.response.headers["x-should-retry"] == "false"


def test_error_shape_and_unknown_model(server):
    response = httpx.post(server.url + "v1/images/generations", json={"prompt": "x", "model": "dall-e-3"})
    assert response.status_code == 404 and response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "model_not_found" and error["param"] == "model"
    missing = httpx.post(server.url + "v1/images/generations", json={"model": MODEL})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_required_parameter"
    assert httpx.post(server.url + "v1/images/generations", content=b"{").json()["error"]["code"] == "invalid_json"


def test_a_failed_generation_is_not_retried(server):
    client = openai.OpenAI(base_url=server.url + "v1", api_key="unused", timeout=60)  # the SDK's default: 2 retries
    before = server.backend.calls["sample"]
    server.backend.fail_next_sample = "CUDA out of memory. Tried to allocate 20.00 GiB"
    with pytest.raises(openai.InternalServerError) as e:
        client.images.generate(model=MODEL, prompt="x", size="32x32")
    assert e.value.code == "out_of_memory" and e.value.response.headers["x-should-retry"] == "false"
    assert server.backend.calls["sample"] == before + 1


def test_token(tmp_path):
    with running_server(tmp_path, DefaultsBackend(), token="s3cret-token") as running:
        good = openai.OpenAI(base_url=running.url + "v1", api_key="s3cret-token", max_retries=0)
        assert good.images.generate(prompt="x", size="32x32").data[0].b64_json
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "v1", api_key="wrong-token", max_retries=0).models.list()


def test_jobs_share_comfyuis_queue(tmp_path):
    """An OpenAI request waits in the same queue as a ComfyUI prompt, shows in /queue and /history."""
    with running_server(tmp_path, DefaultsBackend(step_delay=0.05)) as running, running.client() as http:
        comfy = queue(http, simple_prompt(steps=20))["prompt_id"]
        client = openai.OpenAI(base_url=running.url + "v1", api_key="unused", max_retries=0)
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=client.images.generate(prompt="x", size="32x32")))
        thread.start()
        deadline, pending = time.monotonic() + 20, []
        while time.monotonic() < deadline and not pending:
            pending = http.get("/queue").json()["queue_pending"]
            time.sleep(0.02)
        assert pending and pending[0][3]["sd3fp8_api"] == "openai"
        assert pending[0][2]["1"]["class_type"] == "CheckpointLoaderSimple"  # an API-format workflow
        thread.join(30)
        assert result["r"].data[0].b64_json
        wait_history(http, comfy)
        history = http.get("/history").json()
        assert len(history) == 2 and all(h["status"]["status_str"] == "success" for h in history.values())


def test_a_client_that_goes_away_takes_its_job_along(tmp_path):
    with running_server(tmp_path, DefaultsBackend(step_delay=0.1)) as running:
        with httpx.stream("POST", running.url + "v1/images/generations", timeout=30,
                          json={"prompt": "x", "size": "32x32", "stream": True, "partial_images": 3, "steps": 200}) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    assert json.loads(line[5:])["type"] == "image_generation.partial_image"
                    break
        deadline = time.monotonic() + 20
        while running.state.queue.remaining() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.state.queue.remaining() == 0
        (entry,) = running.state.queue.history().values()
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"


def test_a_client_that_times_out_takes_its_job_along(tmp_path):
    with running_server(tmp_path, DefaultsBackend(step_delay=0.1)) as running:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(running.url + "v1/images/generations", json={"prompt": "x", "size": "32x32", "steps": 300}, timeout=1.5)
        deadline = time.monotonic() + 20
        while running.state.queue.remaining() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.state.queue.remaining() == 0 and running.backend.calls["sample"] == 1
        (entry,) = running.state.queue.history().values()
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
