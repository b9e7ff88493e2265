"""The server over the REAL engine backend and the bundled miniature model, driven the way ComfyUI's
clients drive it: websockets_api_example.py, SillyTavern's polling, the SD3.5 simple template, a
reseeded re-run, an interrupt; and the image equals the engine's for the same request."""

import io
import json
import struct
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd3fp8.engine.pipeline import GenerationRequest
from sd3fp8.runtime import RuntimeConfig
from sd3fp8.server.engine_backend import EngineBackend
from sd3fp8.server.engine_models import BUNDLED_NAME, LoadOptions
from tests.server_harness import Events, running_server
from tests.test_server_api import queue, wait_history

DATA = Path(__file__).parent / "data" / "comfyui"
FP32 = LoadOptions(runtime=RuntimeConfig(device="cpu", dtype="fp32"))  # the same numbers on every CPU


class Recording(EngineBackend):
    """The engine backend, keeping each sampler result (to compare latents bit for bit)."""

    def sample(self, request, callback, interrupt):
        out = super().sample(request, callback, interrupt)
        self.__dict__.setdefault("samples", []).append(out)
        return out


def template_prompt(seed=None, steps=None):
    """The API prompt the real frontend queues for the SD3.5 simple template, on the bundled model at
    its own size (the change the server's /templates makes; the model's position table ends at 128 px)."""
    prompt = json.loads((DATA / "sd3.5_simple_example.api.json").read_text())
    prompt["4"]["inputs"]["ckpt_name"] = BUNDLED_NAME
    prompt["53"]["inputs"].update(width=64, height=64)
    if seed is not None:
        prompt["3"]["inputs"]["seed"] = seed
    if steps is not None:
        prompt["3"]["inputs"]["steps"] = steps
    return prompt


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve"), Recording(options=FP32)) as running:
        yield running


def engine_of(server):
    (model, _, _), = server.backend.models.kinds["checkpoint"].values()
    return model.engine


def png_chunks(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as image:
        return dict(image.text)


def test_object_info_offers_the_bundled_model(server):
    with server.client() as client:
        info = client.get("/object_info").json()
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [BUNDLED_NAME]
    assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == []  # SillyTavern reads it
    assert info["KSampler"]["input"]["required"]["sampler_name"][0][:2] == ["euler", "euler_ancestral"]


def test_websockets_api_example_flow(server):
    """websockets_api_example.py: WS, POST /prompt with client_id and prompt_id, wait for executing
    None, GET /history/{id}, GET /view; the PNG carries the prompt and the UI workflow."""
    client_id, prompt_id = str(uuid.uuid4()), str(uuid.uuid4())
    workflow = json.loads((DATA / "sd3.5_simple_example.ui.json").read_text())
    events = Events(server.ws_url, client_id=client_id)
    with server.client() as client:
        answer = queue(client, template_prompt(seed=7, steps=3), client_id=client_id, prompt_id=prompt_id,
                       extra_data={"extra_pnginfo": {"workflow": workflow}})
        assert answer == {"prompt_id": prompt_id, "number": answer["number"], "node_errors": {}}
        events.until_done(prompt_id, timeout=300)
        history = client.get(f"/history/{prompt_id}").json()[prompt_id]
        (image,) = [image for output in history["outputs"].values() for image in output["images"]]
        data = client.get("/view", params=image).content
    events.close()
    assert history["status"]["status_str"] == "success", history["status"]
    chunks = png_chunks(data)
    assert json.loads(chunks["prompt"])["4"]["inputs"]["ckpt_name"] == BUNDLED_NAME
    assert json.loads(chunks["workflow"]) == workflow and json.loads(chunks["sd3fp8"])["seed"] == 7
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    progress = [m[1] for m in events.messages if isinstance(m, tuple) and m[0] == "progress"]
    assert [(p["value"], p["max"]) for p in progress] == [(1, 3), (2, 3), (3, 3)]
    frames = [m for m in events.messages if isinstance(m, bytes)]
    assert len(frames) == 3 and all(f[:8] == struct.pack(">II", 1, 1) for f in frames)  # latent2rgb previews, format 1
    Image.open(io.BytesIO(frames[-1][8:])).verify()


def test_sillytavern_polls_history(server):
    """SillyTavern: the body as a JSON string without Content-Type, GET /history polled until the id appears."""
    with server.client() as client:
        response = client.post("/prompt", content=json.dumps({"prompt": template_prompt(seed=3, steps=2)}))
        assert response.status_code == 200, response.text
        entry = wait_history(client, response.json()["prompt_id"], timeout=300)
        assert entry["status"]["status_str"] == "success"
        view = client.get("/view", params=entry["outputs"]["9"]["images"][0])
    assert view.status_code == 200 and view.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sd35_simple_template_gives_the_engines_image(server):
    """The reference template (20 steps, euler, sgm_uniform, cfg 4.01) end to end, and the same image
    as the engine called directly with the equivalent request."""
    prompt = template_prompt()
    with server.client() as client:
        entry = wait_history(client, queue(client, prompt)["prompt_id"], timeout=600)
        served = np.asarray(Image.open(io.BytesIO(client.get("/view", params=entry["outputs"]["9"]["images"][0]).content)))
    assert entry["status"]["status_str"] == "success", entry["status"]
    sampler = prompt["3"]["inputs"]
    request = GenerationRequest(prompt["16"]["inputs"]["text"], prompt["40"]["inputs"]["text"], steps=sampler["steps"],
                                cfg=sampler["cfg"], seed=sampler["seed"], width=64, height=64, sampler=sampler["sampler_name"],
                                scheduler=sampler["scheduler"], text_mode="comfy")
    engine = engine_of(server)
    latent = engine.generate(request, output="latent").images[0]
    assert torch.equal(latent, server.backend.samples[-1][0])
    with torch.inference_mode():
        direct = np.asarray(engine.decode(latent[None])[0], dtype=np.int16)  # what engine.generate(request) returns
    # SaveImage truncates 255 x like ComfyUI, diffusers' PIL conversion rounds: at most one grey level apart
    assert np.abs(direct - served).max() <= 1


def test_reseeded_rerun_neither_loads_nor_encodes(server):
    engine = engine_of(server) if server.backend.models.kinds else None
    events = Events(server.ws_url, client_id="again")
    with server.client() as client:
        first = queue(client, template_prompt(seed=11, steps=2), client_id="again")["prompt_id"]
        events.until_done(first, timeout=300)
        engine = engine or engine_of(server)
        calls = []
        hook = engine.component("text_encoder").register_forward_pre_hook(lambda *a: calls.append(1))
        encoded, loads = server.backend.calls["encode_text"], dict(server.backend.models.loads)
        events.messages.clear()
        second = queue(client, template_prompt(seed=12, steps=2), client_id="again")["prompt_id"]
        events.until_done(second, timeout=300)
        hook.remove()
        assert client.get(f"/history/{second}").json()[second]["status"]["status_str"] == "success"
    (cached,) = [m[1] for m in events.messages if isinstance(m, tuple) and m[0] == "execution_cached"]
    assert sorted(cached["nodes"], key=int) == ["4", "16", "40", "53"]
    assert calls == [] and server.backend.calls["encode_text"] == encoded  # the prompt was not encoded again
    assert dict(server.backend.models.loads) == loads == {"checkpoint": 1}  # nor the model loaded again
    assert not torch.equal(server.backend.samples[-1], server.backend.samples[-2])  # a new seed, a new image


def test_interrupt_stops_within_one_step(server):
    events = Events(server.ws_url, client_id="stop")
    with server.client() as client:
        prompt_id = queue(client, template_prompt(seed=5, steps=500), client_id="stop")["prompt_id"]
        events.until(lambda m: isinstance(m, tuple) and m[0] == "progress", timeout=300)
        started = time.monotonic()
        assert client.post("/interrupt", json={"prompt_id": prompt_id}).status_code == 200
        events.until_done(prompt_id, timeout=120)
        stopped = time.monotonic() - started
        entry = client.get(f"/history/{prompt_id}").json()[prompt_id]
    after = [m for m in events.messages if isinstance(m, tuple) and m[0] in ("progress", "execution_interrupted")]
    steps = [m[1]["value"] for m in after if m[0] == "progress"]
    assert after[-1][0] == "execution_interrupted" and after[-1][1]["node_id"] == "3"
    assert max(steps) < 500 and entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert stopped < 60  # one model call at most (seconds on a busy CPU), never the 500 steps


def test_limits_and_sizes_the_model_cannot_take(server):
    with server.client() as client:
        too_big = template_prompt()
        too_big["53"]["inputs"]["width"] = 8192
        response = client.post("/prompt", json={"prompt": too_big})
        assert response.status_code == 400
        (error,) = response.json()["node_errors"]["53"]["errors"]
        assert error["type"] == "value_bigger_than_max" and error["extra_info"]["input_name"] == "width"
        beyond = template_prompt(steps=1)
        beyond["53"]["inputs"].update(width=256, height=256)
        entry = wait_history(client, queue(client, beyond)["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "error"
    message = dict(entry["status"]["messages"])["execution_error"]
    assert "mini-sd3 generates at most 128x128 pixels" in message["exception_message"]


def test_the_template_is_served_fitted_to_the_bundled_model(server):
    pytest.importorskip("comfyui_workflow_templates_core")
    with server.client() as client:
        workflow = client.get("/templates/sd3.5_simple_example.json").json()
    nodes = {node["type"]: node for node in workflow["nodes"]}
    assert nodes["CheckpointLoaderSimple"]["widgets_values"] == [BUNDLED_NAME]
    assert nodes["CheckpointLoaderSimple"]["properties"]["models"] == []  # no download prompt for a file we do not use
    assert nodes["EmptySD3LatentImage"]["widgets_values"] == [64, 64, 1]
    assert nodes["KSampler"]["widgets_values"][2:] == [20, 4.01, "euler", "sgm_uniform", 1]  # the rest as published


def test_the_openai_sdk_over_the_engine_gets_the_models_defaults_and_the_engines_image(server):
    """OpenAI Images through the real SDK on the engine backend: an omitted size is the model's own
    (the bundled model's 64x64, not SD3.5's 1024), and the picture is the engine's for that request."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0, timeout=600)
    assert BUNDLED_NAME in [m.id for m in client.models.list()]
    response = client.images.generate(model=BUNDLED_NAME, prompt="a red circle", extra_body={"seed": 5, "steps": 4})
    assert response.size == "64x64"
    import base64

    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))), dtype=np.int16)
    request = GenerationRequest("a red circle", "", steps=4, cfg=3.0, seed=5, width=64, height=64, sampler="euler",
                                scheduler="normal", text_mode="comfy")
    engine = engine_of(server)
    latent = engine.generate(request, output="latent").images[0]
    assert torch.equal(latent, server.backend.samples[-1][0])
    with torch.inference_mode():
        direct = np.asarray(engine.decode(latent[None])[0], dtype=np.int16)
    assert served.shape == (64, 64, 3) and np.abs(direct - served).max() <= 1
