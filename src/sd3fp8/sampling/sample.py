"""One sampling run the way ComfyUI's KSampler does it (comfy/samplers.py CFGGuider/KSAMPLER, v0.8.0).

latent in (only if non-zero) -> x = sigma0 * noise + (1 - sigma0) * latent -> sampler ->
x / (1 - sigma_last) -> latent out. All float32; the caller VAE-decodes the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sd3fp8.errors import ConfigError
from sd3fp8.sampling.model_sampling import SD3_LATENT, FlowSampling, LatentFormat
from sd3fp8.sampling.noise import NoiseSource
from sd3fp8.sampling.samplers import sampler_fn
from sd3fp8.sampling.unipc import LAST_SIGMA

# ComfyUI's uni_pc writes 0.001 over the caller's last sigma 0 (it edits a view, not a copy), so
# KSampler's inverse noise scaling divides by 1 - 0.001. Kept: for flow models it maps the state at
# sigma 0.001 to the clean-latent scale.
_LAST_SIGMA_OVERRIDES = {"uni_pc": LAST_SIGMA, "uni_pc_bh2": LAST_SIGMA}


def fix_empty_latent_channels(latent: torch.Tensor, channels: int = 16) -> torch.Tensor:
    """ComfyUI widens an all-zero latent with the wrong channel count (EmptyLatentImage's 4) to 16."""
    if latent.shape[1] != channels and torch.count_nonzero(latent) == 0:
        return latent.new_zeros((latent.shape[0], channels) + tuple(latent.shape[2:]))
    return latent


def sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sampling: FlowSampling,
    *,
    noise: torch.Tensor,
    latent: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str,
    seed: int,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    latent_format: LatentFormat = SD3_LATENT,
) -> torch.Tensor:
    """Sample from `noise` [B, 16, h, w] (see `noise.initial_noise`) and the VAE latent `latent`
    (zeros for txt2img) along `sigmas` (see `schedulers.sigmas_for`) with the ComfyUI sampler named
    `sampler`; `model(x, sigma[B]) -> D` is the guided denoiser (see `guidance.cfg_denoiser`).
    `seed` seeds the samplers' own noise as ComfyUI does; `latent_format` is the VAE's scale and
    shift (SD3's by default). Returns the VAE latent, float32."""
    fn = sampler_fn(sampler)
    if noise.shape != latent.shape:
        raise ConfigError(f"noise {list(noise.shape)} and latent {list(latent.shape)} must have the same shape")
    if len(sigmas) == 0:  # denoise 0: ComfyUI hands the latent back untouched
        return latent
    source = NoiseSource(seed)
    noise = noise.to(torch.float32)
    latent = latent.to(device=noise.device, dtype=torch.float32)
    sigmas = sigmas.to(device=noise.device, dtype=torch.float32)
    if torch.count_nonzero(latent) > 0:  # an empty latent is not shifted (ComfyUI's rule)
        latent = latent_format.process_in(latent)
    x = sampling.noise_scaling(sigmas[0], noise, latent)
    x = fn(model, x, sigmas, sampling=sampling, noise=source, callback=callback, disable=disable)
    last = sigmas[-1]
    if sampler in _LAST_SIGMA_OVERRIDES and last == 0:
        last = torch.tensor(_LAST_SIGMA_OVERRIDES[sampler], dtype=torch.float32, device=sigmas.device)
    return latent_format.process_out(sampling.inverse_noise_scaling(last, x).to(torch.float32))
