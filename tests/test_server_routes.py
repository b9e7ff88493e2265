"""The informational routes and the frontend's startup calls, in the shapes serving.md lists."""

import json
from pathlib import Path

import httpx
import pytest
from PIL import Image

from sd3fp8.server import installed_frontend
from sd3fp8.server.inventory import ModelTree
from tests.fake_backend import COMFY_SAMPLERS, COMFY_SCHEDULERS, FakeBackend
from tests.server_harness import running_server

DATA = Path(__file__).parent / "data" / "comfyui"
REFERENCE = json.loads((DATA / "object_info_sd35.json").read_text())


@pytest.fixture
def server(tmp_path):
    with running_server(tmp_path, FakeBackend(samplers=COMFY_SAMPLERS, schedulers=COMFY_SCHEDULERS)) as running:
        Image.new("RGB", (8, 8)).save(running.config.input / "example.png")
        yield running


def test_object_info_over_http_equals_comfyui(server):
    info = httpx.get(server.url + "api/object_info").json()
    assert set(info) <= set(REFERENCE) | {"EmptyLatentImage"}
    for name, entry in info.items():
        assert entry == REFERENCE[name], name
    # what SillyTavern reads
    assert info["KSampler"]["input"]["required"]["sampler_name"][0][:3] == ["euler", "euler_cfg_pp", "euler_ancestral"]
    assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == []


def test_startup_routes_of_the_frontend(server):
    with server.client() as client:
        stats = client.get("/api/system_stats").json()
        assert set(stats["system"]) >= {"os", "ram_total", "ram_free", "comfyui_version", "required_frontend_version",
                                        "installed_templates_version", "required_templates_version", "python_version",
                                        "pytorch_version", "embedded_python", "argv"}
        assert set(stats["devices"][0]) == {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"}
        assert client.get("/api/features").json() == {"supports_preview_metadata": True, "max_upload_size": 100 * 1024 * 1024}
        assert client.get("/api/users").json()["storage"] == "server"
        assert client.get("/api/extensions").json() == []  # no frontend configured here
        assert client.get("/api/embeddings").json() == []
        assert client.get("/api/i18n").json() == {}
        assert client.get("/api/global_subgraphs").json() == {}
        assert client.get("/api/workflow_templates").json() == {}
        assert client.get("/internal/logs").json() == ""
        assert client.get("/api/internal/logs/raw").json()["entries"] == []
        assert client.get("/api/models").json() == ["checkpoints", "diffusion_models", "text_encoders", "vae"]
        assert client.get("/api/models/checkpoints").json() == ["sd3.5_large_fp8_scaled.safetensors", "sd3.5_medium.safetensors"]
        assert client.get("/api/models/clip").json() == ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"]
        assert client.get("/api/models/loras").status_code == 404
        assert client.get("/api/experiment/models").json()[0] == {"name": "checkpoints", "folders": ["checkpoints"]}
        assert client.get("/api/experiment/models/vae").json() == [{"name": "pixel_space", "pathIndex": 0}]
        assert client.get("/internal/files/input").json() == ["example.png"]
        assert client.post("/api/free", json={"unload_models": True}).status_code == 200


def test_templates_list_only_what_runs(server):
    pytest.importorskip("comfyui_workflow_templates_core")
    with server.client() as client:
        index = client.get("/templates/index.json").json()
        names = [t["name"] for category in index for t in category["templates"]]
        assert names == ["sd3.5_simple_example"]  # the ControlNet templates need nodes we do not have yet
        template = client.get("/templates/sd3.5_simple_example.json")
        assert template.status_code == 200 and "KSampler" in template.text
        assert client.get("/templates/sd3.5_simple_example-1.webp").headers["content-type"] == "image/webp"
        assert client.get("/templates/sd3.5_large_blur.json").status_code == 404
        assert client.get("/templates/index.fr.json").status_code == 200


def test_frontend_static_files(tmp_path):
    frontend = installed_frontend()
    if frontend is None:
        pytest.skip("comfyui-frontend-package is not installed")
    with running_server(tmp_path, frontend=frontend) as server, server.client() as client:
        page = client.get("/")
        assert page.status_code == 200 and "index-" in page.text
        extensions = client.get("/api/extensions").json()
        assert extensions and all(e.startswith("/extensions/") and e.endswith(".js") for e in extensions)
        assert client.get(extensions[0]).status_code == 200
        assert client.get("/api/userdata/user.css").status_code == 404


def test_model_tree_inventory(tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    for rel in ("checkpoints/sd3.5_medium.safetensors", "checkpoints/sub/other.safetensors", "checkpoints/old.ckpt",
                "unet/mmdit.safetensors", "clip/clip_l.safetensors", "text_encoders/t5xxl.sft", "vae/ae.safetensors"):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        (models / rel).write_bytes(b"")
    tree = ModelTree(tmp_path / "ComfyUI")
    assert tree.files("checkpoints") == ["sd3.5_medium.safetensors", "sub/other.safetensors"]  # no pickles
    assert tree.files("diffusion_models") == ["mmdit.safetensors"]
    assert tree.files("text_encoders") == ["clip_l.safetensors", "t5xxl.sft"]
    assert tree.path("vae", "ae.safetensors") == (models / "vae" / "ae.safetensors").resolve()
    picky = ModelTree(models, recognise=lambda folder, path: None if "sd3" in path.name else "not an SD3 file")
    assert picky.files("checkpoints") == ["sd3.5_medium.safetensors"]
    with pytest.raises(Exception, match="not allowed"):
        tree.path("vae", "../checkpoints/sd3.5_medium.safetensors")
