"""Deterministic ODE samplers (k-diffusion / ComfyUI v0.8.0 comfy/k_diffusion/sampling.py).

Every sampler has one signature: `fn(model, x, sigmas, *, sampling, noise, callback=None,
disable=None) -> x`, where `model(x, sigma[B]) -> denoised` (float32) and the state `x` stays
float32. They solve the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma, which for a
flow model is exactly the velocity field (x - D) / sigma = v. Arithmetic follows ComfyUI's order so
results agree to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import trange

from sd3fp8.sampling.model_sampling import FlowSampling
from sd3fp8.sampling.noise import NoiseSource

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None] | None


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras et al. (2022) ODE derivative dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / sigma


def report(callback: Callback, i: int, x, sigma, denoised, sigma_hat=None) -> None:
    if callback is not None:
        sigma_hat = sigma if sigma_hat is None else sigma_hat
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def steps(sigmas: torch.Tensor, disable: bool | None):
    return trange(len(sigmas) - 1, disable=disable)


def euler(model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None):
    """Euler steps (Karras et al. 2022, Algorithm 2 without churn). ComfyUI's ddim is this too."""
    s_in = x.new_ones([x.shape[0]])
    for i in steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        report(callback, i, x, sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def heun(model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); an Euler step into sigma = 0."""
    s_in = x.new_ones([x.shape[0]])
    for i in steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        report(callback, i, x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * dt
    return x


def dpm_2(model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None):
    """DPM-Solver-2 style midpoint steps, the midpoint geometric in sigma (Lu et al. 2022)."""
    s_in = x.new_ones([x.shape[0]])
    for i in steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def dpmpp_2m(model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), in t = -log sigma even for flow models
    (as ComfyUI does)."""
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in)
        report(callback, i, x, sigmas[i], denoised)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is not None and sigmas[i + 1] != 0:
            r = (t - -sigmas[i - 1].log()) / h  # h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        else:
            denoised_d = denoised  # first step, and the last (into sigma 0): first order
        x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x
