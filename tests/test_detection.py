"""detect() on files with the real key names: original single files, ComfyUI flavours, encoders, foreign models."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file

from sd3fp8.errors import ModelLoadError
from sd3fp8.io.checkpoint import read_header
from sd3fp8.io.detection import detect
from tests.test_layouts import original_from_diffusers, tiny_config


def save(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def original_mmdit():
    torch.manual_seed(0)
    return original_from_diffusers(SD3Transformer2DModel(**tiny_config()))


def test_original_single_file_with_and_without_prefix(tmp_path, original_mmdit):
    d = detect(read_header(save(tmp_path, "a.safetensors", original_mmdit)))
    assert d.kind == "mmdit-original" and d.fp8 == "none" and d.components == ("transformer",)
    assert d.mmdit_config["num_layers"] == 3 and d.mmdit_config["dual_attention_layers"] == (0,)
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in original_mmdit.items()}
    assert detect(read_header(save(tmp_path, "b.safetensors", bare))).mmdit_config == d.mmdit_config


def test_all_in_one_file_lists_its_components(tmp_path, original_mmdit):
    extra = {"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 16, 3, 3),
             "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(8),
             "text_encoders.t5xxl.transformer.shared.weight": torch.zeros(10, 8)}
    d = detect(read_header(save(tmp_path, "aio.safetensors", {**original_mmdit, **extra})))
    assert d.components == ("transformer", "vae", "text_encoder", "text_encoder_3")


def test_fp8_flavours(tmp_path, original_mmdit):
    plain = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v) for k, v in original_mmdit.items()}
    assert detect(read_header(save(tmp_path, "plain.safetensors", plain))).fp8 == "plain-cast"
    scaled = {**plain, "model.diffusion_model.scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
              "model.diffusion_model.context_embedder.scale_weight": torch.tensor(1.0)}
    assert detect(read_header(save(tmp_path, "scaled.safetensors", scaled))).fp8 == "comfy-scaled"
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {"context_embedder": {"format": "float8_e4m3fn"}}})}
    with_scale = {**plain, "model.diffusion_model.context_embedder.weight_scale": torch.tensor(1.0)}
    assert detect(read_header(save(tmp_path, "cq.safetensors", with_scale, meta))).fp8 == "comfy-quant"
    meta_bad = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {"context_embedder": {"format": "nvfp4"}}})}
    with pytest.raises(ModelLoadError, match="nvfp4"):
        detect(read_header(save(tmp_path, "nvfp4.safetensors", plain, meta_bad)))


@pytest.mark.parametrize("keys,kind", [
    ({"text_model.embeddings.token_embedding.weight": (10, 768), "text_model.encoder.layers.11.mlp.fc1.weight": (4, 4)}, "clip-l"),
    ({"text_model.embeddings.token_embedding.weight": (10, 1280), "text_model.encoder.layers.31.mlp.fc1.weight": (4, 4)}, "clip-g"),
    ({"shared.weight": (10, 4096), "encoder.block.23.layer.1.DenseReluDense.wi_1.weight": (4, 4)}, "t5-xxl"),
])
def test_standalone_text_encoders(tmp_path, keys, kind):
    tensors = {k: torch.zeros(shape, dtype=torch.float8_e4m3fn if kind == "t5-xxl" else torch.float16) for k, shape in keys.items()}
    d = detect(read_header(save(tmp_path, "te.safetensors", tensors)))
    assert d.kind == kind
    assert d.fp8 == ("plain-cast" if kind == "t5-xxl" else "none")


@pytest.mark.parametrize("key,name", [
    ("model.diffusion_model.input_blocks.0.0.weight", "SDXL / SD1.x UNet"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux transformer"),
])
def test_other_architectures_are_named_and_refused(tmp_path, key, name):
    with pytest.raises(ModelLoadError, match=f"this is a {name}"):
        detect(read_header(save(tmp_path, "x.safetensors", {key: torch.zeros(2, 2)})))


def test_unknown_and_incomplete_files(tmp_path, original_mmdit):
    with pytest.raises(ModelLoadError, match="not an SD3 checkpoint"):
        detect(read_header(save(tmp_path, "u.safetensors", {"foo.bar": torch.zeros(2)})))
    missing = {k: v for k, v in original_mmdit.items() if "y_embedder" not in k}
    with pytest.raises(ModelLoadError, match="missing tensor 'y_embedder.mlp.0.weight'"):
        detect(read_header(save(tmp_path, "m.safetensors", missing)))


def test_inspect_command_reports_a_file(tmp_path, original_mmdit, capsys):
    from sd3fp8 import cli

    path = save(tmp_path, "sd35.safetensors", original_mmdit)
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mmdit-original" in out and "depth 3" in out and "dual-attention layers [0]" in out
    assert cli.main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mmdit_config"]["num_layers"] == 3
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04junk")
    assert cli.main(["inspect", str(bad)]) == 2
    assert "never unpickled" in capsys.readouterr().err
