"""Train the miniature SD3 on the shape world, from scratch and deterministically.

    python -m sd3fp8.miniature.training --out src/sd3fp8/assets/mini-sd3

Stage 1 trains the AutoencoderKL (16 latent channels, 8x downsampling) on world images and sets
SD3-style ``shift_factor``/``scaling_factor`` from its latent statistics. Stage 2 trains the
SD3Transformer2DModel with SD3's rectified-flow objective (x_t = (1 - t) x0 + t noise, target
noise - x0, logit-normal t) and caption dropout for classifier-free guidance. The text encoders
stay randomly initialised and frozen: their embeddings are deterministic functions of the words.
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

from sd3fp8.miniature.tiny import TinySpec, build_tiny_pipeline
from sd3fp8.miniature.world import IMAGE_SIZE, WORLD_WORDS, sample

MINI_SPEC = TinySpec(
    hidden=128, heads=4, layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm",
    sample_size=IMAGE_SIZE // 8, pos_embed_max_size=IMAGE_SIZE // 8,
    clip_hidden=32, clip_layers=2, t5_dim=64, t5_layers=2, vae_channels=(16, 32, 32, 32),
    words=WORLD_WORDS, max_tokens=24, scheduler_shift=1.0, seed=0,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    pool: int = 16000  # world images rendered once and reused
    vae_steps: int = 900
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    dit_steps: int = 3000
    dit_batch: int = 64
    dit_lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    threads: int = 2
    # generation defaults written into the model's sd3fp8.json
    steps: int = 20
    cfg: float = 3.0


class LossLog:
    """Appends (stage, step, loss, lr, seconds) rows to a CSV file."""

    def __init__(self, path: Path):
        self.file = open(path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["stage", "step", "loss", "lr", "seconds"])
        self.start = time.perf_counter()

    def write(self, stage: str, step: int, loss: float, lr: float):
        self.writer.writerow([stage, step, f"{loss:.6f}", f"{lr:.6g}", f"{time.perf_counter() - self.start:.1f}"])

    def close(self):
        self.file.close()


def render_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` training images as a uint8 [n, 3, 64, 64] tensor, with their captions."""
    images, captions = [], []
    for i in range(n):
        img, caption = sample(i, seed)
        images.append(torch.from_numpy(img.copy()).permute(2, 0, 1))
        captions.append(caption)
    return torch.stack(images), captions


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


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_sequence_length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Prompt embeddings exactly as the pipeline makes them, once per distinct caption."""
    out = {}
    for caption in sorted(set(captions)):
        embeds, _, pooled, _ = pipe.encode_prompt(
            caption, None, None, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        out[caption] = (embeds[0], pooled[0])
    return out


def train_transformer(transformer, latents: torch.Tensor, captions: list[str], embeds: dict, config: TrainConfig, log: LossLog, progress: bool):
    """Rectified flow (SD3): predict noise - x0 from x_t = (1 - t) x0 + t noise, t ~ logit-normal."""
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=config.dit_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed + 2)
    empty_embed, empty_pooled = embeds[""]
    bar = tqdm(range(config.dit_steps), desc="MMDiT", disable=not progress)
    for step in bar:
        lr = lr_at(step, config.dit_steps, config.dit_lr, config.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        index = torch.randint(len(latents), (config.dit_batch,), generator=gen)
        drop = torch.rand(config.dit_batch, generator=gen) < config.caption_dropout
        prompt = torch.stack([empty_embed if d else embeds[captions[i]][0] for i, d in zip(index.tolist(), drop.tolist())])
        pooled = torch.stack([empty_pooled if d else embeds[captions[i]][1] for i, d in zip(index.tolist(), drop.tolist())])
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
        log.write("mmdit", step, loss.item(), lr)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    transformer.eval()


def train_miniature(out: str | Path, config: TrainConfig = TrainConfig(), spec: TinySpec = MINI_SPEC, progress: bool = True) -> Path:
    """Train the whole miniature model and write it (diffusers layout) to ``out``, atomically."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it first")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe = build_tiny_pipeline(spec, staging)
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            module.requires_grad_(False)
        images, captions = render_pool(config.pool, config.seed)
        log = LossLog(staging / "training_log.csv")
        train_vae(pipe.vae, images, config, log, progress)
        latents = encode_pool(pipe.vae, images)
        shift, std = float(latents.mean()), float(latents.std())
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
        embeds = encode_captions(pipe, captions + [""], spec.max_tokens)
        train_transformer(pipe.transformer, (latents - shift) / std, captions, embeds, config, log, progress)
        log.close()
        pipe.save_pretrained(staging, safe_serialization=True)
        recipe = {
            "name": "mini-sd3-shapes",
            "description": "miniature SD3 trained on the sd3fp8 shape world (python -m sd3fp8.miniature.training)",
            "defaults": {"steps": config.steps, "cfg": config.cfg, "width": IMAGE_SIZE, "height": IMAGE_SIZE,
                         "max_sequence_length": spec.max_tokens},
            "world": "shapes-v1",
            "training": {**dataclasses.asdict(config), "minutes": round((time.perf_counter() - start) / 60, 1),
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
