"""The denoising loop's parts, k-diffusion style: a model wrapper ``model(x, sigma) -> denoised``
(the transformer's velocity turned into a denoised latent, with classifier-free guidance), a sigma
schedule, and sampler functions with one signature ``sampler(model, x, sigmas, callback=None)``.

The latent state stays float32 throughout; only the transformer's input is cast to the compute
dtype (diffusers re-rounds the state to the model dtype after every step, ComfyUI does not).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B,C,H,W] f32, sigma []) -> denoised f32


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Encoded prompts: joint context [B, T, 4096] and pooled [B, 2048] for the positive prompts and,
    with guidance, the same for the negative ones."""

    context: torch.Tensor
    pooled: torch.Tensor
    negative_context: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    @property
    def guided(self) -> bool:
        return self.negative_context is not None


def flow_denoiser(transformer, conditioning: Conditioning, cfg: float, compute_dtype: torch.dtype,
                  timestep_scale: float = 1000.0) -> Model:
    """``model(x, sigma) -> D`` for a rectified-flow transformer predicting velocity v:
    D = x - v * sigma (float32), v = v_u + cfg * (v_c - v_u) when guided (one batched forward)."""
    if conditioning.guided:
        context = torch.cat([conditioning.negative_context, conditioning.context])
        pooled = torch.cat([conditioning.negative_pooled, conditioning.pooled])
    else:
        context, pooled = conditioning.context, conditioning.pooled

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x, x]) if conditioning.guided else x
        timestep = (sigma * timestep_scale).to(torch.float32).expand(x_in.shape[0])
        v = transformer(hidden_states=x_in.to(compute_dtype), timestep=timestep, encoder_hidden_states=context,
                        pooled_projections=pooled, return_dict=False)[0].float()
        if conditioning.guided:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
        return x - v * sigma

    return model


def diffusers_sigmas(scheduler, steps: int) -> torch.Tensor:
    """The sigma schedule diffusers' scheduler gives for ``steps`` (with the trailing 0), float32.
    For FlowMatchEulerDiscreteScheduler this equals ComfyUI's ``normal`` schedule."""
    scheduler.set_timesteps(steps, device="cpu")
    return scheduler.sigmas.to(torch.float32).cpu()


@torch.no_grad()
def euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE: d = (x - D) / sigma, x += d * (sigma_next - sigma)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


SAMPLERS = {"euler": euler}
