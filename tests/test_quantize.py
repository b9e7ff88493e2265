"""Streaming FP8 conversion: round trips through both formats, atomic writes, bad input."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file

from sd3fp8 import Policy
from sd3fp8.errors import ConfigError, ModelLoadError, SD3FP8Error
from sd3fp8.io.checkpoint import read_header
from sd3fp8.io.quantize import QuantizeOptions, quantize_file
from sd3fp8.io.singlefile import load_mmdit
from tests.test_layouts import original_from_diffusers, tiny_config
from tests.test_singlefile import assert_same_state, out

P = "model.diffusion_model."


@pytest.fixture(scope="module")
def bf16_file(tmp_path_factory):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**tiny_config()).eval()
    original = {k: v.to(torch.bfloat16) for k, v in original_from_diffusers(model).items()}
    original["text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight"] = torch.randn(32, 16, dtype=torch.bfloat16)
    original["text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight"] = torch.randn(16, 32, dtype=torch.bfloat16)
    original["text_encoders.t5xxl.transformer.shared.weight"] = torch.randn(10, 16, dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("src") / "sd35_bf16.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    return path, model


def test_sd3fp8_format_loads_identical_to_in_memory_quantization(bf16_file, tmp_path):
    src, model = bf16_file
    dst = quantize_file(src, tmp_path / "fp8.safetensors")
    header = read_header(dst)
    meta = header.metadata
    assert meta["sd3fp8_format_version"] == "2" and meta["granularity"] == "channel" and meta["fp8"] == "e4m3"
    assert len(meta["source_sha256"]) == 64 and json.loads(meta["policy"])["transformer"] == "fp8-e4m3"
    assert header.tensors[P + "joint_blocks.0.x_block.attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert header.tensors[P + "context_embedder.weight"].dtype == torch.bfloat16  # excluded by the policy
    from_file, names_a, _ = load_mmdit(dst, Policy(), torch.float32)
    in_memory, names_b, _ = load_mmdit(src, Policy(), torch.float32)
    assert names_a == names_b
    assert_same_state(from_file, in_memory)
    assert dst.stat().st_size < 0.62 * src.stat().st_size
    assert not list(tmp_path.glob(".*partial"))


def test_comfy_format_is_close_to_bf16(bf16_file, tmp_path):
    src, model = bf16_file
    dst = quantize_file(src, tmp_path / "comfy.safetensors", QuantizeOptions(format="comfy", granularity="tensor"))
    with safe_open(str(dst), "pt") as f:
        keys = set(f.keys())
        assert P + "scaled_fp8" in keys and f.get_tensor(P + "scaled_fp8").numel() == 0
        assert f.get_tensor(P + "joint_blocks.0.x_block.attn.qkv.scale_weight").shape == ()
    loaded, _, detection = load_mmdit(dst, Policy(), torch.float32)
    assert detection.fp8 == "comfy-scaled"
    bf16, _, _ = load_mmdit(src, Policy(transformer="fp32"), torch.float32)
    ref = out(bf16, model.config)
    assert ((out(loaded, model.config) - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-2


def test_t5_fp8_keeps_wo(bf16_file, tmp_path):
    src, _ = bf16_file
    dst = quantize_file(src, tmp_path / "t5.safetensors", QuantizeOptions(t5="fp8"))
    tensors = read_header(dst).tensors
    t5 = "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense."
    assert tensors[t5 + "wi_0.weight"].dtype == torch.float8_e4m3fn and t5 + "wi_0.weight_scale" in tensors
    assert tensors[t5 + "wo.weight"].dtype == torch.bfloat16
    assert tensors["text_encoders.t5xxl.transformer.shared.weight"].dtype == torch.bfloat16


def test_refuses_to_overwrite(bf16_file, tmp_path):
    src, _ = bf16_file
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="--force"):
        quantize_file(src, dst)
    assert dst.read_bytes() == b"keep me"
    quantize_file(src, dst, QuantizeOptions(force=True))
    assert read_header(dst).metadata["sd3fp8_layout"] == "sd3fp8"
    with pytest.raises(ConfigError, match="overwrite the source"):
        quantize_file(src, src, QuantizeOptions(force=True))


def test_failure_leaves_nothing_behind(tmp_path):
    torch.manual_seed(0)
    original = original_from_diffusers(SD3Transformer2DModel(**tiny_config()))
    original[P + "joint_blocks.2.x_block.mlp.fc2.weight"][3, 3] = float("inf")
    src = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(src))
    dst = tmp_path / "out" / "fp8.safetensors"
    with pytest.raises(SD3FP8Error, match="joint_blocks.2.x_block.mlp.fc2.weight"):
        quantize_file(src, dst)
    assert not dst.exists() and not list((tmp_path / "out").glob("*"))


def test_already_fp8_and_bad_options(bf16_file, tmp_path):
    src, _ = bf16_file
    fp8 = quantize_file(src, tmp_path / "a.safetensors")
    with pytest.raises(ModelLoadError, match="already FP8"):
        quantize_file(fp8, tmp_path / "b.safetensors")
    with pytest.raises(ConfigError, match="one scale per tensor"):
        QuantizeOptions(format="comfy")
    with pytest.raises(ConfigError, match="unknown output format"):
        QuantizeOptions(format="gguf")


def test_quantize_cli(bf16_file, tmp_path, capsys):
    from sd3fp8 import cli

    src, _ = bf16_file
    dst = tmp_path / "c.safetensors"
    assert cli.main(["quantize", str(src), "--out", str(dst), "--format", "comfy", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out and dst.exists()
    assert cli.main(["quantize", str(src), "--out", str(dst), "-q"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["quantize", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    import os

    from sd3fp8.io.atomic import atomic_write

    mask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "out.bin") as f:
            f.write(b"x")
        with pytest.raises(RuntimeError), atomic_write(tmp_path / "broken.bin") as f:
            f.write(b"partial")
            raise RuntimeError("interrupted")
    finally:
        os.umask(mask)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # the broken write left nothing
