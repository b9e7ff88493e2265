"""SD3 checkpoint files as users have them, built small: the real key names, the real CLIP-L / CLIP-G /
T5-XXL widths (768 / 1280 / 4096, one layer each), a narrow MMDiT and an LDM-layout VAE.

``write_files`` returns the pieces separately (MMDiT, VAE, text encoders) and the reference models
(diffusers / transformers modules holding the very same weights) so tests can compare.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file

from sd3fp8.io.components import VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR
from sd3fp8.io.detection import COMPONENT_PREFIXES
from sd3fp8.io.layouts import MMDIT_PREFIX, diffusers_state_to_original
from sd3fp8.miniature.tiny import BASIC_WORDS, build_clip_tokenizer, build_t5_tokenizer

VAE_CHANNELS = (32, 64)  # 2x downsampling; multiples of the 32 norm groups SD3's VAE uses


def mmdit_config(layers=2):
    return dict(sample_size=8, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64, num_attention_heads=1,
                joint_attention_dim=4096, caption_projection_dim=64, pooled_projection_dim=768 + 1280, out_channels=16,
                pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def ldm_vae_state(channels=VAE_CHANNELS, layers=1, latent=16, seed=0) -> dict[str, torch.Tensor]:
    """Random weights under the original (LDM) VAE key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(name, cout, cin, k):
        state[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * (1 / (cin * k * k)) ** 0.5
        state[name + ".bias"] = torch.zeros(cout)

    def norm(name, c):
        state[name + ".weight"], state[name + ".bias"] = torch.ones(c), torch.zeros(c)

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin), conv(name + ".conv1", cout, cin, 3), norm(name + ".norm2", cout), conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    def mid(prefix, c):
        resnet(prefix + "mid.block_1", c, c), resnet(prefix + "mid.block_2", c, c), norm(prefix + "mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}mid.attn_1.{part}", c, c, 1)

    conv("encoder.conv_in", channels[0], 3, 3)
    cin = channels[0]
    for i, c in enumerate(channels):
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", cin if j == 0 else c, c)
        cin = c
        if i < len(channels) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder.", channels[-1]), norm("encoder.norm_out", channels[-1]), conv("encoder.conv_out", 2 * latent, channels[-1], 3)
    conv("decoder.conv_in", channels[-1], latent, 3), mid("decoder.", channels[-1])
    cin = channels[-1]
    for i in reversed(range(len(channels))):
        for j in range(layers + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin if j == 0 else channels[i], channels[i])
        cin = channels[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", channels[i], channels[i], 3)
    norm("decoder.norm_out", channels[0]), conv("decoder.conv_out", 3, channels[0], 3)
    return state


@dataclasses.dataclass
class SD3Files:
    mmdit: dict  # original-layout MMDiT tensors (no prefix)
    vae: dict  # LDM-layout VAE tensors (no prefix)
    clip_l: dict
    clip_g: dict
    t5: dict
    tokenizers: Path  # diffusers layout: tokenizer/, tokenizer_2/, tokenizer_3/
    models: dict  # reference modules by pipeline component name (+ "scheduler")

    def all_in_one(self, with_text_encoders=True) -> dict:
        out = {MMDIT_PREFIX + k: v for k, v in self.mmdit.items()} | {COMPONENT_PREFIXES["vae"] + k: v for k, v in self.vae.items()}
        if with_text_encoders:
            for component, part in (("text_encoder", self.clip_l), ("text_encoder_2", self.clip_g), ("text_encoder_3", self.t5)):
                out |= {COMPONENT_PREFIXES[component] + k: v for k, v in part.items()}
        return out


def build_sd3_files(folder: Path, seed=0) -> SD3Files:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd3fp8.io.components import vae_config

    torch.manual_seed(seed)
    tok = build_clip_tokenizer(BASIC_WORDS, folder / "tokenizer")
    build_clip_tokenizer(BASIC_WORDS, folder / "tokenizer_2").save_pretrained(folder / "tokenizer_2")
    t5_tok = build_t5_tokenizer(BASIC_WORDS, folder / "tokenizer_3")
    eos = tok.eos_token_id

    def clip(width, heads, act):
        config = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=heads, max_position_embeddings=77, projection_dim=width, hidden_act=act,
                                bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos)
        return CLIPTextModelWithProjection(config).eval()

    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1)).eval()
    transformer = SD3Transformer2DModel(**mmdit_config()).eval()
    vae_state = ldm_vae_state(seed=seed)
    shapes = {k: tuple(v.shape) for k, v in vae_state.items()}
    vae = AutoencoderKL.from_config(vae_config(shapes, "test"))
    vae.load_state_dict(convert_ldm_vae_checkpoint(vae_state, vae.config), strict=True)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR)
    clip_l, clip_g = clip(768, 12, "quick_gelu"), clip(1280, 20, "gelu")

    def plain(model):
        state = model.state_dict()
        state.pop("encoder.embed_tokens.weight", None)  # T5 files hold only the tied `shared`
        return {k: v.clone() for k, v in state.items() if not k.endswith("position_ids")}

    models = {"transformer": transformer, "vae": vae.eval(), "text_encoder": clip_l, "text_encoder_2": clip_g,
              "text_encoder_3": t5, "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)}
    mmdit = diffusers_state_to_original(transformer.state_dict(), transformer.config.num_layers, prefix="")
    return SD3Files(mmdit, vae_state, plain(clip_l), plain(clip_g), plain(t5), folder, models)


def save(path: Path, tensors: dict, metadata=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def reference_folder(files: SD3Files, folder: Path) -> Path:
    """The same weights as a diffusers folder (what the file loaders must reproduce)."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    m = files.models
    pipe = StableDiffusion3Pipeline(
        transformer=m["transformer"], scheduler=m["scheduler"], vae=m["vae"], text_encoder=m["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(files.tokenizers / "tokenizer"), text_encoder_2=m["text_encoder_2"],
        tokenizer_2=CLIPTokenizer.from_pretrained(files.tokenizers / "tokenizer_2", pad_token="!"),
        text_encoder_3=m["text_encoder_3"], tokenizer_3=T5TokenizerFast.from_pretrained(files.tokenizers / "tokenizer_3"),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
