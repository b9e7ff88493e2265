"""Loading original-layout MMDiT files: 16-bit, plain FP8 casts and ComfyUI scaled FP8."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file

from sd3fp8 import Policy
from sd3fp8.errors import ModelLoadError, SD3FP8Error
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.fp8.numerics import FP8Format, Granularity, quantize_weight
from sd3fp8.fp8.swap import quantize_linears
from sd3fp8.io.singlefile import load_mmdit
from tests.test_layouts import original_from_diffusers, tiny_config

P = "model.diffusion_model."


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**tiny_config()).eval()
    return model, original_from_diffusers(model)


def inputs(config):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 5, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g), timestep=torch.tensor([300.0]))


def save(tmp_path, tensors, name="m.safetensors", metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture
def live_file_bytes(monkeypatch):
    """Start counting the bytes of tensors read from files (LazyTensors.get) that are still alive;
    returns a function giving the peak of that count so far."""
    import itertools
    import weakref

    from sd3fp8.io.checkpoint import LazyTensors

    def start():
        live: dict[int, int] = {}
        peak, tokens, real_get = [0], itertools.count(), LazyTensors.get

        def counting_get(self, name):
            tensor = real_get(self, name)
            token = next(tokens)
            live[token] = tensor.numel() * tensor.element_size()
            weakref.finalize(tensor, live.pop, token, None)
            peak[0] = max(peak[0], sum(live.values()))
            return tensor

        monkeypatch.setattr(LazyTensors, "get", counting_get)
        return lambda: peak[0]

    return start


def out(model, config):
    with torch.no_grad():
        return model(**inputs(config)).sample


def test_16bit_file_loads_equal_to_in_memory_quantization(tmp_path, reference):
    model, original = reference
    path = save(tmp_path, original)
    loaded, fp8_names, detection = load_mmdit(path, Policy(), torch.float32)
    expected = SD3Transformer2DModel(**tiny_config()).eval()
    expected.load_state_dict(model.state_dict())
    names = quantize_linears(expected, Policy().layer_filter("transformer"), backend="weight-only")
    assert fp8_names == names and detection.fp8 == "none"
    assert_same_state(loaded, expected)
    # memory-mapped tensors sit at other alignments, so BLAS may round the last bit differently
    torch.testing.assert_close(out(loaded, model.config), out(expected, model.config), rtol=0, atol=1e-5)
    full, _, _ = load_mmdit(path, Policy(transformer="fp32"), torch.float32)
    assert_same_state(full, model)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key].view(torch.uint8) if sa[key].element_size() == 1 else sa[key], sb[key].view(torch.uint8) if sb[key].element_size() == 1 else sb[key]), key


def test_plain_fp8_cast_keeps_its_bytes(tmp_path, reference):
    model, original = reference
    cast = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 and "pos_embed" not in k else v) for k, v in original.items()}
    loaded, fp8_names, detection = load_mmdit(save(tmp_path, cast), Policy(), torch.float32)
    assert detection.fp8 == "plain-cast"
    q = loaded.transformer_blocks[0].attn.to_k
    assert isinstance(q, FP8Linear) and q.weight_scale.item() == 1.0
    fused = cast[P + "joint_blocks.0.x_block.attn.qkv.weight"]
    assert torch.equal(q.weight.view(torch.uint8), fused.chunk(3)[1].view(torch.uint8))
    # layers the policy keeps in 16 bit are upcast from the plain cast: value = stored number
    assert torch.equal(loaded.context_embedder.weight, cast[P + "context_embedder.weight"].float())


def comfy_scaled(original, per_tensor=True):
    """A ComfyUI scaled-fp8 file: fp8 weights + float32 scalar scale_weight per Linear, marker key."""
    out = {P + "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in original.items():
        if k.endswith(".weight") and v.dim() == 2:
            w8, s = quantize_weight(v, FP8Format.E4M3, Granularity.TENSOR)
            out[k], out[k.replace(".weight", ".scale_weight")] = w8, s
        else:
            out[k] = v
    return out


def test_comfy_scaled_fp8_split_qkv_keeps_bytes_and_shared_scale(tmp_path, reference):
    model, original = reference
    scaled = comfy_scaled(original)
    scaled[P + "joint_blocks.1.x_block.attn.qkv.scale_input"] = torch.tensor(0.02)
    loaded, _, detection = load_mmdit(save(tmp_path, scaled), Policy(), torch.float32)
    assert detection.fp8 == "comfy-scaled"
    fused, scale = scaled[P + "joint_blocks.1.x_block.attn.qkv.weight"], scaled[P + "joint_blocks.1.x_block.attn.qkv.scale_weight"]
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        layer = getattr(loaded.transformer_blocks[1].attn, part)
        assert torch.equal(layer.weight.view(torch.uint8), fused.chunk(3)[i].view(torch.uint8))
        assert layer.weight_scale.item() == scale.item() and layer.granularity is Granularity.TENSOR
        assert layer.input_scale.item() == pytest.approx(0.02)
    # close to the 16-bit model within FP8 error
    ref = out(model, model.config)
    err = (out(loaded, model.config) - ref).pow(2).mean() / ref.pow(2).mean()
    assert err < 1e-2
    # and dequantized exactly when the policy wants 16 bit
    full, names, _ = load_mmdit(save(tmp_path, scaled, "s2.safetensors"), Policy(transformer="fp32"), torch.float32)
    assert names == []
    expected = fused.chunk(3)[0].float() * scale
    assert torch.equal(full.transformer_blocks[1].attn.to_q.weight, expected)


def test_final_adaln_halves_swap_with_per_channel_scales(tmp_path, reference):
    model, original = reference
    tensors = dict(original)
    key = P + "final_layer.adaLN_modulation.1.weight"
    w8, s = quantize_weight(original[key], FP8Format.E4M3, Granularity.CHANNEL)
    tensors[key], tensors[key.replace(".weight", ".weight_scale")] = w8, s
    policy = Policy(exclude=("pos_embed", "time_text_embed", "context_embedder", "proj_out"))  # norm_out FP8 too
    loaded, _, _ = load_mmdit(save(tmp_path, tensors), policy, torch.float32)
    layer = loaded.norm_out.linear
    shift, scale = w8.chunk(2)
    assert torch.equal(layer.weight.view(torch.uint8), torch.cat([scale, shift]).view(torch.uint8))
    s_shift, s_scale = s.chunk(2)
    assert torch.equal(layer.weight_scale, torch.cat([s_scale, s_shift]))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(P + "joint_blocks.1.context_block.mlp.fc1.weight") is not None and t, "transformer_blocks.1.ff_context.net.0.proj"),
    (lambda t: t.update({P + "joint_blocks.0.x_block.mlp.fc2.weight": torch.zeros(3, 3)}) or t, "has shape"),
    (lambda t: t.update({P + "joint_blocks.0.x_block.mlp.extra.weight": torch.zeros(3, 3)}) or t, "unexpected tensor"),
])
def test_broken_files(tmp_path, reference, edit, message):
    _, original = reference
    tensors = edit(dict(original))
    with pytest.raises(SD3FP8Error, match=message):
        load_mmdit(save(tmp_path, tensors), Policy(), torch.float32)


@pytest.mark.parametrize("policy", [Policy(), Policy(transformer="fp32")])
def test_nan_weights_are_named(tmp_path, reference, policy):
    _, original = reference
    tensors = dict(original)
    bad = tensors[P + "joint_blocks.1.x_block.mlp.fc1.weight"].clone()
    bad[0, 0] = float("nan")
    tensors[P + "joint_blocks.1.x_block.mlp.fc1.weight"] = bad
    with pytest.raises(SD3FP8Error, match="joint_blocks.1|transformer_blocks.1.ff.net.0.proj"):
        load_mmdit(save(tmp_path, tensors), policy, torch.float32)


def test_unsupported_comfy_quant_format_is_refused(tmp_path, reference):
    _, original = reference
    tensors = dict(original)
    tensors[P + "context_embedder.comfy_quant"] = torch.tensor(list(json.dumps({"format": "mxfp8"}).encode()), dtype=torch.uint8)
    with pytest.raises(ModelLoadError, match="mxfp8"):
        load_mmdit(save(tmp_path, tensors), Policy(), torch.float32)


def test_pipeline_takes_its_transformer_from_a_single_file(tiny_model, tmp_path):
    """generate --transformer FILE: a ComfyUI scaled-fp8 export of the folder's own MMDiT runs in the pipeline."""
    import numpy as np

    from sd3fp8 import RuntimeConfig, SD3FP8Pipeline
    from sd3fp8.io.layouts import diffusers_state_to_original
    from sd3fp8.io.quantize import QuantizeOptions, quantize_file

    folder_engine = SD3FP8Pipeline.from_pretrained(tiny_model, Policy(transformer="fp32"), RuntimeConfig(dtype="fp32"))
    transformer = folder_engine.component("transformer")
    src = save(tmp_path, diffusers_state_to_original(transformer.state_dict(), transformer.config.num_layers), "mmdit.safetensors")
    comfy = quantize_file(src, tmp_path / "mmdit_fp8_scaled.safetensors", QuantizeOptions(format="comfy", granularity="tensor"))
    engine = SD3FP8Pipeline.from_pretrained(tiny_model, Policy(), RuntimeConfig(dtype="fp32"), transformer_file=comfy)
    assert engine.fp8_layers["transformer"] and isinstance(engine.component("transformer").transformer_blocks[0].attn.to_q, FP8Linear)
    kwargs = dict(seed=3, steps=3, width=32, height=32)
    a = np.asarray(folder_engine("a red circle", **kwargs).images[0], dtype=np.float64)
    b = np.asarray(engine("a red circle", **kwargs).images[0], dtype=np.float64)
    assert 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12)) > 38


def test_a_16_bit_file_loads_into_fp8_one_tensor_at_a_time(tmp_path, reference, live_file_bytes):
    """Loading streams: at no moment do the tensors read from the file and still alive exceed what
    the finished model keeps in 16 bit plus two of the file's largest tensors (a fused qkv cached for
    its three parts, and the part being quantized). Reading the whole state dict first, as loading
    once did, holds every 16-bit linear weight at once and fails this."""
    from sd3fp8.io.checkpoint import read_header

    _, original = reference
    path = save(tmp_path, {k: v.to(torch.bfloat16) for k, v in original.items()})
    peak = live_file_bytes()
    loaded, fp8_names, _ = load_mmdit(path, Policy(), torch.bfloat16)
    kept = sum(t.numel() * t.element_size() for t in [*loaded.parameters(), *loaded.buffers()] if t.dtype == torch.bfloat16)
    header = read_header(path)
    largest = max(info.nbytes for info in header.tensors.values())
    total = sum(info.nbytes for info in header.tensors.values())
    assert fp8_names and total > kept + 4 * largest  # the bound below tells streaming from a full read
    assert peak() <= kept + 2 * largest, (peak(), kept, largest, total)


@pytest.mark.parametrize("shard_size", [None, "150KB"])
def test_a_diffusers_transformer_folder_streams_into_fp8(tmp_path, reference, live_file_bytes, shard_size):
    """A diffusers transformer/ folder (one file or shards) loads into FP8 exactly as quantizing the
    16-bit model in memory does, holding no more than the single-file path does."""
    import copy

    from sd3fp8.fp8.linear import Backend
    from sd3fp8.io.singlefile import FP8Scheme, folder_weight_files, load_folder_mmdit

    model = copy.deepcopy(reference[0]).to(torch.bfloat16)  # the module's reference stays float32
    folder = tmp_path / "transformer"
    model.save_pretrained(folder, safe_serialization=True, **({"max_shard_size": shard_size} if shard_size else {}))
    files = folder_weight_files(folder)
    assert (len(files) > 2) == bool(shard_size)
    peak = live_file_bytes()
    scheme = FP8Scheme.from_policy(Policy(), "transformer", Backend.WEIGHT_ONLY, "tensor")
    loaded, fp8_names = load_folder_mmdit(folder, scheme, torch.bfloat16)
    expected = SD3Transformer2DModel(**tiny_config()).eval().to(torch.bfloat16)
    expected.load_state_dict(model.state_dict())
    names = quantize_linears(expected, Policy().layer_filter("transformer"), backend="weight-only")
    assert fp8_names == names
    assert_same_state(loaded, expected)
    kept = sum(t.numel() * t.element_size() for t in [*loaded.parameters(), *loaded.buffers()] if t.dtype == torch.bfloat16)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert peak() <= kept + 2 * largest, (peak(), kept, largest)


def test_a_shard_index_naming_files_elsewhere_is_refused(tmp_path):
    from sd3fp8.io.singlefile import folder_weight_files

    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
    with pytest.raises(ModelLoadError, match=r"shard '\.\./secret\.safetensors' is not a \.safetensors file in"):
        folder_weight_files(folder)
    with pytest.raises(ModelLoadError, match="no diffusion_pytorch_model.safetensors and no"):
        folder_weight_files(tmp_path)


def test_load_transformer_takes_a_single_file_a_transformer_folder_and_a_pipeline_folder(tmp_path, reference, tiny_model):
    """sd3fp8.load_transformer: the public entry point for the MMDiT alone, the same FP8 model from
    each kind of source."""
    from sd3fp8 import load_transformer

    model, original = reference
    single = load_transformer(save(tmp_path, original), device="cpu", dtype="fp32")
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    folder = load_transformer(tmp_path / "transformer", device="cpu", dtype="fp32")
    assert_same_state(single, folder)
    assert sum(isinstance(m, FP8Linear) for m in single.modules()) > 10
    bf16 = load_transformer(tmp_path / "transformer", Policy(transformer="bf16"), device="cpu")
    assert not any(isinstance(m, FP8Linear) for m in bf16.modules()) and next(bf16.parameters()).dtype == torch.bfloat16
    pipeline_folder = load_transformer(tiny_model, device="cpu", dtype="fp32")
    assert any(isinstance(m, FP8Linear) for m in pipeline_folder.modules())
    with pytest.raises(ModelLoadError):
        load_transformer(tmp_path / "nothing-here", device="cpu")


def test_a_t5_folder_streams_into_fp8_as_quantizing_it_in_memory_does(tiny_model):
    from transformers import T5EncoderModel

    from sd3fp8.fp8.linear import Backend
    from sd3fp8.io.components import load_folder_t5
    from sd3fp8.io.singlefile import FP8Scheme

    policy = Policy(text_encoder_3="fp8")
    scheme = FP8Scheme.from_policy(policy, "text_encoder_3", Backend.WEIGHT_ONLY, "tensor")
    loaded, names = load_folder_t5(tiny_model / "text_encoder_3", scheme, torch.float32)
    expected = T5EncoderModel.from_pretrained(tiny_model / "text_encoder_3", torch_dtype=torch.float32, local_files_only=True).eval()
    assert names == quantize_linears(expected, policy.layer_filter("text_encoder_3"), backend="weight-only") and names
    assert_same_state(loaded, expected)
    ids = torch.tensor([[3, 5, 7, 1]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, expected(ids).last_hidden_state, rtol=0, atol=1e-6)
