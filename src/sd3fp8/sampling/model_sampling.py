"""SD3's flow-matching model sampling (ComfyUI's ModelSamplingDiscreteFlow + CONST) and latent format.

Every number here is float32 torch arithmetic in the same order as ComfyUI v0.8.0
(comfy/model_sampling.py, comfy/latent_formats.py), so sigma tables and schedules match bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sd3fp8.errors import ConfigError


def time_snr_shift(shift: float, t):
    """The SD3 time shift s*t / (1 + (s-1)*t) (Esser et al. 2024, eq. 23); identity for s = 1."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def _reshape_sigma(sigma: torch.Tensor | float, ndim: int):
    # one sigma broadcasts as a scalar; a per-sample [B] sigma becomes [B, 1, 1, 1]
    if not isinstance(sigma, torch.Tensor) or sigma.numel() == 1:
        return sigma.reshape(()) if isinstance(sigma, torch.Tensor) else sigma
    return sigma.reshape(sigma.shape[:1] + (1,) * (ndim - 1))


@dataclass(frozen=True)
class FlowSampling:
    """Flow-matching sigma <-> timestep map with a 1000-entry float32 sigma table.

    `shift` is ComfyUI's ModelSamplingSD3 shift (SD3/SD3.5 checkpoints default to 3.0);
    `multiplier` turns sigma in [0, 1] into the transformer's timestep in [0, 1000].
    """

    shift: float = 3.0
    multiplier: float = 1000.0
    timesteps: int = 1000
    _table: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ConfigError(f"shift must be a finite number > 0, got {self.shift!r}")
        if not (isinstance(self.multiplier, (int, float)) and math.isfinite(self.multiplier) and self.multiplier > 0):
            raise ConfigError(f"multiplier must be a finite number > 0, got {self.multiplier!r}")
        if not (isinstance(self.timesteps, int) and self.timesteps >= 2):
            raise ConfigError(f"timesteps must be an int >= 2, got {self.timesteps!r}")
        # int arange / int -> float32, as ComfyUI builds it (a float64 table would round differently)
        t = (torch.arange(1, self.timesteps + 1, 1) / self.timesteps) * self.multiplier
        object.__setattr__(self, "_table", self.sigma(t))

    @property
    def sigmas(self) -> torch.Tensor:
        """The float32 sigma table, ascending: sigmas[0] = sigma_min, sigmas[-1] = sigma_max (read-only)."""
        return self._table

    @property
    def sigma_min(self) -> torch.Tensor:
        return self._table[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self._table[-1]

    def timestep(self, sigma):
        """Transformer timestep for a sigma: sigma * multiplier (float32 for tensors)."""
        return sigma * self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the schedule (0 = start, sigma 1; 1 = end, sigma 0), a Python float."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return time_snr_shift(self.shift, 1.0 - percent)

    def denoised(self, x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
        """D = x - v * sigma in float32 (CONST.calculate_denoised on model_output.float())."""
        return x - v.float() * _reshape_sigma(sigma, v.ndim)

    def noise_scaling(self, sigma, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Start of sampling: x = sigma * noise + (1 - sigma) * latent."""
        sigma = _reshape_sigma(sigma, noise.ndim)
        return sigma * noise + (1.0 - sigma) * latent

    def inverse_noise_scaling(self, sigma, latent: torch.Tensor) -> torch.Tensor:
        """End of sampling: latent / (1 - sigma_last); identity when the schedule ends at 0."""
        return latent / (1.0 - _reshape_sigma(sigma, latent.ndim))


@dataclass(frozen=True)
class LatentFormat:
    """Affine map between the VAE's latent and the transformer's latent space."""

    scale_factor: float
    shift_factor: float

    def process_in(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scale_factor

    def process_out(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale_factor + self.shift_factor


# comfy/latent_formats.py SD3 (also the SD3.5 VAE config's scaling_factor / shift_factor)
SD3_LATENT = LatentFormat(scale_factor=1.5305, shift_factor=0.0609)


def process_in(z: torch.Tensor) -> torch.Tensor:
    """VAE latent -> model latent: (z - 0.0609) * 1.5305."""
    return SD3_LATENT.process_in(z)


def process_out(z: torch.Tensor) -> torch.Tensor:
    """Model latent -> VAE latent: z / 1.5305 + 0.0609."""
    return SD3_LATENT.process_out(z)
