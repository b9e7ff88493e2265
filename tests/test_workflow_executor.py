"""The executor: dependency order, ComfyUI's events and cache, interruption, errors, image nodes."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from sd3fp8.workflow import Executor, Folders, InterruptFlag, build_registry, validate_prompt
from sd3fp8.workflow.images import save_target
from sd3fp8.workflow.types import NodeError
from tests.fake_backend import FakeBackend

DATA = Path(__file__).parent / "data" / "comfyui"


def simple_prompt(seed=1, steps=3, size=64):
    p = json.loads((DATA / "sd3.5_simple_example.api.json").read_text())
    p["3"]["inputs"].update(seed=seed, steps=steps)
    p["53"]["inputs"].update(width=size, height=size)
    return p


class Sink:
    def __init__(self, on_event=None):
        self.events, self.on_event = [], on_event

    def send(self, event, data, broadcast=False):
        self.events.append((event, data))
        if self.on_event:
            self.on_event(event, data)

    def preview(self, node_id, preview):
        self.events.append(("preview", {"node": node_id, "format": preview.format, "size": preview.image.size}))

    def names(self):
        return [e for e, _ in self.events]

    def of(self, name):
        return [d for e, d in self.events if e == name]


@pytest.fixture
def env(tmp_path):
    folders = Folders.under(tmp_path)
    for p in (folders.input, folders.output, folders.temp):
        p.mkdir(parents=True)
    backend = FakeBackend()
    registry = build_registry(backend, folders)
    return backend, registry, Executor(registry, backend)


def run(env, prompt, sink=None, interrupt=None, extra_data=None, prompt_id="p1"):
    backend, registry, executor = env
    result = validate_prompt(registry, prompt)
    assert result.ok, result.node_errors
    sink = sink or Sink()
    outcome = executor.execute(prompt_id, result.prompt, result.outputs, extra_data or {}, sink, interrupt or InterruptFlag())
    return outcome, sink


def test_first_run_event_order_and_output(env):
    extra = {"extra_pnginfo": {"workflow": {"nodes": [], "links": []}}}
    outcome, sink = run(env, simple_prompt(), extra_data=extra)
    names = sink.names()
    assert names[:2] == ["execution_start", "execution_cached"] and sink.of("execution_cached")[0]["nodes"] == []
    assert names[-1] == "execution_success"
    executing = [d["node"] for d in sink.of("executing")]
    assert sorted(executing, key=int) == ["3", "4", "8", "9", "16", "40", "53"]
    for before, after in [("4", "16"), ("16", "3"), ("40", "3"), ("53", "3"), ("3", "8"), ("8", "9")]:
        assert executing.index(before) < executing.index(after)
    # per node: progress_state (running), executing, ..., progress_state (finished)
    i = names.index("executing")
    assert names[i - 1] == "progress_state" and sink.events[i - 1][1]["nodes"][executing[0]]["state"] == "running"
    progress = sink.of("progress")
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 3, "3"), (2, 3, "3"), (3, 3, "3")]
    assert names.count("preview") == 3
    (executed,) = sink.of("executed")
    assert executed["node"] == "9" and executed["output"] == {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "",
                                                                          "type": "output"}]}
    assert outcome.success and outcome.status["status_str"] == "success" and outcome.status["completed"] is True
    assert [m[0] for m in outcome.messages] == ["execution_start", "execution_cached", "execution_success"]
    assert outcome.outputs == {"9": executed["output"]}
    assert outcome.meta == {"9": {"node_id": "9", "display_node": "9", "parent_node": None, "real_node_id": "9"}}
    path = env[1].folders.output / "ComfyUI_00001_.png"
    with Image.open(path) as image:
        assert image.size == (64, 64)
        assert json.loads(image.text["prompt"])["3"]["inputs"]["seed"] == 1
        assert json.loads(image.text["workflow"]) == extra["extra_pnginfo"]["workflow"]
        params = json.loads(image.text["sd3fp8"])
    assert params["seed"] == 1 and params["steps"] == 3 and params["model"] == "sd3.5_large_fp8_scaled.safetensors"
    assert params["prompt"].startswith("a bottle") and params["negative_prompt"] == "" and params["width"] == 64


def test_new_seed_reuses_loaders_and_encoders(env):
    backend = env[0]
    run(env, simple_prompt(seed=1))
    outcome, sink = run(env, simple_prompt(seed=2), prompt_id="p2")
    assert sorted(sink.of("execution_cached")[0]["nodes"], key=int) == ["4", "16", "40", "53"]
    assert sorted((d["node"] for d in sink.of("executing")), key=int) == ["3", "8", "9"]
    assert backend.calls["load_checkpoint"] == 1 and backend.calls["encode_text"] == 2 and backend.calls["sample"] == 2
    assert outcome.outputs["9"]["images"][0]["filename"] == "ComfyUI_00002_.png"


def test_identical_rerun_is_all_cached_and_replays_the_output(env):
    first, _ = run(env, simple_prompt())
    outcome, sink = run(env, simple_prompt(), prompt_id="p2")
    assert sorted(sink.of("execution_cached")[0]["nodes"], key=int) == ["3", "4", "8", "9", "16", "40", "53"]
    assert sink.of("executing") == []
    assert sink.of("executed") == [{"node": "9", "display_node": "9", "output": first.outputs["9"], "prompt_id": "p2"}]
    assert outcome.outputs == first.outputs and env[0].calls["sample"] == 1


def test_changed_graph_drops_stale_cache_entries(env):
    run(env, simple_prompt())
    p = simple_prompt()
    p["4"]["inputs"]["ckpt_name"] = "sd3.5_medium.safetensors"
    _, sink = run(env, p, prompt_id="p2")
    assert sorted(sink.of("execution_cached")[0]["nodes"], key=int) == ["53"]
    assert env[0].calls["load_checkpoint"] == 2 and len(env[2].outputs) == 7


def test_interrupt_within_one_step(env):
    flag = InterruptFlag()
    sink = Sink(on_event=lambda e, d: flag.set() if e == "progress" else None)
    outcome, sink = run(env, simple_prompt(steps=50), sink=sink, interrupt=flag)
    assert len(sink.of("progress")) == 1  # the sampler stopped at the next step
    assert outcome.interrupted and not outcome.success and outcome.status["status_str"] == "error"
    (event,) = sink.of("execution_interrupted")
    assert event["node_id"] == "3" and event["node_type"] == "KSampler" and "53" in event["executed"]
    assert sink.names()[-1] == "execution_interrupted" and "execution_success" not in sink.names()


def test_interrupt_between_nodes(env):
    flag = InterruptFlag()
    sink = Sink(on_event=lambda e, d: flag.set() if e == "executing" and d["node"] == "8" else None)
    outcome, sink = run(env, simple_prompt(), sink=sink, interrupt=flag)
    assert sink.of("execution_interrupted")[0]["node_id"] == "8"
    assert env[0].calls["vae_decode"] == 0 and "9" not in outcome.outputs


def test_a_failing_node_is_reported_and_the_next_prompt_runs(env):
    env[0].fail_next_sample = "CUDA out of memory (pretend)"
    outcome, sink = run(env, simple_prompt())
    (error,) = sink.of("execution_error")
    assert error["node_id"] == "3" and error["node_type"] == "KSampler"
    assert error["exception_message"] == "CUDA out of memory (pretend)" and error["exception_type"] == "RuntimeError"
    assert error["traceback"] == []  # never sent to clients
    assert error["current_inputs"]["seed"] == [1] and error["current_inputs"]["latent_image"] == ["Latent"]
    assert set(error["current_outputs"]) >= {"4", "16", "40", "53"} and not outcome.success
    outcome, sink = run(env, simple_prompt(), prompt_id="p2")
    assert outcome.success and sorted(sink.of("execution_cached")[0]["nodes"], key=int) == ["4", "16", "40", "53"]


def test_preview_method_none_sends_no_previews(env):
    _, sink = run(env, simple_prompt(), extra_data={"preview_method": "none"})
    assert "preview" not in sink.names() and len(sink.of("progress")) == 3


def image_prompt(image_name="in.png"):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name, "upload": "image"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_medium.safetensors"}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 2]}},
        "4": {"class_type": "CLIPTextEncodeSD3", "inputs": {"clip": ["2", 1], "clip_l": "a", "clip_g": "b", "t5xxl": "c",
                                                             "empty_padding": "none"}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["5", 0], "start": 0.1, "end": 1.0}},
        "7": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["5", 0], "conditioning_2": ["6", 0]}},
        "8": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 6.0}},
        "9": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["8", 0], "add_noise": "disable", "noise_seed": 5, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["4", 0], "negative": ["7", 0], "latent_image": ["3", 0], "start_at_step": 1,
            "end_at_step": 3, "return_with_leftover_noise": "enable"}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["2", 2]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
        "12": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["10", 0]}},
    }


def test_image_to_image_chain_conditioning_ops_and_temp_previews(env):
    backend, registry, _ = env
    Image.new("RGBA", (32, 48), (255, 0, 0, 128)).save(registry.folders.input / "in.png")
    outcome, sink = run(env, image_prompt())
    assert outcome.success, sink.of("execution_error")
    request = backend.requests[-1]
    assert request.model.shift == 6.0 and request.add_noise is False and request.force_full_denoise is False
    assert (request.start_step, request.last_step, request.seed) == (1, 3, 5)
    assert request.latent.samples.shape == (1, 16, 6, 4)
    zeroed, ranged = request.negative
    assert not zeroed.context.any() and not zeroed.pooled.any() and (ranged.start_percent, ranged.end_percent) == (0.1, 1.0)
    (saved,) = outcome.outputs["11"]["images"]
    assert saved["type"] == "temp" and re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", saved["filename"])
    assert (registry.folders.temp / saved["filename"]).is_file()
    frames = [d for e, d in sink.events if e == "preview" and d["node"] == "12"]
    assert frames == [{"node": "12", "format": "PNG", "size": (32, 48)}]
    assert "12" not in outcome.outputs  # SaveImageWebsocket has no UI output


def test_load_image_reruns_when_the_file_changes_and_websocket_save_always_runs(env):
    registry = env[1]
    Image.new("RGB", (16, 16), "red").save(registry.folders.input / "in.png")
    run(env, image_prompt())
    _, sink = run(env, image_prompt(), prompt_id="p2")
    assert [d["node"] for d in sink.of("executing")] == ["12"]
    Image.new("RGB", (16, 16), "blue").save(registry.folders.input / "in.png")
    _, sink = run(env, image_prompt(), prompt_id="p3")
    assert "1" in [d["node"] for d in sink.of("executing")]


def test_load_image_mask_from_alpha(env):
    from sd3fp8.workflow.images import load_image

    path = env[1].folders.input / "a.png"
    Image.new("RGBA", (4, 2), (10, 20, 30, 0)).save(path)
    image, mask = load_image(path)
    assert image.shape == (1, 2, 4, 3) and mask.shape == (1, 2, 4) and torch.all(mask == 1.0)
    Image.new("RGB", (4, 2)).save(path)
    assert load_image(path)[1].shape == (1, 64, 64)


def test_save_target_counter_subfolders_and_escapes(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("ComfyUI_00001_.png", "ComfyUI_00007_.png", "ComfyUI_x.png", "Other_00009_.png"):
        (tmp_path / name).touch()
    assert save_target(tmp_path, "ComfyUI", 8, 8)[1:] == ("ComfyUI", 8, "")
    folder, stem, counter, subfolder = save_target(tmp_path, "sub/run_%width%x%height%", 64, 32)
    assert (folder, stem, counter, subfolder) == (tmp_path.resolve() / "sub", "run_64x32", 1, "sub")
    for bad in ("../escape", "/etc/cron", "sub/../../x"):
        with pytest.raises(NodeError, match="outside the output folder"):
            save_target(tmp_path, bad, 8, 8)


def test_the_prompt_passed_in_is_not_modified(env):
    prompt = simple_prompt()
    before = copy.deepcopy(prompt)
    run(env, prompt)
    assert prompt == before
