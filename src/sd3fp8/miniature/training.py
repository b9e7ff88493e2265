"""Train the miniature SD3 on the shape world, from scratch and deterministically.

    python -m sd3fp8.miniature.training --out src/sd3fp8/miniature/assets/mini-sd3

Stage 1 trains the AutoencoderKL (16 latent channels, 8x downsampling) on world images and sets
SD3-style ``shift_factor``/``scaling_factor`` from its latent statistics. Stage 2 trains the
SD3Transformer2DModel with SD3's rectified-flow objective (x_t = (1 - t) x0 + t noise, target
noise - x0, logit-normal t) and caption dropout for classifier-free guidance. The text encoders
stay randomly initialised and frozen: their embeddings are deterministic functions of the words.
Each batch is conditioned in one of the engine's two text modes (engine/text.py: ComfyUI's and
diffusers'), drawn at random, so the model works whichever a request uses.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sd3fp8.engine.text import ENCODER_KEYS, TOKENIZER_KEYS, TextMode, comfy_tokens, encode_comfy, encode_diffusers, layout_of
from sd3fp8.miniature.tiny import TinySpec, build_tiny_pipeline
from sd3fp8.miniature.world import IMAGE_SIZE, WORLD_WORDS, example

# max_tokens: the CLIP window (max_position_embeddings and the tokenizers' model_max_length) and the
# recipe's T5 max_sequence_length. The longest caption of the world is 25 CLIP tokens plus start and
# end, so every caption is one CLIP window in ComfyUI's mode and is never truncated in diffusers'.
MINI_SPEC = TinySpec(
    hidden=128, heads=4, layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm",
    sample_size=IMAGE_SIZE // 8, pos_embed_max_size=IMAGE_SIZE // 8,
    clip_hidden=32, clip_layers=2, t5_dim=64, t5_layers=2, vae_channels=(16, 32, 32, 32),
    words=WORLD_WORDS, max_tokens=28, scheduler_shift=1.0, seed=0, clip_g_pad="!", t5_lowercase=True,
)
WORLD = "shapes-v1"  # the judge's world (evalkit keys on it); its captions are the v2 grammar below
CAPTIONS = "v2: optional size, position and background, coloured backgrounds, word orders"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    pool: int = 16000  # world images rendered once and reused
    captions: int = 2  # random captions per pool image (training draws one per use)
    comfy_share: float = 0.5  # batches conditioned in ComfyUI's text mode; the rest in diffusers'
    vae_steps: int = 700
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    dit_steps: int = 3500
    dit_batch: int = 64
    dit_lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    threads: int = 1  # one thread: its CPU time is its wall time on an idle machine (and 2 threads lose to spinning on a shared one)
    # generation defaults written into the model's sd3fp8.json
    steps: int = 20
    cfg: float = 3.0


class LossLog:
    """Appends (stage, step, loss, lr, text mode, seconds, CPU seconds) rows to a CSV file."""

    def __init__(self, path: Path):
        self.file = open(path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["stage", "step", "loss", "lr", "mode", "seconds", "cpu_seconds"])
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def write(self, stage: str, step: int, loss: float, lr: float, mode: str = ""):
        self.writer.writerow([stage, step, f"{loss:.6f}", f"{lr:.6g}", mode, f"{time.perf_counter() - self.start:.1f}",
                              f"{time.process_time() - self.cpu_start:.1f}"])

    def close(self):
        self.file.close()


def render_pool(n: int, seed: int, captions: int = 1) -> tuple[torch.Tensor, list[list[str]]]:
    """``n`` training images as a uint8 [n, 3, 64, 64] tensor, with ``captions`` captions each."""
    images, texts = [], []
    for i in range(n):
        img, caps = example(i, seed, captions)
        images.append(torch.from_numpy(img.copy()).permute(2, 0, 1))
        texts.append(caps)
    return torch.stack(images), texts


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def train_vae(vae, images: torch.Tensor, config: TrainConfig, log: LossLog, progress: bool) -> None:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed + 1)
    bar = tqdm(range(config.vae_steps), desc="VAE", disable=not progress)
    for step in bar:
        lr = lr_at(step, config.vae_steps, config.vae_lr, config.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x = to_unit(images[torch.randint(len(images), (config.vae_batch,), generator=gen)])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + config.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.write("vae", step, loss.item(), lr)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_pool(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of every pool image: [n, 16, 8, 8]."""
    return torch.cat([vae.encode(to_unit(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)])


@dataclasses.dataclass
class TextBank:
    """Every distinct caption's conditioning in one text mode: context [n, T, D], pooled [n, P]."""

    mode: TextMode
    context: torch.Tensor
    pooled: torch.Tensor


def _first(ids: torch.Tensor, token: int) -> torch.Tensor:
    return (ids == token).int().argmax(dim=-1)


@torch.no_grad()
def _encode_comfy_batch(texts, tokenizers, encoders, layout) -> tuple[torch.Tensor, torch.Tensor]:
    # encode_comfy for many one-window prompts at once (checked against it in encode_bank)
    tokens = [comfy_tokens(text, tokenizers, encoders, layout) for text in texts]
    ids, ends = {}, {}
    for key in ENCODER_KEYS:
        rows = []
        for text, by_key in zip(texts, tokens):
            rules, windows = by_key[key]
            if len(windows) != 1:
                raise ValueError(f"caption {text!r} needs {len(windows)} CLIP windows of {layout.clip_window} tokens")
            rows.append([token for token, _ in windows[0]])
            ends[key] = rules.end
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"{key}: captions tokenize to different lengths in ComfyUI's mode")
        ids[key] = torch.tensor(rows)
    states, pooled = [], []
    for key, projected in (("text_encoder", False), ("text_encoder_2", True)):
        out = encoders[key](input_ids=ids[key], output_hidden_states=True)
        states.append(out.hidden_states[-2])
        vec = out.last_hidden_state[torch.arange(len(texts)), _first(ids[key], ends[key])]
        pooled.append(encoders[key].text_projection(vec) if projected else vec)
    clip = torch.cat(states, dim=-1)
    t5 = encoders["text_encoder_3"](input_ids=ids["text_encoder_3"]).last_hidden_state
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=1).float(), torch.cat(pooled, dim=-1).float()


@torch.no_grad()
def _encode_diffusers_batch(texts, tokenizers, encoders, max_sequence_length) -> tuple[torch.Tensor, torch.Tensor]:
    # encode_diffusers for many prompts at once (checked against it in encode_bank)
    window = tokenizers["tokenizer"].model_max_length
    states, pooled = [], []
    for tok, key in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        full = tokenizers[tok](texts, padding="longest").input_ids
        if max(len(r) for r in full) > window:
            raise ValueError(f"a caption is longer than the CLIP window of {window} tokens")
        ids = tokenizers[tok](texts, padding="max_length", max_length=window, truncation=True, return_tensors="pt").input_ids
        out = encoders[key](ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    if max(len(r) for r in tokenizers["tokenizer_3"](texts).input_ids) > max_sequence_length:
        raise ValueError(f"a caption is longer than T5's max_sequence_length {max_sequence_length}")
    ids = tokenizers["tokenizer_3"](texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                                    add_special_tokens=True, return_tensors="pt").input_ids
    t5 = encoders["text_encoder_3"](ids)[0]
    clip = torch.cat(states, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=1).float(), torch.cat(pooled, dim=-1).float()


@torch.no_grad()
def encode_bank(pipe, texts: list[str], mode: TextMode, max_sequence_length: int, batch: int = 512) -> TextBank:
    """The conditioning of ``texts`` in ``mode``, as the engine makes it (engine/text.py's
    encode_comfy / encode_diffusers with the model's own tokenizers and encoders), float32. Computed
    in batches; the first captions are checked against the engine's own one-prompt encoding."""
    tokenizers = {k: getattr(pipe, k) for k in TOKENIZER_KEYS}
    encoders = {k: getattr(pipe, k) for k in ENCODER_KEYS}
    layout = layout_of(encoders)
    if mode is TextMode.COMFY:
        def run(chunk):
            return _encode_comfy_batch(chunk, tokenizers, encoders, layout)
    else:
        def run(chunk):
            return _encode_diffusers_batch(chunk, tokenizers, encoders, max_sequence_length)
    parts = [run(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    context, pooled = torch.cat([c for c, _ in parts]), torch.cat([p for _, p in parts])
    for i in range(min(8, len(texts))):  # the engine's own encoding, one prompt at a time
        options = {"max_sequence_length": max_sequence_length} if mode is TextMode.DIFFUSERS else {}
        encode = encode_comfy if mode is TextMode.COMFY else encode_diffusers
        want_context, want_pooled = encode(texts[i], tokenizers, encoders, "cpu", torch.float32, **options)
        if want_context.shape[1:] != context.shape[1:] or not (
                torch.allclose(want_context[0], context[i], atol=1e-5) and torch.allclose(want_pooled[0], pooled[i], atol=1e-5)):
            raise RuntimeError(f"batched {mode.value} encoding of {texts[i]!r} differs from engine/text.py's")
    return TextBank(mode, context, pooled)


def train_transformer(transformer, latents: torch.Tensor, caption_ids: torch.Tensor, banks: list[TextBank], empty: int,
                      config: TrainConfig, log: LossLog, progress: bool):
    """Rectified flow (SD3): predict noise - x0 from x_t = (1 - t) x0 + t noise, t ~ logit-normal.
    Each batch takes its conditioning from one text mode (banks[0] = ComfyUI's with probability
    ``comfy_share``); caption ``caption_ids[image, k]`` indexes the banks, ``empty`` is "" (dropout)."""
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=config.dit_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed + 2)
    bar = tqdm(range(config.dit_steps), desc="MMDiT", disable=not progress)
    for step in bar:
        lr = lr_at(step, config.dit_steps, config.dit_lr, config.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        bank = banks[0] if torch.rand((), generator=gen) < config.comfy_share else banks[1]
        index = torch.randint(len(latents), (config.dit_batch,), generator=gen)
        which = torch.randint(caption_ids.shape[1], (config.dit_batch,), generator=gen)
        drop = torch.rand(config.dit_batch, generator=gen) < config.caption_dropout
        rows = torch.where(drop, empty, caption_ids[index, which])
        prompt, pooled = bank.context[rows], bank.pooled[rows]
        x0 = latents[index]
        t = torch.sigmoid(torch.randn(config.dit_batch, generator=gen))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        pred = transformer(hidden_states=xt, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=t * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        log.write("mmdit", step, loss.item(), lr, bank.mode.value)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    transformer.eval()


class Clock:
    """Wall and CPU minutes per stage."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}
        self.start, self.cpu = time.perf_counter(), time.process_time()
        self._mark = (self.start, self.cpu)

    def lap(self, stage: str):
        now, cpu = time.perf_counter(), time.process_time()
        self.stages[stage] = {"minutes": round((now - self._mark[0]) / 60, 2), "cpu_minutes": round((cpu - self._mark[1]) / 60, 2)}
        self._mark = (now, cpu)

    def total(self) -> dict:
        return {"minutes": round((time.perf_counter() - self.start) / 60, 1),
                "cpu_minutes": round((time.process_time() - self.cpu) / 60, 1), "stages": self.stages}


def train_miniature(out: str | Path, config: TrainConfig = TrainConfig(), spec: TinySpec = MINI_SPEC, progress: bool = True) -> Path:
    """Train the whole miniature model and write it (diffusers layout) to ``out``, atomically."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it first")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    clock = Clock()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe = build_tiny_pipeline(spec, staging)
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            module.requires_grad_(False)
        images, captions = render_pool(config.pool, config.seed, config.captions)
        clock.lap("render")
        log = LossLog(staging / "training_log.csv")
        train_vae(pipe.vae, images, config, log, progress)
        clock.lap("vae")
        latents = encode_pool(pipe.vae, images)
        shift, std = float(latents.mean()), float(latents.std())
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
        texts = sorted({t for caps in captions for t in caps} | {""})
        row = {t: i for i, t in enumerate(texts)}
        caption_ids = torch.tensor([[row[t] for t in caps] for caps in captions])
        banks = [encode_bank(pipe, texts, mode, spec.max_tokens) for mode in (TextMode.COMFY, TextMode.DIFFUSERS)]
        clock.lap("encode")
        train_transformer(pipe.transformer, (latents - shift) / std, caption_ids, banks, row[""], config, log, progress)
        clock.lap("mmdit")
        log.close()
        del banks
        pipe.save_pretrained(staging, safe_serialization=True)
        recipe = {
            "name": "mini-sd3-shapes",
            "description": "miniature SD3 trained on the sd3fp8 shape world (python -m sd3fp8.miniature.training)",
            "defaults": {"steps": config.steps, "cfg": config.cfg, "width": IMAGE_SIZE, "height": IMAGE_SIZE,
                         "max_sequence_length": spec.max_tokens},
            "world": WORLD,
            "captions": CAPTIONS,
            "text_modes": [TextMode.COMFY.value, TextMode.DIFFUSERS.value],
            "training": {**dataclasses.asdict(config), "distinct_captions": len(texts), **clock.total(),
                         "torch": torch.__version__},
        }
        (staging / "sd3fp8.json").write_text(json.dumps(recipe, indent=2) + "\n")
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the miniature SD3 on the shape world.")
    parser.add_argument("--out", type=Path, required=True)
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    from sd3fp8._env import quiet_libraries

    quiet_libraries()
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    path = train_miniature(args.out, config)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
