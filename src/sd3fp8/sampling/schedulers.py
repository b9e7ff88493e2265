"""ComfyUI's nine sigma schedules and KSampler's step quirks, float32 like ComfyUI v0.8.0.

Each scheduler is `fn(sampling, steps) -> float32 tensor` of sigmas ending in 0 (comfy/samplers.py,
comfy/k_diffusion/sampling.py). `sigmas_for` adds what the KSampler node does around them.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch

from sd3fp8.errors import ConfigError
from sd3fp8.sampling.model_sampling import FlowSampling


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def simple(sampling: FlowSampling, steps: int) -> torch.Tensor:
    """Every (1000/steps)-th entry of the sigma table, from the top."""
    table = sampling.sigmas
    stride = len(table) / steps
    sigs = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.FloatTensor(sigs + [0.0])


def ddim_uniform(sampling: FlowSampling, steps: int) -> torch.Tensor:
    """Table entries 1, 1+k, 1+2k, ... (k = 1000 // steps), reversed; may yield more than `steps`
    steps (28 -> 29) and never starts at sigma_max (ComfyUI's quirks, kept)."""
    table = sampling.sigmas
    sigs = [0.0]
    if math.isclose(float(table[1]), 0, abs_tol=1e-5):  # tables that start at 0 (not flow): no extra 0
        steps, sigs = steps + 1, []
    stride = max(len(table) // steps, 1)
    sigs += [float(table[i]) for i in range(1, len(table), stride)]
    return torch.FloatTensor(sigs[::-1])


def _normal(sampling: FlowSampling, steps: int, sgm: bool) -> torch.Tensor:
    start = sampling.timestep(sampling.sigma_max)  # float32 tensors: the linspace ends round as ComfyUI's
    end = sampling.timestep(sampling.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(sampling.sigma(end)), 0, abs_tol=1e-5):
            steps, append_zero = steps + 1, False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(sampling.sigma(t)) for t in timesteps]
    return torch.FloatTensor(sigs + [0.0] if append_zero else sigs)


def normal(sampling: FlowSampling, steps: int) -> torch.Tensor:
    """Timesteps uniform from sigma_max to sigma_min (diffusers' FlowMatchEuler default)."""
    return _normal(sampling, steps, sgm=False)


def sgm_uniform(sampling: FlowSampling, steps: int) -> torch.Tensor:
    """Timesteps uniform over steps+1 points, the last (sigma_min) dropped."""
    return _normal(sampling, steps, sgm=True)


def beta(sampling: FlowSampling, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Table indices at Beta(0.6, 0.6) quantiles (Lee et al. 2024, arXiv:2407.12173), repeats dropped."""
    table = sampling.sigmas
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta_) * (len(table) - 1))
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(float(table[int(t)]))
        last = t
    return torch.FloatTensor(sigs + [0.0])


def karras(sampling: FlowSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: uniform in sigma^(1/rho)."""
    sigma_min, sigma_max = float(sampling.sigma_min), float(sampling.sigma_max)
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(sampling: FlowSampling, steps: int) -> torch.Tensor:
    """Uniform in log sigma."""
    sigma_min, sigma_max = float(sampling.sigma_min), float(sampling.sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def linear_quadratic(sampling: FlowSampling, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
    """Mochi's schedule: linear to `threshold_noise` over half the steps, then quadratic (Python floats)."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quad_coef = step_diff / (linear_steps * quadratic_steps**2)
        lin_coef = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps**2)
        const = quad_coef * (linear_steps**2)
        quadratic = [quad_coef * (i**2) + lin_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - s for s in linear + quadratic + [1.0]]
    return torch.FloatTensor(schedule) * sampling.sigma_max


def kl_optimal(sampling: FlowSampling, steps: int) -> torch.Tensor:
    """Uniform in arctan(sigma) (AUTOMATIC1111 PR 15608). One step gives [sigma_max, 0]
    (ComfyUI divides 0 by 0 there and returns NaN)."""
    sigma_min, sigma_max = float(sampling.sigma_min), float(sampling.sigma_max)
    adj = torch.arange(steps, dtype=torch.float).div_(max(steps - 1, 1))
    sigmas = adj.new_zeros(steps + 1)
    sigmas[:-1] = (adj * math.atan(sigma_min) + (1 - adj) * math.atan(sigma_max)).tan_()
    return sigmas


# ComfyUI's order (comfy/samplers.py SCHEDULER_HANDLERS): clients list them in this order
SCHEDULERS = {
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "karras": karras,
    "exponential": exponential,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "normal": normal,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
}
SCHEDULER_NAMES = list(SCHEDULERS)

# KSampler computes steps+1 sigmas for these and drops the penultimate one (their last step is a
# plain Euler step to 0, so the second-to-last sigma would be wasted).
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def _schedule(sampling: FlowSampling, scheduler: str, steps: int, sampler: str | None) -> torch.Tensor:
    discard_penultimate = sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = SCHEDULERS[scheduler](sampling, steps + 1 if discard_penultimate else steps)
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def sigmas_for(
    sampling: FlowSampling, scheduler: str, steps: int, denoise: float = 1.0, sampler: str | None = None
) -> torch.Tensor:
    """The sigmas ComfyUI's KSampler samples with: the schedule, the penultimate sigma dropped for
    `DISCARD_PENULTIMATE_SIGMA_SAMPLERS`, and for img2img (`denoise` < 1) the last steps+1 sigmas of a
    schedule int(steps / denoise) long. denoise <= 0 gives no sigmas (nothing to sample)."""
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    steps = _check_steps(steps)
    if denoise is None or denoise > 0.9999:
        return _schedule(sampling, scheduler, steps, sampler)
    if not math.isfinite(denoise):
        raise ConfigError(f"denoise must be a number in [0, 1], got {denoise!r}")
    if denoise <= 0.0:
        return torch.FloatTensor([])
    return _schedule(sampling, scheduler, int(steps / denoise), sampler)[-(steps + 1) :]
