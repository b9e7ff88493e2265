"""Hostile models: pickles in every position (their payload would create a marker file: it never
does), components that do not fit together, configs that would exhaust memory, and the silent
FP8 corruption of quantize (a tensor no loader dequantizes written as FP8)."""

import json
import pathlib
import pickle
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hostile_helpers import copy_model, edit_json, refused, refused_subprocess, wide_mmdit_file

GEN = ["--steps", "1", "--width", "32", "--height", "32", "--dtype", "fp32", "-q"]


class Payload:
    """Unpickling this creates ``marker``: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PICKLE-RAN"
    yield path
    assert not path.exists(), "a pickle was unpickled"


def raw_pickle(path, marker):
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    return path


def torch_pickle(path, marker):
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, path)
    return path


# --- pickles ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["--model", "--transformer", "--text-encoders", "--vae", "inspect", "quantize"])
def test_pickle_file_in_every_position(capsys, tmp_path, tiny_model, tiny_files, marker, position):
    evil = (raw_pickle if position in ("--model", "--text-encoders", "inspect") else torch_pickle)(tmp_path / "evil.ckpt", marker)
    what = "is a pickle" if evil.read_bytes()[:1] == b"\x80" else "zip archive"
    common = [*GEN, "--out", tmp_path / "o.png"]
    argv = {
        "--model": ["generate", "x", "--model", evil, "--tokenizers", tiny_model, *common],
        "--transformer": ["generate", "x", "--model", tiny_model, "--transformer", evil, *common],
        "--text-encoders": ["generate", "x", "--model", tiny_files["mmdit"], "--tokenizers", tiny_model, "--text-encoders", evil, *common],
        "--vae": ["generate", "x", "--model", tiny_files["mmdit"], "--tokenizers", tiny_model, "--vae", evil, *common],
        "inspect": ["inspect", evil],
        "quantize": ["quantize", evil, "--out", tmp_path / "q.safetensors", "-q"],
    }[position]
    refused(capsys, argv, ("evil.ckpt", what, "never unpickled"), sources=[evil, tiny_model, tiny_files["mmdit"]], outputs=[tmp_path])


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_pickled_weights_in_a_diffusers_folder(capsys, tmp_path, tiny_model, marker, component):
    model = copy_model(tiny_model, tmp_path / "m")
    folder = model / component
    if component == "transformer":  # only a .bin: diffusers would unpickle it
        (folder / "diffusion_pytorch_model.safetensors").unlink()
        torch_pickle(folder / "diffusion_pytorch_model.bin", marker)
    else:  # a pickle under a safetensors name
        raw_pickle(folder / "diffusion_pytorch_model.safetensors", marker)
    expect = "is a pickle" if component == "vae" else "holds only pickled weights"
    refused(capsys, ["generate", "x", "--model", model, *GEN, "--out", tmp_path / "o.png"], (component, expect),
            sources=[model], outputs=[tmp_path])


def test_pickle_beside_safetensors_is_ignored_never_unpickled(capsys, tmp_path, tiny_model, marker):
    """Older downloads ship pytorch_model.bin next to model.safetensors: the safetensors file is read,
    the pickle never is (its payload would create the marker)."""
    from sd3fp8 import cli

    model = copy_model(tiny_model, tmp_path / "m")
    torch_pickle(model / "text_encoder_3" / "pytorch_model.bin", marker)
    assert cli.main(["generate", "x", "--model", str(model), *map(str, GEN), "--out", str(tmp_path / "o.png")]) == 0
    capsys.readouterr()
    assert (tmp_path / "o.png").is_file() and not marker.exists()


@pytest.mark.parametrize("option", ["--policy", "--calibration"])
def test_pickle_as_a_json_file_is_never_unpickled(capsys, tmp_path, tiny_model, marker, option):
    evil = raw_pickle(tmp_path / "evil.json", marker)
    refused(capsys, ["generate", "x", "--model", tiny_model, option, evil, *GEN, "--out", tmp_path / "o.png"],
            ("evil.json", "not UTF-8"), sources=[evil, tiny_model], outputs=[tmp_path])


def test_pickle_in_a_comfyui_tree_is_skipped_and_named(capsys, tmp_path, marker):
    checkpoints = tmp_path / "ComfyUI" / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    raw_pickle(checkpoints / "sd35.safetensors", marker)
    refused(capsys, ["generate", "x", "--model", tmp_path / "ComfyUI", *GEN, "--out", tmp_path / "o.png"],
            ("no SD3/SD3.5 checkpoint", "skipped sd35.safetensors", "is a pickle"), sources=[checkpoints], outputs=[tmp_path])


def test_pickle_through_the_console_entry_point(tmp_path, marker):
    evil = raw_pickle(tmp_path / "evil.ckpt", marker)
    refused_subprocess(["inspect", evil], ("evil.ckpt", "is a pickle"), sources=[evil], outputs=[tmp_path])


# --- components that do not fit together -----------------------------------------------------------

def test_transformer_whose_text_width_does_not_fit_the_encoders(capsys, tmp_path, tiny_model):
    """The issue's case: this ended in 'mat1 and mat2 shapes cannot be multiplied' mid-generation."""
    wide = wide_mmdit_file(tmp_path / "wide.safetensors")
    line = refused(capsys, ["generate", "x", "--model", tiny_model, "--transformer", wide, *GEN, "--out", tmp_path / "o.png"],
                   ("components do not fit together", "MMDiT", "wide.safetensors", "T5-XXL", "4096", "64"),
                   sources=[wide, tiny_model], outputs=[tmp_path])
    assert "pooled" in line  # both disagreements are named at once


def test_pooled_width_mismatch_without_t5(capsys, tmp_path, tiny_model):
    wide = wide_mmdit_file(tmp_path / "wide.safetensors", joint=64, pooled=2048)
    refused(capsys, ["generate", "x", "--model", tiny_model, "--transformer", wide, "--t5", "off", *GEN, "--out", tmp_path / "o.png"],
            ("pooled", "2048", "CLIP-L", "CLIP-G"), sources=[wide, tiny_model], outputs=[tmp_path])


def test_vae_latent_channels_mismatch(capsys, tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path / "m")
    edit_json(model / "vae" / "config.json", latent_channels=4)
    refused(capsys, ["generate", "x", "--model", model, *GEN, "--out", tmp_path / "o.png"], ("16-channel latents", "VAE", "has 4"),
            sources=[model], outputs=[tmp_path])


# --- configs that would exhaust memory ---------------------------------------------------------------

def test_num_layers_100000_is_refused_quickly(capsys, tmp_path, tiny_model):
    """The issue's case: 5 GB RSS and growing after two minutes."""
    model = copy_model(tiny_model, tmp_path / "m")
    edit_json(model / "transformer" / "config.json", num_layers=100000)
    start = time.perf_counter()
    refused(capsys, ["generate", "x", "--model", model, *GEN, "--out", tmp_path / "o.png"], ("num_layers", "100000", "1..1024"),
            sources=[model], outputs=[tmp_path])
    assert time.perf_counter() - start < 30


def test_config_beyond_memory_is_refused_before_allocating(capsys, tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path / "m")
    edit_json(model / "transformer" / "config.json", num_layers=400, num_attention_heads=64, attention_head_dim=64,
              caption_projection_dim=4096)  # 290 G parameters: SD3.5 Large is 8 G
    refused(capsys, ["generate", "x", "--model", model, *GEN, "--out", tmp_path / "o.png"], ("needs at least", "GiB", "MMDiT"),
            sources=[model], outputs=[tmp_path])


def test_memory_check_uses_what_is_available(capsys, tmp_path, tiny_model, monkeypatch):
    from sd3fp8.io import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    refused(capsys, ["generate", "x", "--model", tiny_model, *GEN, "--out", tmp_path / "o.png"], ("needs at least", "0.0 GiB is available"),
            sources=[tiny_model], outputs=[tmp_path])


def test_parameter_estimates_match_built_models():
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd3fp8.io import memory

    def count(m):
        return sum(t.numel() for t in [*m.parameters(), *m.buffers()] if t.is_floating_point())

    for dual, qk, pos in (((0,), "rms_norm", 16), ((), None, None), ((1, 3), "layer_norm", 12)):
        c = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8, num_attention_heads=4,
                 joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=40, out_channels=8,
                 pos_embed_max_size=pos, dual_attention_layers=dual, qk_norm=qk)
        with torch.device("meta"):
            assert memory.transformer_params(c) == count(SD3Transformer2DModel(**c))
    c = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=77, projection_dim=24)
    assert memory.clip_params(c) == count(CLIPTextModelWithProjection(CLIPTextConfig(**c, num_attention_heads=2, bos_token_id=0,
                                                                                      eos_token_id=1, pad_token_id=1)))
    c = dict(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
             relative_attention_num_buckets=32)
    assert memory.t5_params(c) == count(T5EncoderModel(T5Config(**c, is_encoder_decoder=False)))
    c = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[32, 64], layers_per_block=2)
    vae = AutoencoderKL(**c, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    assert abs(memory.vae_params(c) / count(vae) - 1) < 0.03


# --- quantize: nothing written as FP8 that no loader dequantizes ------------------------------------------

def test_quantize_with_an_empty_exclude_list_keeps_embeddings_16bit_and_loads_back(capsys, tmp_path, tiny_files):
    """The issue's silent corruption: CLIP-G's embeddings were written as FP8 with a scale no loader applies."""
    from sd3fp8 import cli
    from sd3fp8.io.checkpoint import LazyTensors
    from sd3fp8.io.components import FileSource, load_t5
    from sd3fp8.io.detection import COMPONENT_PREFIXES, detect
    from sd3fp8.io.fp8_targets import loader_dequantizes
    from sd3fp8.io.layouts import MMDIT_PREFIX

    policy, out = tmp_path / "p.json", tmp_path / "q.safetensors"
    policy.write_text(json.dumps({"exclude": []}))
    assert cli.main(["quantize", str(tiny_files["aio"]), "--out", str(out), "--policy", str(policy), "-q"]) == 0
    capsys.readouterr()
    with LazyTensors(tiny_files["aio"]) as src, LazyTensors(out) as dst:
        fp8 = [n for n, t in dst.header.tensors.items() if t.dtype == torch.float8_e4m3fn]
        assert fp8 and all(loader_dequantizes(n, detect(dst.header), MMDIT_PREFIX) for n in fp8)
        for name in src.keys():  # encoders and VAE: the very same tensors, so any loader reads what it read before
            if name.startswith(tuple(COMPONENT_PREFIXES.values())):
                assert dst.header.tensors[name].dtype == src.header.tensors[name].dtype, name
                assert torch.equal(dst.get(name), src.get(name)), name
    t5 = FileSource(out, COMPONENT_PREFIXES["text_encoder_3"])
    loaded, _ = load_t5(t5, torch.float32, None)
    reference, _ = load_t5(FileSource(tiny_files["aio"], t5.prefix), torch.float32, None)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize("part,options", [("clip_l", []), ("t5", [])])
def test_quantize_of_a_file_with_nothing_to_quantize(capsys, tmp_path, tiny_files, part, options):
    """These crashed with UnboundLocalError."""
    refused(capsys, ["quantize", tiny_files[part], "--out", tmp_path / "q.safetensors", *options, "-q"],
            ("nothing to quantize", f"{part}.safetensors"), sources=[tiny_files[part]], outputs=[tmp_path])


def test_quantize_t5_file_with_t5_fp8_works(capsys, tmp_path, tiny_files):
    from sd3fp8 import cli

    assert cli.main(["quantize", str(tiny_files["t5"]), "--out", str(tmp_path / "q.safetensors"), "--t5", "fp8", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out


def test_guard_refuses_what_the_policy_logic_would_wrongly_pick(tmp_path, tiny_files, monkeypatch):
    """A bug that picks an embedding for FP8 is an error, never a file (the guard is independent of the policy logic)."""
    from sd3fp8.errors import SD3FP8Error
    from sd3fp8.io import quantize

    monkeypatch.setattr(quantize, "T5_LINEAR_SUFFIXES", (".weight",))  # every T5 2-D weight: its embedding too
    with pytest.raises(SD3FP8Error, match=r"refusing to write 'text_encoders\.t5xxl\.transformer\.[^']+' as FP8: no loader"):
        quantize.quantize_file(tiny_files["aio"], tmp_path / "q.safetensors", quantize.QuantizeOptions(t5="fp8"))
    assert list(tmp_path.iterdir()) == []


def test_a_file_with_a_scaled_fp8_embedding_is_refused(tmp_path, tiny_files):
    """What the corrupt quantize wrote: loaders used to ignore the scale and load the codes (6484x off)."""
    from sd3fp8.errors import ModelLoadError
    from sd3fp8.io.components import FileSource, load_t5

    state = load_file(tiny_files["t5"])
    state["shared.weight"] = (state["shared.weight"].float() / 2).to(torch.float8_e4m3fn)
    state["shared.weight_scale"] = torch.tensor(2.0)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ModelLoadError, match="'shared' carries a weight scale but is not a linear layer"):
        load_t5(FileSource(bad), torch.float32, None)
