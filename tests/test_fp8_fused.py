"""Fused q/k/v: one FP8Linear (concatenated weights, per-channel scales) per attention stream."""

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from torch import nn

from sd3fp8.fp8.fused import FusedFP8JointAttnProcessor, fuse_linears, fuse_qkv
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.fp8.numerics import sqnr
from sd3fp8.fp8.swap import fp8_layers, quantize_linears


def tiny_mmdit(seed=0):
    torch.manual_seed(seed)
    # qk-norm and an MMDiT-X block (a second, context-free attention): what SD3.5 has
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                 joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
                                 pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,)).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([300.0, 700.0]))


def quantized(activation="tensor", backend="scaled-mm", granularity="channel"):
    model = tiny_mmdit()
    quantize_linears(model, lambda n: "transformer_blocks" in n, granularity=granularity, backend=backend, force_fp8=backend == "scaled-mm",
                     activation=activation)
    return model


@pytest.mark.parametrize("activation", ["tensor", "row"])
@pytest.mark.parametrize("backend", ["scaled-mm", "emulated", "weight-only"])
def test_fused_model_computes_what_the_unfused_one_does(activation, backend):
    model = quantized(activation, backend)
    fused = copy.deepcopy(model)
    names = fuse_qkv(fused, backends=tuple({m.backend for m in fp8_layers(model).values()}))
    # two blocks: attn (image + context streams) and block 0's attn2 (image only)
    assert sorted(names) == ["transformer_blocks.0.attn.to_added_qkv", "transformer_blocks.0.attn.to_qkv",
                             "transformer_blocks.0.attn2.to_qkv", "transformer_blocks.1.attn.to_added_qkv",
                             "transformer_blocks.1.attn.to_qkv"]
    attn = fused.transformer_blocks[0].attn
    assert not hasattr(attn, "to_q") and isinstance(attn.processor, FusedFP8JointAttnProcessor)
    with torch.inference_mode():
        a, b = model(**inputs()).sample, fused(**inputs()).sample
    # the same quantized operands (one amax over the shared input, the same per-channel scales):
    # only the GEMM's summation order may differ
    assert sqnr(a, b) > 100


def test_default_backends_leave_weight_only_alone():
    model = quantized(backend="weight-only")
    assert fuse_qkv(model) == []
    assert isinstance(model.transformer_blocks[0].attn.processor, JointAttnProcessor2_0)


def test_processor_equals_diffusers_joint_processor_unfused():
    """With separate projections the processor is diffusers' JointAttnProcessor2_0, bit for bit."""
    model = tiny_mmdit()
    with torch.inference_mode():
        reference = model(**inputs()).sample
        for m in model.modules():
            if isinstance(m, Attention):
                m.set_processor(FusedFP8JointAttnProcessor())
        assert torch.equal(model(**inputs()).sample, reference)


def test_fuse_linears_per_tensor_scales_become_per_channel():
    torch.manual_seed(0)
    layers = [FP8Linear.from_linear(nn.Linear(64, 32) if i != 1 else nn.Linear(64, 32, bias=False), granularity="tensor",
                                    backend="scaled-mm", force_fp8=True) for i in range(3)]
    with torch.no_grad():
        layers[2].weight_scale.mul_(3)  # different scales: the fused layer needs one per channel
    fused = fuse_linears(layers)
    assert fused.weight_scale.shape == (96,) and fused.parts == [32, 32, 32]
    assert torch.equal(fused.bias[32:64], torch.zeros(32))
    x = torch.randn(4, 64)
    torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in layers], -1), rtol=1e-5, atol=1e-5)


def test_fuse_linears_refuses_mixed_layers():
    torch.manual_seed(0)
    a = FP8Linear.from_linear(nn.Linear(64, 32), fmt="e4m3", backend="scaled-mm", force_fp8=True)
    b = FP8Linear.from_linear(nn.Linear(64, 32), fmt="e5m2", backend="scaled-mm", force_fp8=True)
    assert fuse_linears([a, b]) is None
    c = FP8Linear.from_linear(nn.Linear(64, 32), backend="scaled-mm", force_fp8=True, input_scale=0.1)
    assert fuse_linears([a, c]) is None


def test_static_scales_survive_fusion():
    torch.manual_seed(0)
    layers = [FP8Linear.from_linear(nn.Linear(64, 32), backend="scaled-mm", force_fp8=True, input_scale=0.02) for _ in range(3)]
    fused = fuse_linears(layers)
    assert float(fused.input_scale) == pytest.approx(0.02)
    x = torch.randn(4, 64)
    torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in layers], -1), rtol=1e-5, atol=1e-5)
