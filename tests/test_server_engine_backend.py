"""The engine backend without the HTTP layer: what the loaders list and load from a ComfyUI models
tree (SD3 files of the real key names and widths, tests/sd3_files.py), the model cache, UNETLoader's
weight_dtype, ComfyUI's text and KSampler rules, and the engine's limits as validation errors."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from sd3fp8.engine.pipeline import GenerationRequest, SD3FP8Pipeline
from sd3fp8.engine.text import comfy_tokens
from sd3fp8.runtime import RuntimeConfig
from sd3fp8.sampling import SAMPLER_NAMES, SCHEDULER_NAMES
from sd3fp8.server.engine_backend import EngineBackend
from sd3fp8.server.engine_models import LoadOptions, for_weight_dtype
from sd3fp8.server.engine_ops import ksampler_sigmas, sd3_tokens
from sd3fp8.workflow import Executor, Folders, InterruptFlag, build_registry, validate_prompt
from sd3fp8.workflow.backend import TextPrompts
from sd3fp8.workflow.types import NodeError
from tests.sd3_files import build_sd3_files, save
from tests.test_workflow_executor import Sink

FP32 = LoadOptions(runtime=RuntimeConfig(device="cpu", dtype="fp32"))
DATA = Path(__file__).parent / "data" / "comfyui"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sd3fp8._env import quiet_libraries

    quiet_libraries()
    return build_sd3_files(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def tree(files, tmp_path_factory):
    """A ComfyUI root: an all-in-one checkpoint, the MMDiT alone, the text encoders and VAE apart,
    ComfyUI's tokenizer folders, and files the loaders must not offer."""
    root = tmp_path_factory.mktemp("ComfyUI")
    models = root / "models"
    save(models / "checkpoints" / "sd3.5_all_in_one.safetensors", files.all_in_one())
    save(models / "checkpoints" / "not_a_model.safetensors", {"foo.weight": torch.zeros(2, 2)})
    save(models / "checkpoints" / "clip_l_in_the_wrong_place.safetensors", files.clip_l)
    save(models / "unet" / "sd3" / "mmdit.safetensors", files.mmdit)  # the legacy folder name, a subfolder
    save(models / "text_encoders" / "clip_l.safetensors", files.clip_l)
    save(models / "clip" / "clip_g.safetensors", files.clip_g)
    save(models / "text_encoders" / "t5xxl_fp16.safetensors", files.t5)
    save(models / "vae" / "sd3_vae.safetensors", files.vae)
    (models / "vae" / "notes.txt").write_text("not a model")
    shutil.copytree(files.tokenizers / "tokenizer", root / "comfy" / "sd1_tokenizer")
    shutil.copytree(files.tokenizers / "tokenizer_3", root / "comfy" / "text_encoders" / "t5_tokenizer")
    return root


def tree_backend(tree, **kwargs):
    from sd3fp8.server.engine_models import Catalog

    return EngineBackend(Catalog(tree / "models"), FP32, **kwargs)


def separate_loaders_prompt(seed=3, steps=2):
    """UNETLoader + TripleCLIPLoader + VAELoader, the way ComfyUI's SD3.5 example workflows load."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "sd3/mmdit.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                                            "clip_name3": "t5xxl_fp16.safetensors"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "sd3_vae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 2.0, "sampler_name": "euler",
                                                    "scheduler": "simple", "positive": ["4", 0], "negative": ["5", 0],
                                                    "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "tree"}},
    }


class Recording(EngineBackend):
    """Keeps every sampler result, to compare latents bit for bit."""

    def sample(self, request, callback, interrupt):
        out = super().sample(request, callback, interrupt)
        self.__dict__.setdefault("samples", []).append(out)
        return out


def execute(backend, prompt, tmp_path):
    folders = Folders.under(tmp_path)
    for p in (folders.input, folders.output, folders.temp):
        p.mkdir(parents=True, exist_ok=True)
    registry = build_registry(backend, folders)
    result = validate_prompt(registry, prompt)
    assert result.ok, (result.error, result.node_errors)
    sink = Sink()
    outcome = Executor(registry, backend).execute("p", result.prompt, result.outputs, {}, sink, InterruptFlag())
    return outcome, sink


def test_the_loaders_offer_only_sd3_files_and_log_the_rest(tree, caplog):
    backend = tree_backend(tree)
    with caplog.at_level(logging.WARNING):
        assert backend.model_files("checkpoints") == ["sd3.5_all_in_one.safetensors"]
    unusable = caplog.text
    assert "not_a_model.safetensors: unusable as checkpoints" in unusable
    assert "clip_l_in_the_wrong_place.safetensors: unusable as checkpoints: holds CLIP-L" in unusable
    assert backend.model_files("diffusion_models") == ["sd3/mmdit.safetensors"]
    assert backend.model_files("text_encoders") == ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"]
    assert backend.model_files("vae") == ["sd3_vae.safetensors"]
    assert backend.sampler_names() == SAMPLER_NAMES and backend.scheduler_names() == SCHEDULER_NAMES


def test_without_models_the_bundled_model_is_the_checkpoint():
    backend = EngineBackend()
    assert backend.model_files("checkpoints") == ["mini-sd3"]
    assert backend.model_files("text_encoders") == [] and backend.preferred_size("mini-sd3") == (64, 64)
    with pytest.raises(NodeError, match="not a usable file"):
        backend.load_checkpoint("../../etc/passwd")


def test_separate_loaders_generate_what_the_engine_does_from_the_same_weights(tree, files, tmp_path):
    backend = Recording(Catalog_for(tree), FP32)
    outcome, sink = execute(backend, separate_loaders_prompt(), tmp_path)
    assert outcome.success, sink.of("execution_error")
    assert (tmp_path / "output" / "tree_00001_.png").is_file()
    engine = SD3FP8Pipeline.from_pretrained(tree / "models" / "checkpoints" / "sd3.5_all_in_one.safetensors",
                                            runtime=FP32.runtime, tokenizers=tree)
    # EmptySD3LatentImage 64x64 is an 8x8 latent; these test files' VAE upscales 2x, not 8x: 16 pixels to the engine
    request = GenerationRequest("a red circle", None, steps=2, cfg=2.0, seed=3, width=16, height=16, scheduler="simple",
                                text_mode="comfy")
    expected = engine.generate(request, output="latent").images[0]
    # the same weights through the same loaders; memory-mapped files may round a last bit differently
    torch.testing.assert_close(backend.samples[0][0], expected, rtol=0, atol=1e-4)


def Catalog_for(tree):
    from sd3fp8.server.engine_models import Catalog

    return Catalog(tree / "models")


def test_checkpoint_from_the_tree_runs_the_reference_workflow(tree, tmp_path):
    backend = tree_backend(tree)
    prompt = json.loads((DATA / "sd3.5_simple_example.api.json").read_text())
    prompt["4"]["inputs"]["ckpt_name"] = "sd3.5_all_in_one.safetensors"
    prompt["3"]["inputs"].update(steps=2)
    prompt["53"]["inputs"].update(width=32, height=32)
    outcome, sink = execute(backend, prompt, tmp_path)
    assert outcome.success, sink.of("execution_error")
    assert backend.models.loads == {"checkpoint": 1} and backend.calls["encode_text"] == 2


def test_loaded_models_are_reused_by_files_and_precision(tree):
    backend = tree_backend(tree, keep=2)
    first = backend.load_diffusion_model("sd3/mmdit.safetensors", "default")
    assert backend.load_diffusion_model("sd3/mmdit.safetensors", "default") is first
    e5m2 = backend.load_diffusion_model("sd3/mmdit.safetensors", "fp8_e5m2")
    assert e5m2 is not first and backend.models.loads["diffusion_model"] == 2
    with e5m2.transformer() as module:
        dtypes = {m.weight.dtype for m in module.modules() if type(m).__name__ == "FP8Linear"}
    assert dtypes == {torch.float8_e5m2}
    assert backend.load_diffusion_model("sd3/mmdit.safetensors", "default") is first  # kept: keep=2
    clip = backend.load_text_encoders(["clip_l.safetensors", "clip_g.safetensors"], "sd3", "default")
    assert backend.load_text_encoders(["clip_l.safetensors", "clip_g.safetensors"], "sd3", "default") is clip
    backend.free(unload_models=True, free_memory=False)
    assert backend.load_diffusion_model("sd3/mmdit.safetensors", "default") is not first
    with pytest.raises(NodeError, match="second file for the same encoder"):
        backend.load_text_encoders(["clip_l.safetensors", "clip_l.safetensors"], "sd3", "default")


def test_keep_one_drops_the_previous_model(tree):
    backend = tree_backend(tree, keep=1)
    first = backend.load_diffusion_model("sd3/mmdit.safetensors", "default")
    backend.load_diffusion_model("sd3/mmdit.safetensors", "fp8_e4m3fn")
    assert backend.load_diffusion_model("sd3/mmdit.safetensors", "default") is not first
    assert backend.models.loads["diffusion_model"] == 3


def test_weight_dtype_maps_to_the_policy_and_backend():
    base = LoadOptions()
    assert for_weight_dtype(base, "default") is base
    assert (for_weight_dtype(base, "fp8_e5m2").policy.transformer.value, for_weight_dtype(base, "fp8_e5m2").runtime.backend.value) == (
        "fp8-e5m2", "weight-only")
    fast = for_weight_dtype(LoadOptions(base.policy.replace(transformer="bf16")), "fp8_e4m3fn_fast")
    assert (fast.policy.transformer.value, fast.runtime.backend.value) == ("fp8-e4m3", "auto")


def test_clip_text_encode_sd3_tokens_follow_comfyui(tree):
    backend = tree_backend(tree)
    clip = backend.load_text_encoders(["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"], "sd3", "default")
    with clip.open() as (tokenizers, encoders, layout):
        same = sd3_tokens(TextPrompts.single("a red circle"), tokenizers, encoders, layout)
        assert same == comfy_tokens("a red circle", tokenizers, encoders, layout)
        long = "red " * 100  # two CLIP windows
        split = sd3_tokens(TextPrompts(clip_l="a circle", clip_g=long, t5xxl="a circle", empty_padding=True),
                           tokenizers, encoders, layout)
        assert len(split["text_encoder"][1]) == len(split["text_encoder_2"][1]) == 2  # CLIP-L padded with the empty prompt
        assert split["text_encoder"][1][1] == comfy_tokens("", tokenizers, encoders, layout)["text_encoder"][1][0]
        none = sd3_tokens(TextPrompts(clip_l="", clip_g="", t5xxl="", empty_padding=False), tokenizers, encoders, layout)
        assert set(none) == {"text_encoder_3"} and none["text_encoder_3"][1] == [[(none["text_encoder_3"][0].end, 1.0)]]
    (entry,) = backend.encode_text(clip, TextPrompts(clip_l="", clip_g="", t5xxl="", empty_padding=False))
    assert entry.context.shape == (1, 1, 4096) and not entry.pooled.any()  # T5's end token alone, zero pooled


def test_ksampler_cuts_the_schedule_like_comfyui():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert torch.equal(ksampler_sigmas(sigmas, None, 2, False), torch.tensor([1.0, 0.75, 0.5]))
    assert torch.equal(ksampler_sigmas(sigmas, None, 2, True), torch.tensor([1.0, 0.75, 0.0]))
    assert torch.equal(ksampler_sigmas(sigmas, 2, 10000, True), torch.tensor([0.5, 0.25, 0.0]))
    assert ksampler_sigmas(sigmas, 4, None, False) is None and sigmas[-1] == 0  # nothing left; the input untouched


def test_two_advanced_stages_equal_one_run(tree, tmp_path):
    """KSamplerAdvanced 0..2 with leftover noise, then 2..end without adding noise = KSampler (euler)."""
    backend = Recording(Catalog_for(tree), FP32)
    one = separate_loaders_prompt(steps=4)
    execute(backend, one, tmp_path / "one")
    two = separate_loaders_prompt(steps=4)
    common = {k: two["7"]["inputs"][k] for k in ("model", "cfg", "sampler_name", "scheduler", "positive", "negative")}
    two["7"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "add_noise": "enable", "noise_seed": 3, "steps": 4,
                                                              "latent_image": ["6", 0], "start_at_step": 0, "end_at_step": 2,
                                                              "return_with_leftover_noise": "enable"}}
    two["10"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "add_noise": "disable", "noise_seed": 0, "steps": 4,
                                                               "latent_image": ["7", 0], "start_at_step": 2, "end_at_step": 10000,
                                                               "return_with_leftover_noise": "disable"}}
    two["8"]["inputs"]["samples"] = ["10", 0]
    outcome, sink = execute(backend, two, tmp_path / "two")
    assert outcome.success, sink.of("execution_error")
    torch.testing.assert_close(backend.samples[-1], backend.samples[0], rtol=0, atol=1e-4)
    assert [d["max"] for d in sink.of("progress")] == [2, 2, 2, 2]  # each stage reports its own steps


def test_engine_limits_are_validation_errors(tree, tmp_path):
    registry = build_registry(tree_backend(tree), Folders.under(tmp_path))
    prompt = separate_loaders_prompt()
    prompt["6"]["inputs"].update(width=5120, height=1000, batch_size=65)
    prompt["7"]["inputs"]["steps"] = 1001
    result = validate_prompt(registry, prompt)
    assert not result.ok and result.error["type"] == "prompt_outputs_failed_validation"
    errors = {(node, e["extra_info"]["input_name"]): e for node, entry in result.node_errors.items() for e in entry["errors"]}
    assert errors["6", "width"]["type"] == "value_bigger_than_max" and "max of 4096" in errors["6", "width"]["message"]
    assert errors["6", "height"]["type"] == "custom_validation_failed" and "multiple of 16" in errors["6", "height"]["details"]
    assert errors["6", "batch_size"]["type"] == "value_bigger_than_max"
    assert errors["7", "steps"]["message"] == "Value 1001 bigger than max of 1000 (this server's limit)"


def test_a_latent_beyond_the_models_position_table_is_a_node_error(tree, tmp_path):
    prompt = separate_loaders_prompt()
    prompt["6"]["inputs"].update(width=256, height=256)  # 32 latent cells: 16 patches, the table holds 8
    outcome, sink = execute(tree_backend(tree), prompt, tmp_path)
    (error,) = sink.of("execution_error")
    assert error["node_type"] == "KSampler" and "at most 128x128 pixels" in error["exception_message"]
