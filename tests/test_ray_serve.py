"""Ray Serve on this machine: 2 CPU replicas of the miniature model behind the ingress, against the
single-process server over the same engine. One Ray cluster for the module (startup is slow)."""

import base64
import functools
import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from sd3fp8.scale.ray_serve import APP_NAME, RayOptions, replica_names, start, stop  # noqa: E402
from sd3fp8.server.pipeline_backend import PipelineBackend  # noqa: E402
from tests.server_harness import free_port, running_server  # noqa: E402

REQUEST = {"prompt": "a red circle in the top left", "size": "64x64", "extra_body": {"seed": 123, "steps": 4}}


@pytest.fixture(scope="module")
def ray_url():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=150 * 2**20)
    try:
        yield start(functools.partial(PipelineBackend, threads=1), RayOptions(replicas=2, num_cpus=1), port=free_port())
    finally:
        stop()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process server (the shared-queue path) on the same engine, one torch thread as the replicas."""
    import torch

    threads = torch.get_num_threads()
    try:
        with running_server(tmp_path_factory.mktemp("single"), PipelineBackend(threads=1)) as running:
            yield running
    finally:
        torch.set_num_threads(threads)


def sdk(url: str, **options) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "v1", api_key="unused", timeout=300, **{"max_retries": 0, **options})


def pixels(b64_json: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_json))).convert("RGB"), dtype=np.int16)


def test_same_seed_same_pixels_as_the_single_server(ray_url, single):
    on_ray = sdk(ray_url).images.generate(n=2, **REQUEST)
    alone = sdk(single.url).images.generate(n=2, **REQUEST)
    assert [d.b64_json for d in on_ray.data] == [d.b64_json for d in alone.data]  # same PNG bytes, metadata included
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (250, 250, 250)).save(buffer, format="PNG")
    edit = {"image": ("in.png", buffer.getvalue(), "image/png"), "prompt": "a blue square", "size": "64x64",
            "extra_body": {"seed": 9, "steps": 4, "strength": 0.6}}
    assert sdk(ray_url).images.edit(**edit).data[0].b64_json == sdk(single.url).images.edit(**edit).data[0].b64_json


def test_concurrent_requests_spread_over_replicas(ray_url, single):
    client, results, workers = sdk(ray_url), {}, {}

    def one(seed):
        raw = client.images.with_raw_response.generate(prompt="a green square", size="64x64", extra_body={"seed": seed, "steps": 4})
        results[seed], workers[seed] = raw.parse().data[0].b64_json, raw.headers["x-sd3fp8-worker"]

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(results) == 6 and len(set(workers.values())) == 2  # both replicas served
    reference = sdk(single.url)
    for seed, b64_json in results.items():
        alone = reference.images.generate(prompt="a green square", size="64x64", extra_body={"seed": seed, "steps": 4})
        # requests waiting together on one replica share a sampler run: equal up to the matmul rounding of a larger batch
        assert np.abs(pixels(b64_json) - pixels(alone.data[0].b64_json)).max() <= 4


def test_streaming_and_a1111_over_ray(ray_url):
    events = list(sdk(ray_url).images.generate(stream=True, partial_images=2, **REQUEST))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    response = httpx.post(ray_url + "sdapi/v1/txt2img", json={"prompt": "a cross", "steps": 3, "seed": 4}, timeout=300)
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    assert [m["title"] for m in httpx.get(ray_url + "sdapi/v1/sd-models").json()] == ["sd3fp8-mini"]


def test_a_killed_replica_fails_its_requests_cleanly_and_is_replaced(ray_url):
    client, outcomes = sdk(ray_url), {}
    before = replica_names()

    def one(seed):
        try:
            client.images.generate(prompt="a yellow star", size="64x64", extra_body={"seed": seed, "steps": 40, "sampler": "euler_ancestral"})
            outcomes[seed] = 200
        except openai.APIStatusError as e:
            outcomes[seed] = (e.status_code, e.code)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(3)  # all accepted and running or queued on a replica
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    for thread in threads:
        thread.join(300)
    assert len(outcomes) == 6  # every request got an answer
    assert set(outcomes.values()) <= {200, (503, "worker_unavailable")}
    assert (503, "worker_unavailable") in outcomes.values()  # the killed replica's requests failed, cleanly
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = serve.status().applications[APP_NAME]
        names = replica_names()
        if status.status == "RUNNING" and len(names) == 2 and before[0] not in names:
            break
        time.sleep(2)
    assert len(names) == 2 and before[0] not in names  # replaced
    assert client.images.generate(**REQUEST).data[0].b64_json
