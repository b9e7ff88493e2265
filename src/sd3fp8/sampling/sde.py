"""DPM-Solver++ SDE samplers driven by a Brownian tree (ComfyUI v0.8.0 k_diffusion/sampling.py).

For flow models they work in the half-log-SNR lambda = log((1 - sigma) / sigma), and a first sigma
of 1 (lambda = -inf) is moved to percent_to_sigma(1e-4) (`offset_first_sigma_for_snr`). The tree is
built from the schedule before that offset, as ComfyUI does. Same signature as `ode`.
"""

from __future__ import annotations

import torch

from sd3fp8.sampling.model_sampling import FlowSampling
from sd3fp8.sampling.noise import NoiseSource
from sd3fp8.sampling.ode import Denoiser, report, steps

ETA = 1.0
S_NOISE = 1.0


def half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) = -logit(sigma) for flow models (alpha = 1 - sigma)."""
    return sigma.logit().neg()


def offset_first_sigma(sigmas: torch.Tensor, sampling: FlowSampling) -> torch.Tensor:
    """A copy of `sigmas` whose first entry, if >= 1, is percent_to_sigma(1e-4) (finite lambda)."""
    if len(sigmas) > 1 and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = sampling.percent_to_sigma(1e-4)
    return sigmas


def _ancestral_step(sigma_from, sigma_to):
    # k-diffusion's get_ancestral_step with eta = 1, on the VE-equivalent sigmas exp(-lambda)
    sigma_up = min(sigma_to, ETA * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _dpmpp_sde(model, x, sigmas, sampling, draw, callback, disable, r=0.5):
    s_in = x.new_ones([x.shape[0]])
    sigmas = offset_first_sigma(sigmas, sampling)
    for i in steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in)
        report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = lambda_s_1.neg().sigmoid()
        alpha_s = sigmas[i] * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        # step 1: to the intermediate lambda_s_1, with its share of noise
        sd, su = _ancestral_step(lambda_s.neg().exp(), lambda_s_1.neg().exp())
        h_ = sd.log().neg() - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        x_2 = x_2 + alpha_s_1 * draw(sigmas[i], sigma_s_1) * S_NOISE * su
        denoised_2 = model(x_2, sigma_s_1 * s_in)
        # step 2: the full step with the averaged denoised
        sd, su = _ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp())
        h_ = sd.log().neg() - lambda_s
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        x = x + alpha_t * draw(sigmas[i], sigmas[i + 1]) * S_NOISE * su
    return x


def dpmpp_sde(model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None):
    """DPM-Solver++ (stochastic, singlestep, r = 1/2) (Lu et al. 2022, arXiv:2211.01095)."""
    if len(sigmas) <= 1:
        return x
    return _dpmpp_sde(model, x, sigmas, sampling, noise.brownian(x, sigmas), callback, disable)


def dpmpp_sde_gpu(
    model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None
):
    """dpmpp_sde with the Brownian tree on x's device (another noise stream on CUDA; the same on the CPU)."""
    if len(sigmas) <= 1:
        return x
    return _dpmpp_sde(model, x, sigmas, sampling, noise.brownian(x, sigmas, cpu=False), callback, disable)


def _multistep_sde(model, x, sigmas, sampling, draw, callback, disable, order: int, solver: str = "midpoint"):
    """DPM-Solver++(2M) SDE (order 2, midpoint or heun correction) and (3M) SDE (order 3)."""
    s_in = x.new_ones([x.shape[0]])
    sigmas = offset_first_sigma(sigmas, sampling)
    denoised_1 = denoised_2 = h = h_1 = h_2 = None
    for i in steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in)
        report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (ETA + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * ETA).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            x = _multistep_correction(x, denoised, denoised_1, denoised_2, h, h_1, h_2, h_eta, alpha_t, order, solver)
            x = x + draw(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * ETA).expm1().neg().sqrt() * S_NOISE
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _multistep_correction(x, denoised, denoised_1, denoised_2, h, h_1, h_2, h_eta, alpha_t, order, solver):
    if order == 2:
        if denoised_1 is None:
            return x
        r = h_1 / h
        if solver == "heun":
            return x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - denoised_1)
        return x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - denoised_1)
    phi_2 = h_eta.neg().expm1() / h_eta + 1
    if h_2 is not None:  # third order from the two previous denoised
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (denoised - denoised_1) / r0
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        return x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
    if h_1 is not None:
        return x + (alpha_t * phi_2) * ((denoised - denoised_1) / (h_1 / h))
    return x


def _sampler(name: str, order: int, solver: str, cpu: bool, doc: str):
    def fn(model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None):
        if len(sigmas) <= 1:
            return x
        draw = noise.brownian(x, sigmas, cpu=cpu)
        return _multistep_sde(model, x, sigmas, sampling, draw, callback, disable, order, solver)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


_GPU = "with the Brownian tree on x's device (another noise stream on CUDA; the same on the CPU)"
dpmpp_2m_sde = _sampler("dpmpp_2m_sde", 2, "midpoint", True, "DPM-Solver++(2M) SDE, midpoint correction.")
dpmpp_2m_sde_gpu = _sampler("dpmpp_2m_sde_gpu", 2, "midpoint", False, f"dpmpp_2m_sde {_GPU}.")
dpmpp_2m_sde_heun = _sampler("dpmpp_2m_sde_heun", 2, "heun", True, "DPM-Solver++(2M) SDE, Heun correction.")
dpmpp_2m_sde_heun_gpu = _sampler("dpmpp_2m_sde_heun_gpu", 2, "heun", False, f"dpmpp_2m_sde_heun {_GPU}.")
dpmpp_3m_sde = _sampler("dpmpp_3m_sde", 3, "midpoint", True, "DPM-Solver++(3M) SDE.")
dpmpp_3m_sde_gpu = _sampler("dpmpp_3m_sde_gpu", 3, "midpoint", False, f"dpmpp_3m_sde {_GPU}.")
