"""Whole pipelines from the files users have: all-in-one checkpoints, ComfyUI trees, separate
text encoders (16-bit, plain FP8 cast, ComfyUI scaled FP8), tokenizers found or clearly missing."""

import shutil

import numpy as np
import pytest
import torch

from sd3fp8 import Policy
from sd3fp8.cli import main
from sd3fp8.engine.pipeline import SD3FP8Pipeline
from sd3fp8.engine.request import GenerationRequest
from sd3fp8.errors import ConfigError, ModelLoadError
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.fp8.numerics import FP8Format, Granularity, quantize_weight
from sd3fp8.io.quantize import T5_LINEAR_SUFFIXES
from sd3fp8.io.sources import resolve_sources
from sd3fp8.runtime import RuntimeConfig
from tests.sd3_files import build_sd3_files, reference_folder, save

FP32 = RuntimeConfig(device="cpu", dtype="fp32")
CALL = dict(steps=2, cfg=2.0, seed=3, width=32, height=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sd3fp8._env import quiet_libraries

    quiet_libraries()
    return build_sd3_files(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """Images of the diffusers-folder pipeline holding the same weights."""
    folder = reference_folder(files, tmp_path_factory.mktemp("ref") / "sd3")
    engine = SD3FP8Pipeline.from_pretrained(folder, runtime=FP32)
    return folder, np.asarray(engine("a red circle", **CALL).images[0], dtype=np.int16)


def pixels(engine):
    return np.asarray(engine("a red circle", **CALL).images[0], dtype=np.int16)


def assert_same_image(a, b):
    # memory-mapped tensors can round a last bit differently in BLAS: allow one grey level
    assert np.abs(a - b).max() <= 1


def comfy_scaled_t5(t5: dict) -> dict:
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in t5.items():
        if k.endswith(T5_LINEAR_SUFFIXES) and not k.endswith(".wo.weight"):
            w8, scale = quantize_weight(v, FP8Format.E4M3, Granularity.TENSOR)
            out[k], out[k.removesuffix("weight") + "scale_weight"] = w8, scale
        else:
            out[k] = v
    return out


def comfy_tree(root, files, checkpoints=("sd3.5_medium.safetensors",), t5=("t5xxl_fp16",), tokenizers=True):
    models = root / "models"
    for name in checkpoints:
        save(models / "checkpoints" / name, files.all_in_one(with_text_encoders=False))
    save(models / "text_encoders" / "clip_l.safetensors", files.clip_l)
    save(models / "clip" / "clip_g.safetensors", files.clip_g)  # the legacy folder name
    variants = {"t5xxl_fp16": files.t5, "t5xxl_fp8_e4m3fn_scaled": comfy_scaled_t5(files.t5),
                "t5xxl_fp8_e4m3fn": {k: v.to(torch.float8_e4m3fn) for k, v in files.t5.items()}}
    for name in t5:
        save(models / "text_encoders" / f"{name}.safetensors", variants[name])
    if tokenizers:
        shutil.copytree(files.tokenizers / "tokenizer", root / "comfy" / "sd1_tokenizer")
        shutil.copytree(files.tokenizers / "tokenizer_3", root / "comfy" / "text_encoders" / "t5_tokenizer")
    return root


def test_all_in_one_file_generates_what_the_folder_does(files, reference, tmp_path):
    path = save(tmp_path / "sd3.5_all_in_one.safetensors", files.all_in_one())
    engine = SD3FP8Pipeline.from_pretrained(path, runtime=FP32, tokenizers=files.tokenizers)
    assert {c: s.prefix for c, s in engine.sources.files.items()} == {
        "transformer": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "text_encoders.clip_l.transformer.",
        "text_encoder_2": "text_encoders.clip_g.transformer.", "text_encoder_3": "text_encoders.t5xxl.transformer."}
    assert_same_image(pixels(engine), reference[1])
    assert engine.transformer_backend() == "weight-only"


def test_comfyui_tree_finds_every_component(files, reference, tmp_path):
    root = comfy_tree(tmp_path / "ComfyUI", files, t5=("t5xxl_fp16", "t5xxl_fp8_e4m3fn_scaled"))
    engine = SD3FP8Pipeline.from_pretrained(root, runtime=FP32)
    names = {c: s.path.name for c, s in engine.sources.files.items()}
    assert names == {"transformer": "sd3.5_medium.safetensors", "vae": "sd3.5_medium.safetensors", "text_encoder": "clip_l.safetensors",
                     "text_encoder_2": "clip_g.safetensors", "text_encoder_3": "t5xxl_fp16.safetensors"}
    assert engine.fp8_layers["text_encoder_3"] == []
    assert_same_image(pixels(engine), reference[1])


def test_fp8_t5_files_stay_fp8_with_their_bytes(files, tmp_path):
    root = comfy_tree(tmp_path / "ComfyUI", files, t5=("t5xxl_fp16", "t5xxl_fp8_e4m3fn_scaled"))
    engine = SD3FP8Pipeline.from_pretrained(root / "models", Policy(text_encoder_3="fp8"), FP32)
    assert engine.sources.files["text_encoder_3"].path.name == "t5xxl_fp8_e4m3fn_scaled.safetensors"
    q = engine.component("text_encoder_3").encoder.block[0].layer[0].SelfAttention.q
    expected, scale = quantize_weight(files.t5["encoder.block.0.layer.0.SelfAttention.q.weight"], FP8Format.E4M3, Granularity.TENSOR)
    assert isinstance(q, FP8Linear) and torch.equal(q.weight.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(q.weight_scale, scale)
    wo = engine.component("text_encoder_3").encoder.block[0].layer[1].DenseReluDense.wo
    assert not isinstance(wo, FP8Linear) and wo.weight.dtype == torch.float32


def test_plain_fp8_t5_cast_is_kept_fp8_with_unit_scale(files, tmp_path):
    root = comfy_tree(tmp_path / "ComfyUI", files, t5=("t5xxl_fp8_e4m3fn",))
    engine = SD3FP8Pipeline.from_pretrained(root, runtime=FP32)  # t5 "auto": an FP8 file stays FP8
    assert engine.policy.text_encoder_3.is_fp8 and len(engine.fp8_layers["text_encoder_3"]) == 6
    k = engine.component("text_encoder_3").encoder.block[0].layer[0].SelfAttention.k
    assert float(k.weight_scale) == 1.0
    src = files.t5["encoder.block.0.layer.0.SelfAttention.k.weight"].to(torch.float8_e4m3fn)
    assert torch.equal(k.weight.view(torch.uint8), src.view(torch.uint8))
    request = GenerationRequest("a red circle", seed=3, steps=2, cfg=2.0, width=32, height=32)
    latents = engine.generate(request, output="latent").images[0]
    assert torch.isfinite(latents).all() and latents.std() > 0.1  # the unit-scale FP8 T5 conditions a real image
    assert pixels(engine).std() > 1


def test_several_checkpoints_need_a_pick(files, reference, tmp_path):
    root = comfy_tree(tmp_path / "ComfyUI", files, checkpoints=("a.safetensors", "b.safetensors"))
    (root / "models" / "checkpoints" / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"2 SD3 checkpoints .* --checkpoint NAME \(a.safetensors, b.safetensors\)"):
        resolve_sources(root, Policy())
    assert resolve_sources(root, Policy(), checkpoint="b").files["transformer"].path.name == "b.safetensors"
    with pytest.raises(ModelLoadError, match="no SD3 checkpoint of that name"):
        resolve_sources(root, Policy(), checkpoint="c")


def test_missing_pieces_are_named(files, tmp_path):
    bare = save(tmp_path / "mmdit_only.safetensors", {"model.diffusion_model." + k: v for k, v in files.mmdit.items()})
    with pytest.raises(ModelLoadError, match=r"no VAE, CLIP-L, CLIP-G, T5-XXL found .* --text-encoders / --vae \(or run without T5: --t5 off\)"):
        resolve_sources(bare, Policy(), tokenizers=files.tokenizers)
    with_vae = save(tmp_path / "mmdit_vae.safetensors", files.all_in_one(with_text_encoders=False))
    encoders = tmp_path / "enc"
    save(encoders / "clip_l.safetensors", files.clip_l), save(encoders / "clip_g.safetensors", files.clip_g)
    with pytest.raises(ModelLoadError, match=r"no T5-XXL found.*--t5 off"):
        resolve_sources(with_vae, Policy(), extra=(encoders,), tokenizers=files.tokenizers)
    with pytest.raises(ModelLoadError, match=r"no tokenizer files for tokenizer, tokenizer_2.*--tokenizers DIR"):
        resolve_sources(with_vae, Policy(text_encoder_3="off"), extra=(encoders,))
    sources = resolve_sources(with_vae, Policy(text_encoder_3="off"), extra=(encoders,), tokenizers=files.tokenizers)
    assert "text_encoder_3" not in sources.files and "tokenizer_3" not in sources.tokenizers
    with pytest.raises(ModelLoadError, match="not a text encoder or VAE"):
        resolve_sources(with_vae, Policy(), extra=(with_vae,), tokenizers=files.tokenizers)


def test_file_options_do_not_apply_to_a_diffusers_folder(reference):
    with pytest.raises(ConfigError, match="is a diffusers folder"):
        resolve_sources(reference[0], Policy(), checkpoint="x")


def test_staged_offload_frees_components_and_matches(files, reference, tmp_path):
    root = comfy_tree(tmp_path / "ComfyUI", files)
    staged = SD3FP8Pipeline.from_pretrained(root, runtime=RuntimeConfig(device="cpu", dtype="fp32", offload="stages"))
    assert staged.component("transformer") is None and staged.component("text_encoder_3") is None and staged.component("vae") is not None
    assert_same_image(pixels(staged), reference[1])
    assert staged.component("transformer") is None and staged.component("text_encoder") is None


def test_cli_generates_and_inspects_from_a_comfyui_tree(files, tmp_path, capsys):
    root = comfy_tree(tmp_path / "ComfyUI", files)
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(root), "--steps", "1", "--width", "32", "--height", "32",
                 "--dtype", "fp32", "--out", str(out), "-q"]) == 0
    assert out.is_file()
    assert main(["inspect", str(root), "--dtype", "fp32"]) == 0
    report = capsys.readouterr().out
    assert "clip_l.safetensors" in report and "sd3.5_medium.safetensors" in report


def test_broken_files_in_a_tree_are_named(files, tmp_path):
    root = comfy_tree(tmp_path / "ComfyUI", files)
    t5 = root / "models" / "text_encoders" / "t5xxl_fp16.safetensors"
    t5.write_bytes(t5.read_bytes()[: t5.stat().st_size // 2])  # an interrupted download
    with pytest.raises(ModelLoadError, match=r"no T5-XXL found .*skipped t5xxl_fp16.safetensors: truncated"):
        resolve_sources(root, Policy())


def test_text_encoder_with_wrong_shapes_is_one_clear_error(files, tmp_path):
    bad = dict(files.clip_l)
    bad["text_model.embeddings.position_embedding.weight"] = bad["text_model.embeddings.position_embedding.weight"][:, :700]
    root = comfy_tree(tmp_path / "ComfyUI", files)
    save(root / "models" / "text_encoders" / "clip_l.safetensors", bad)
    with pytest.raises(ModelLoadError, match=r"clip_l.safetensors: tensors do not fit"):
        SD3FP8Pipeline.from_pretrained(root, runtime=FP32)
