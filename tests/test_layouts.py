"""The original <-> diffusers MMDiT mapping, checked against diffusers' own single-file converter."""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from sd3fp8.errors import ModelLoadError
from sd3fp8.io.layouts import (
    Transform,
    convert_original_state_dict,
    diffusers_state_to_original,
    mmdit_config,
    original_key_to_diffusers,
    strip_prefix,
    variant_name,
)


def tiny_config(dual=(0,), qk_norm="rms_norm", layers=3):
    return dict(sample_size=8, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64, num_attention_heads=2,
                joint_attention_dim=96, caption_projection_dim=128, pooled_projection_dim=80, out_channels=16,
                pos_embed_max_size=12, dual_attention_layers=dual, qk_norm=qk_norm)


def original_from_diffusers(model):
    """An original-layout state dict of a diffusers model (through our inverse mapping)."""
    return diffusers_state_to_original(model.state_dict(), model.config.num_layers)


@pytest.mark.parametrize("dual,qk_norm", [((0,), "rms_norm"), ((), None)])
def test_mapping_agrees_with_diffusers_converter(dual, qk_norm):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**tiny_config(dual, qk_norm))
    original = original_from_diffusers(model)
    ours = convert_original_state_dict(original, model.config.num_layers)
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert set(ours) == set(theirs) == set(model.state_dict())
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
        assert torch.equal(ours[key], model.state_dict()[key]), key


def test_config_read_from_keys_rebuilds_the_model():
    model = SD3Transformer2DModel(**tiny_config())
    shapes = strip_prefix({k: tuple(v.shape) for k, v in original_from_diffusers(model).items()})
    config = mmdit_config(shapes)
    expected = {**tiny_config(), "sample_size": 128}
    assert config == expected
    assert variant_name(config).startswith("SD3-family MMDiT (depth 3, MMDiT-X")


def test_transforms_keep_per_tensor_scales_and_split_per_channel_ones():
    qkv_scale = torch.arange(6.0)
    k = Transform(parts=3, index=1)
    assert torch.equal(k.apply(qkv_scale), torch.tensor([2.0, 3.0]))
    assert k.apply(torch.tensor(0.5)).item() == 0.5
    assert torch.equal(Transform(swap_halves=True).apply(torch.arange(4.0)), torch.tensor([2.0, 3.0, 0.0, 1.0]))


def test_unknown_keys_and_broken_shapes_are_refused():
    with pytest.raises(KeyError):
        original_key_to_diffusers("joint_blocks.0.x_block.attn.qkv_fused.weight", 2)
    with pytest.raises(KeyError):
        original_key_to_diffusers("down_blocks.0.resnets.0.conv1.weight", 2)
    model = SD3Transformer2DModel(**tiny_config())
    shapes = strip_prefix({k: tuple(v.shape) for k, v in original_from_diffusers(model).items()})
    with pytest.raises(ModelLoadError, match="missing tensor 'pos_embed'"):
        mmdit_config({k: v for k, v in shapes.items() if k != "pos_embed"})
    with pytest.raises(ModelLoadError, match=r"joint_blocks \[1\] missing"):
        mmdit_config({k: v for k, v in shapes.items() if not k.startswith("joint_blocks.1.")})


@pytest.mark.parametrize(
    "overrides,name",
    [(dict(num_layers=24, pos_embed_max_size=192, dual_attention_layers=()), "SD3 Medium"),
     (dict(num_layers=24, pos_embed_max_size=384, dual_attention_layers=tuple(range(13))), "SD3.5 Medium"),
     (dict(num_layers=38, pos_embed_max_size=192, dual_attention_layers=()), "SD3.5 Large / Large Turbo")],
)
def test_variant_names(overrides, name):
    assert variant_name({**tiny_config(), **overrides}) == name
