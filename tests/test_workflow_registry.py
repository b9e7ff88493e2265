"""The SD3.5 node set's /object_info entries against ComfyUI 0.8.0's, and UI -> API conversion."""

import copy
import json
from pathlib import Path

import pytest
from PIL import Image

from sd3fp8.workflow import Folders, build_registry, ui_to_api
from sd3fp8.workflow.convert import ConversionError
from tests.fake_backend import COMFY_SAMPLERS, COMFY_SCHEDULERS, FakeBackend

DATA = Path(__file__).parent / "data" / "comfyui"
REFERENCE = json.loads((DATA / "object_info_sd35.json").read_text())
ISSUE_NODES = ["CheckpointLoaderSimple", "UNETLoader", "TripleCLIPLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader",
               "CLIPTextEncode", "CLIPTextEncodeSD3", "EmptySD3LatentImage", "EmptyLatentImage", "ModelSamplingSD3", "KSampler",
               "KSamplerAdvanced", "ConditioningZeroOut", "ConditioningSetTimestepRange", "ConditioningCombine", "VAEEncode",
               "VAEDecode", "LoadImage", "SaveImage", "PreviewImage", "SaveImageWebsocket"]


@pytest.fixture
def folders(tmp_path):
    f = Folders.under(tmp_path)
    for p in (f.input, f.output, f.temp):
        p.mkdir(parents=True)
    return f


def reference_registry(folders):
    """Our registry over an inventory holding the files the reference installation had."""
    Image.new("RGB", (8, 8)).save(folders.input / "example.png")
    return build_registry(FakeBackend(samplers=COMFY_SAMPLERS, schedulers=COMFY_SCHEDULERS), folders)


def test_the_issue_node_set_is_declared(folders):
    registry = reference_registry(folders)
    assert sorted(registry.nodes) == sorted(ISSUE_NODES)


@pytest.mark.parametrize("name", ISSUE_NODES)
def test_object_info_entry_equals_comfyui(folders, name):
    info = reference_registry(folders).node_info(name)
    assert info == REFERENCE[name]
    assert list(info) == list(REFERENCE[name])  # same key order too
    assert json.loads(json.dumps(info)) == REFERENCE[name]


def test_combo_lists_come_from_the_inventory(folders):
    backend = FakeBackend(files={"checkpoints": ["mine.safetensors"], "vae": ["v.safetensors"], "text_encoders": ["t5.safetensors"],
                                 "diffusion_models": ["unet.safetensors"]})
    (folders.input / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folders.input / "b.png")
    Image.new("RGB", (8, 8)).save(folders.input / "a.jpg")
    (folders.input / "notes.txt").write_text("not an image")
    info = build_registry(backend, folders).object_info()
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["mine.safetensors"]
    assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == ["unet.safetensors"]
    assert info["VAELoader"]["input"]["required"]["vae_name"][0] == ["v.safetensors"]
    assert info["TripleCLIPLoader"]["input"]["required"]["clip_name2"][1]["options"] == ["t5.safetensors"]
    assert info["KSampler"]["input"]["required"]["sampler_name"][0] == backend.samplers
    assert info["KSamplerAdvanced"]["input"]["required"]["scheduler"][0] == backend.schedulers
    assert info["LoadImage"]["input"]["required"]["image"][0] == ["a.jpg", "b.png"]


def test_legacy_combo_form_where_clients_index_zero(folders):
    info = reference_registry(folders).object_info()
    # Open WebUI / SillyTavern / Krita read <loader>.input.required.<name>[0] as the list
    for node, name in [("CheckpointLoaderSimple", "ckpt_name"), ("UNETLoader", "unet_name"), ("VAELoader", "vae_name"),
                       ("KSampler", "sampler_name"), ("KSampler", "scheduler"), ("DualCLIPLoader", "clip_name1")]:
        assert isinstance(info[node]["input"]["required"][name][0], list)


def test_golden_ui_to_api_conversion(folders):
    ui = json.loads((DATA / "sd3.5_simple_example.ui.json").read_text())
    expected = json.loads((DATA / "sd3.5_simple_example.api.json").read_text())
    assert ui_to_api(ui, reference_registry(folders)) == expected


def _ui_node(node_id, type_, widgets=(), inputs=(), outputs=(), mode=0, **extra):
    return {"id": node_id, "type": type_, "mode": mode, "widgets_values": list(widgets), "order": node_id,
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": t, "type": t, "links": []} for t in outputs], **extra}


def test_conversion_reroutes_bypass_mute_and_companion_widgets(folders):
    registry = reference_registry(folders)
    ui = {"nodes": [
        _ui_node(1, "CheckpointLoaderSimple", ["sd3.5_medium.safetensors"], outputs=["MODEL", "CLIP", "VAE"]),
        _ui_node(2, "Reroute", inputs=[("", "*", 10)], outputs=["MODEL"]),
        _ui_node(3, "ModelSamplingSD3", [3.0], inputs=[("model", "MODEL", 11)], outputs=["MODEL"], mode=4),  # bypassed
        _ui_node(4, "KSamplerAdvanced", ["enable", 7, "fixed", 4, 5.0, "euler", "simple", 0, 10000],  # 'disable' missing
                 inputs=[("model", "MODEL", 12)], outputs=["LATENT"]),
        _ui_node(5, "LoadImage", ["example.png", "image"], outputs=["IMAGE", "MASK"]),
        _ui_node(6, "PreviewImage", inputs=[("images", "IMAGE", 13)], mode=2),  # muted
        _ui_node(7, "MarkdownNote", ["hello"]),
        _ui_node(8, "PreviewImage", [], inputs=[("images", "IMAGE", 14)]),
    ], "links": [[10, 1, 0, 2, 0, "MODEL"], [11, 2, 0, 3, 0, "MODEL"], [12, 3, 0, 4, 0, "MODEL"], [13, 5, 0, 6, 0, "IMAGE"],
                 [14, 5, 0, 8, 0, "IMAGE"]]}
    prompt = ui_to_api(ui, registry)
    assert sorted(prompt, key=int) == ["1", "4", "5", "8"]
    sampler = prompt["4"]["inputs"]
    assert sampler["model"] == ["1", 0]  # through the reroute and the bypassed node
    assert sampler["noise_seed"] == 7 and sampler["steps"] == 4 and sampler["end_at_step"] == 10000
    assert sampler["return_with_leftover_noise"] == "disable"  # default for a missing trailing value
    assert prompt["5"]["inputs"] == {"image": "example.png"}
    assert prompt["8"] == {"inputs": {"images": ["5", 0]}, "class_type": "PreviewImage", "_meta": {"title": "Preview Image"}}


def test_conversion_refuses_subgraphs(folders):
    ui = {"nodes": [_ui_node(1, "abc-uuid")], "links": [], "definitions": {"subgraphs": [{"id": "abc-uuid"}]}}
    with pytest.raises(ConversionError, match="subgraph"):
        ui_to_api(ui, reference_registry(folders))


def test_conversion_wraps_list_values_and_keeps_unknown_nodes(folders):
    ui = {"nodes": [_ui_node(1, "CLIPTextEncode", [["a", "b"]]), _ui_node(2, "FancyCustomNode", [1], title="Fancy")], "links": []}
    prompt = ui_to_api(copy.deepcopy(ui), reference_registry(folders))
    assert prompt["1"]["inputs"]["text"] == {"__value__": ["a", "b"]}
    assert prompt["2"] == {"inputs": {}, "class_type": "FancyCustomNode", "_meta": {"title": "Fancy"}}
