"""Original-layout files at the real widths of SD3.5 Medium (1536, MMDiT-X) and Large (2432), depth
truncated and pos-embed shrunk, random BF16 weights: detection, loading, quantizing to both formats."""

import pytest
import torch

from sd3fp8 import Policy
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.fp8.numerics import dequantize
from sd3fp8.fp8.swap import quantize_linears
from sd3fp8.io.checkpoint import read_header
from sd3fp8.io.detection import detect
from sd3fp8.io.layouts import diffusers_state_to_original
from sd3fp8.io.quantize import QuantizeOptions, quantize_file
from sd3fp8.io.singlefile import load_mmdit
from tests.sd3_files import save

WIDTHS = {  # name -> (heads, layers, dual-attention layers)
    "medium": (24, 2, (0,)),
    "large": (38, 1, ()),
}


def real_width_config(heads, layers, dual):
    return dict(sample_size=8, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64, num_attention_heads=heads,
                joint_attention_dim=4096, caption_projection_dim=64 * heads, pooled_projection_dim=2048, out_channels=16,
                pos_embed_max_size=8, dual_attention_layers=dual, qk_norm="rms_norm")


def original_bf16_file(path, config, seed=0):
    """Random BF16 tensors with the original key names and shapes (from a model built on meta)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    shapes = {k: v.shape for k, v in diffusers_state_to_original(model.state_dict(), config["num_layers"]).items()}
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    return save(path, tensors)


@pytest.fixture(scope="module", params=list(WIDTHS))
def bf16_file(request, tmp_path_factory):
    config = real_width_config(*WIDTHS[request.param])
    return original_bf16_file(tmp_path_factory.mktemp(request.param) / f"sd3.5_{request.param}.safetensors", config), config


def test_detected_with_real_widths(bf16_file):
    path, config = bf16_file
    detection = detect(read_header(path))
    width = config["num_attention_heads"] * 64
    got = detection.mmdit_config
    assert (got["num_attention_heads"] * got["attention_head_dim"], got["num_layers"]) == (width, config["num_layers"])
    assert got["dual_attention_layers"] == config["dual_attention_layers"] and got["qk_norm"] == "rms_norm"
    assert detection.kind == "mmdit-original" and detection.fp8 == "none" and detection.components == ("transformer",)


def test_sd3fp8_file_loads_identical_to_in_memory_quantization(bf16_file, tmp_path):
    path, config = bf16_file
    quantized = quantize_file(path, tmp_path / "q.safetensors", QuantizeOptions(format="sd3fp8", granularity="channel"))
    loaded, names, detection = load_mmdit(quantized, Policy(), torch.float32)
    assert detection.fp8 == "sd3fp8"
    reference, _, _ = load_mmdit(path, Policy(transformer="bf16"), torch.bfloat16)
    expected = quantize_linears(reference.float(), Policy().layer_filter("transformer"), backend="weight-only")
    assert names == expected
    got, want = loaded.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        if got[key].dtype == torch.float8_e4m3fn:
            assert torch.equal(got[key].view(torch.uint8), want[key].view(torch.uint8)), key
        else:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_comfy_file_loads_close_to_bf16(bf16_file, tmp_path):
    path, config = bf16_file
    quantized = quantize_file(path, tmp_path / "c.safetensors", QuantizeOptions(format="comfy", granularity="tensor"))
    assert detect(read_header(quantized)).fp8 == "comfy-scaled"
    loaded, names, _ = load_mmdit(quantized, Policy(), torch.float32)
    reference, _, _ = load_mmdit(path, Policy(transformer="fp32"), torch.float32)
    modules = dict(reference.named_modules())
    for name in names:
        layer = dict(loaded.named_modules())[name]
        assert isinstance(layer, FP8Linear) and layer.weight_scale.dim() == 0  # a fused qkv keeps its one scale
        w = dequantize(layer.weight, layer.weight_scale, torch.float32)
        ref = modules[name].weight
        # E4M3 has 3 mantissa bits: relative error <= 2^-4 per element, ~3 % RMS
        assert ((w - ref).norm() / ref.norm()).item() < 0.04, name
