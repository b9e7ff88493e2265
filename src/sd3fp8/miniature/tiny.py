"""Tiny SD3-architecture models written offline: the same diffusers/transformers classes and key
layout as SD3.5 (MMDiT-X dual attention, qk RMS-norm, three text encoders), at toy sizes.

Used by the tests, and as the default model until a trained miniature model is bundled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Byte-level BPE alphabet of CLIP (printable bytes map to themselves).
_ASCII = [chr(c) for c in range(ord("!"), ord("~") + 1)]
BASIC_WORDS = ["a", "an", "the", "of", "in", "on", "at", "with", "and", "to", "is", "small", "large", "big", "tiny", "red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "grey", "brown", "circle", "square", "triangle", "cross", "star", "shape", "left", "right", "top", "bottom", "center", "middle", "background", "photo", "picture", "painting", "cat", "dog", "house", "tree", "sky", "sea", "mountain", "city", "night", "day"]


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny SD3 model. Defaults keep every linear dimension a multiple of 16."""

    hidden: int = 32  # heads * head_dim of the MMDiT
    heads: int = 2
    layers: int = 2
    dual_attention_layers: tuple[int, ...] = (0,)  # SD3.5 Medium's MMDiT-X blocks
    qk_norm: str | None = "rms_norm"
    sample_size: int = 16  # latent pixels per side at the default resolution
    pos_embed_max_size: int = 16
    clip_hidden: int = 32
    clip_layers: int = 2
    t5_dim: int = 64  # = joint_attention_dim; must hold CLIP-L + CLIP-G hidden
    t5_layers: int = 2
    vae_channels: tuple[int, ...] = (16, 32)  # 2**(len-1) = VAE downsampling factor
    words: tuple[str, ...] = tuple(BASIC_WORDS)
    max_tokens: int = 77  # CLIP context length (SD3: 77)
    scheduler_shift: float = 3.0  # FlowMatchEulerDiscreteScheduler shift (SD3: 3.0 at 1024 px)
    seed: int = 0


def _clip_tokenizer_files(words: tuple[str, ...], folder: Path) -> int:
    """Write vocab.json / merges.txt of a byte-level BPE whose merges spell out ``words``.

    Known words become one token; anything else falls back to characters. Returns the vocab size.
    """
    vocab: dict[str, int] = {}
    for ch in _ASCII:
        vocab.setdefault(ch, len(vocab))
    for ch in _ASCII:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[str] = []
    for word in sorted(set(words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in merges:
                merges.append(merge)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.setdefault(symbols[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def build_clip_tokenizer(words: tuple[str, ...], folder: Path, max_tokens: int = 77):
    from transformers import CLIPTokenizer

    _clip_tokenizer_files(words, folder)
    tok = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=max_tokens
    )
    tok.save_pretrained(folder)
    return tok


def build_t5_tokenizer(words: tuple[str, ...], folder: Path):
    """A Unigram (SentencePiece-style) tokenizer in tokenizer.json form: pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in sorted(set(words))]
    pieces += [(c, -5.0) for c in _ASCII]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    tok = T5TokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        extra_ids=0, model_max_length=512,
    )
    tok.save_pretrained(folder)
    return tok


def build_tiny_pipeline(spec: TinySpec, folder: Path):
    """Build every component of a tiny SD3 pipeline (random weights, deterministic from spec.seed)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(spec.seed)
    tokenizer = build_clip_tokenizer(spec.words, folder / "tokenizer", spec.max_tokens)
    tokenizer_2 = build_clip_tokenizer(spec.words, folder / "tokenizer_2", spec.max_tokens)
    tokenizer_3 = build_t5_tokenizer(spec.words, folder / "tokenizer_3")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def clip():
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=spec.clip_hidden, intermediate_size=2 * spec.clip_hidden,
            num_hidden_layers=spec.clip_layers, num_attention_heads=2, max_position_embeddings=spec.max_tokens,
            projection_dim=spec.clip_hidden, hidden_act="gelu", bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos,
        )
        return CLIPTextModelWithProjection(config).eval()

    t5_config = T5Config(
        vocab_size=len(tokenizer_3), d_model=spec.t5_dim, d_kv=16, d_ff=2 * spec.t5_dim, num_layers=spec.t5_layers,
        num_heads=spec.t5_dim // 16, feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
    )
    transformer = SD3Transformer2DModel(
        sample_size=spec.sample_size, patch_size=2, in_channels=16, num_layers=spec.layers,
        attention_head_dim=spec.hidden // spec.heads, num_attention_heads=spec.heads,
        joint_attention_dim=spec.t5_dim, caption_projection_dim=spec.hidden, pooled_projection_dim=2 * spec.clip_hidden,
        out_channels=16, pos_embed_max_size=spec.pos_embed_max_size,
        dual_attention_layers=spec.dual_attention_layers, qk_norm=spec.qk_norm,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        block_out_channels=spec.vae_channels, layers_per_block=1, norm_num_groups=8,
        sample_size=spec.sample_size * 2 ** (len(spec.vae_channels) - 1),
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.scheduler_shift),
        vae=vae.eval(), text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(), tokenizer_2=tokenizer_2,
        text_encoder_3=T5EncoderModel(t5_config).eval(), tokenizer_3=tokenizer_3,
    )


def write_tiny_model(folder: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a complete diffusers-format tiny SD3 folder at ``folder`` (atomically: built beside it, then renamed)."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe = build_tiny_pipeline(spec, staging)
        pipe.save_pretrained(staging, safe_serialization=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
