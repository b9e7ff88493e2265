"""Samplers that add fresh Gaussian noise every step (ComfyUI's default_noise_sampler).

For flow (CONST) models ComfyUI dispatches the ancestral samplers to their rectified-flow variants
(`sample_*_RF`): step down to sigma_down, rescale by alpha_next / alpha_down, renoise to sigma_next.
Same signature as the ODE samplers (see `ode`).
"""

from __future__ import annotations

from sd3fp8.sampling.model_sampling import FlowSampling
from sd3fp8.sampling.noise import NoiseSource
from sd3fp8.sampling.ode import Denoiser, report, steps, to_d

ETA = 1.0  # ComfyUI's KSampler default; 0 would make these deterministic


def _rf_ancestral_step(sigma, sigma_next):
    """(sigma_down, alpha_next / alpha_down, renoise scale) of a rectified-flow ancestral step."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * ETA)
    alpha_ip1, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next**2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
    return sigma_down, alpha_ip1 / alpha_down, renoise


def euler_ancestral(
    model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None
):
    """Euler ancestral, rectified-flow form (ComfyUI sample_euler_ancestral_RF, eta = 1)."""
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in)
        report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        sigma_down, rescale, renoise = _rf_ancestral_step(sigmas[i], sigmas[i + 1])
        ratio = sigma_down / sigmas[i]
        x = ratio * x + (1 - ratio) * denoised
        x = rescale * x + draw(sigmas[i], sigmas[i + 1]) * 1.0 * renoise  # * s_noise, as ComfyUI
    return x


def dpm_2_ancestral(
    model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None
):
    """DPM-Solver-2 ancestral, rectified-flow form (ComfyUI sample_dpm_2_ancestral_RF, eta = 1)."""
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, rescale, renoise = _rf_ancestral_step(sigmas[i], sigmas[i + 1])
        report(callback, i, x, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
            continue
        sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in))
        x = x + d_2 * (sigma_down - sigmas[i])
        x = rescale * x + draw(sigmas[i], sigmas[i + 1]) * 1.0 * renoise
    return x


def lcm(model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None):
    """Latent-consistency sampling (Luo et al. 2023): jump to D, renoise to the next sigma."""
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in)
        report(callback, i, x, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = sampling.noise_scaling(sigmas[i + 1], draw(sigmas[i], sigmas[i + 1]), x)
    return x
