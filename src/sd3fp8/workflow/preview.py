"""Sampler previews: ComfyUI's Latent2RGB for SD3 (a 16 -> 3 linear map of the denoised latent)."""

from __future__ import annotations

import torch
from PIL import Image

# comfy/latent_formats.py SD3 (v0.8.0): latent_rgb_factors [16, 3] and latent_rgb_factors_bias [3].
SD3_RGB_FACTORS = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
)
SD3_RGB_BIAS = (0.2394, 0.2135, 0.1925)
_FACTORS = torch.tensor(SD3_RGB_FACTORS, dtype=torch.float32)  # [16, 3], built once: previews run every step
_BIAS = torch.tensor(SD3_RGB_BIAS, dtype=torch.float32)


def latent_to_rgb(x0: torch.Tensor) -> Image.Image | None:
    """The first image of ``x0`` [B, 16, h, w] (model latent space) as an RGB preview h x w, or
    None for a latent that is not SD3-shaped."""
    if x0.ndim != 4 or x0.shape[1] != len(SD3_RGB_FACTORS):
        return None
    latent = x0[0].detach().to("cpu", torch.float32).movedim(0, -1)  # [h, w, 16]
    rgb = latent @ _FACTORS + _BIAS  # [h, w, 3]
    pixels = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB")
