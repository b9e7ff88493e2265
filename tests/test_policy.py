import json

import pytest

from sd3fp8 import Policy, Precision
from sd3fp8.errors import ConfigError
from sd3fp8.fp8.numerics import Granularity
from sd3fp8.policy import matches

# Linear names of diffusers' SD3Transformer2DModel (SD3.5 Medium has attn2 in its first blocks).
SD3_LINEARS = {
    "context_embedder": False,
    "time_text_embed.timestep_embedder.linear_1": False,
    "time_text_embed.text_embedder.linear_2": False,
    "transformer_blocks.0.norm1.linear": True,
    "transformer_blocks.0.norm1_context.linear": True,
    "transformer_blocks.0.attn.to_q": True,
    "transformer_blocks.0.attn.add_k_proj": True,
    "transformer_blocks.0.attn.to_out.0": True,
    "transformer_blocks.0.attn.to_add_out": True,
    "transformer_blocks.0.attn2.to_v": True,
    "transformer_blocks.0.ff.net.0.proj": True,
    "transformer_blocks.0.ff_context.net.2": True,
    "norm_out.linear": False,
    "proj_out": False,
}


def test_default_policy_is_the_seed_table():
    p = Policy()
    assert p.transformer is Precision.FP8_E4M3
    assert p.granularity is Granularity.CHANNEL
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert not p.precision(component).is_fp8
    keep = p.layer_filter("transformer")
    assert {name: keep(name) for name in SD3_LINEARS} == SD3_LINEARS


def test_non_fp8_transformer_quantizes_nothing():
    keep = Policy(transformer="bf16").layer_filter("transformer")
    assert not any(keep(n) for n in SD3_LINEARS)


def test_include_and_exclude_patterns():
    p = Policy(include=("transformer_blocks.*",), exclude=("*.ff", "*.ff_context", "*.norm1*"))
    keep = p.layer_filter("transformer")
    assert keep("transformer_blocks.0.attn.to_q")
    assert not keep("transformer_blocks.0.ff.net.0.proj")  # an ancestor matches "*.ff"
    assert not keep("transformer_blocks.3.norm1_context.linear")
    assert not keep("context_embedder")  # not included


def test_matches_ancestors():
    assert matches("time_text_embed.text_embedder.linear_1", ("time_text_embed",))
    assert not matches("time_text_embedder", ("time_text_embed",))


def test_t5_fp8_keeps_wo_in_high_precision():
    keep = Policy(text_encoder_3="fp8").layer_filter("text_encoder_3")
    assert keep("encoder.block.0.layer.1.DenseReluDense.wi_0")
    assert not keep("encoder.block.0.layer.1.DenseReluDense.wo")


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_file_round_trip(tmp_path, suffix):
    p = Policy(transformer="fp8-e5m2", text_encoder_3="off", granularity="tensor", exclude=("proj_out", "*.ff"))
    path = tmp_path / f"policy{suffix}"
    if suffix == ".json":
        p.save(path)
    else:
        d = p.to_dict()
        path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in d.items()))
    assert Policy.load(path) == p


def test_partial_file_overrides_defaults(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('transformer = "bf16"\n')
    p = Policy.load(path)
    assert p.transformer is Precision.BF16 and p.exclude == Policy().exclude


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"transformer": "int4"}', "unknown precision 'int4'"),
        ('{"transformr": "bf16"}', "unknown policy field"),
        ('{"vae": "off"}', "only text_encoder_3"),
        ('{"vae": "fp8"}', "vae cannot be FP8"),
        ('{"exclude": 3}', "list of name patterns"),
        ("[1, 2]", "must be a mapping"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_policy_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        Policy.load(path)
    assert "bad.json" in str(info.value)


def test_missing_policy_file():
    with pytest.raises(ConfigError, match="cannot read policy file"):
        Policy.load("/nonexistent/policy.json")


def test_policy_prints_readably():
    text = str(Policy(text_encoder_3="off"))
    assert "transformer     fp8-e4m3" in text and "text_encoder_3  off" in text and "(T5-XXL)" in text
    assert "fp8 exclude     pos_embed, time_text_embed" in text


def test_replace_validates():
    assert Policy().replace(transformer="fp16").transformer is Precision.FP16
    with pytest.raises(ConfigError):
        Policy().replace(transformer="fp7")
