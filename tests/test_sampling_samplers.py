"""Samplers on Gaussian data, where the flow's denoiser and ODE solution are closed-form.

Data x0 ~ N(MU, S^2) per element; x_sigma = (1 - sigma) x0 + sigma eps has the exact denoiser
D(x, sigma) = MU + (1 - sigma) S^2 / var(sigma) * (x - (1 - sigma) MU), var = (1 - sigma)^2 S^2 + sigma^2,
and the probability-flow ODE carries eps at sigma 1 to (1 - sigma) MU + sqrt(var(sigma)) eps.
"""

import math

import pytest
import torch

from sd3fp8.errors import ConfigError
from sd3fp8.sampling import SAMPLER_NAMES, SAMPLERS, FlowSampling, NoiseSource, sampler_fn, sigmas_for

MU, S = 0.5, 0.4
SD3 = FlowSampling(shift=3.0)
ODE_ORDERS = {"euler": 1, "ddim": 1, "heun": 2, "dpm_2": 2, "dpmpp_2m": 2, "uni_pc": 2, "uni_pc_bh2": 2}
STOCHASTIC = [n for n in SAMPLER_NAMES if n not in ODE_ORDERS and n != "lcm"]


def gaussian_denoiser(x, sigma):
    s = sigma.view(-1, *([1] * (x.ndim - 1)))
    var = (1 - s) ** 2 * S**2 + s**2
    return MU + (1 - s) * S**2 / var * (x - (1 - s) * MU)


def run(name, x, sigmas, seed=0, **kw):
    return SAMPLERS[name](gaussian_denoiser, x, sigmas, sampling=SD3, noise=NoiseSource(seed), disable=True, **kw)


def shifted_schedule(steps, t_end=0.05):
    """Uniform t from 1 to t_end, shifted by 3: smooth in sigma and in log sigma, ending above 0 so
    the exact ODE solution is the reference (a jump to 0 would be a denoiser step, not the ODE)."""
    t = torch.linspace(1, t_end, steps + 1, dtype=torch.float64)
    return (3 * t / (1 + 2 * t)).float()


def test_registry_lists_comfyui_names_in_order():
    assert SAMPLER_NAMES[:3] == ["euler", "euler_ancestral", "heun"]
    assert SAMPLER_NAMES[-3:] == ["ddim", "uni_pc", "uni_pc_bh2"]
    for name in ("dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_sde", "lcm"):
        assert sampler_fn(name) is SAMPLERS[name]
    with pytest.raises(ConfigError, match="'lms' is a ComfyUI sampler sd3fp8 does not implement.*euler"):
        sampler_fn("lms")
    with pytest.raises(ConfigError, match="'eulr' is unknown"):
        sampler_fn("eulr")


@pytest.mark.parametrize("name", ODE_ORDERS)
def test_ode_sampler_converges_at_its_order(name):
    eps = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma_end = float(shifted_schedule(4)[-1])
    exact = (1 - sigma_end) * MU + math.sqrt((1 - sigma_end) ** 2 * S**2 + sigma_end**2) * eps
    errors = [(run(name, eps, shifted_schedule(n)) - exact).abs().max().item() for n in (32, 64, 128)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    expected = ODE_ORDERS[name]
    assert all(expected - 0.25 < o < expected + 0.6 for o in orders), (errors, orders)


def test_ode_samplers_reach_the_data_with_sigma_zero():
    # the last step (sigma 0.14 -> 0 in `simple`) is one jump to D, so this is only a sanity bound
    eps = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for name in ODE_ORDERS:
        x = run(name, eps, sigmas_for(SD3, "simple", 40, sampler=name))
        assert (x - (MU + S * eps)).abs().max().item() < 0.15, name


@pytest.mark.parametrize("name", [n for n in STOCHASTIC if not n.endswith("_gpu")])  # _gpu: equal on the CPU
def test_sde_sampler_samples_the_data_distribution(name):
    steps = 120 if name == "euler_ancestral" else 60  # first weak order with a large constant
    eps = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    x = run(name, eps, sigmas_for(SD3, "simple", steps), seed=1)
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() / S - 1) < 0.1


def test_lcm_keeps_the_mean_and_shrinks_the_spread():
    # LCM assumes a consistency model; with a plain denoiser it under-disperses, as in ComfyUI
    eps = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    x = run("lcm", eps, sigmas_for(SD3, "simple", 20), seed=1)
    assert abs(x.mean().item() - MU) < 0.02 and 0.5 * S < x.std().item() < S


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_deterministic_given_the_seed_and_float32(name):
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigmas = sigmas_for(SD3, "simple", 8, sampler=name)
    a, b = run(name, eps, sigmas, seed=5), run(name, eps, sigmas, seed=5)
    assert a.dtype == torch.float32 and torch.isfinite(a).all() and torch.equal(a, b)
    if name in STOCHASTIC or name == "lcm":
        assert not torch.equal(a, run(name, eps, sigmas, seed=6))


def test_gpu_variants_equal_cpu_variants_on_the_cpu():
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigmas = sigmas_for(SD3, "sgm_uniform", 10)
    for name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        assert torch.equal(run(name, eps, sigmas, seed=9), run(name + "_gpu", eps, sigmas, seed=9)), name


def test_callback_reports_every_step():
    eps = torch.randn(1, 4, 8, 8)
    sigmas = sigmas_for(SD3, "normal", 5)
    for name in ("euler", "dpmpp_2m_sde", "uni_pc"):
        seen = []
        run(name, eps, sigmas, callback=seen.append)
        assert [s["i"] for s in seen] == list(range(5)), name
        assert set(seen[0]) == {"i", "x", "sigma", "sigma_hat", "denoised"}


def test_one_euler_step_is_comfyuis_arithmetic():
    """x1 = x + ((x - D) / sigma0) * (sigma1 - sigma0), D = x - v * sigma0, in float32 in this order."""
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    v = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    sigmas = sigmas_for(SD3, "simple", 20)[:2]
    x1 = SAMPLERS["euler"](
        lambda x_, s: SD3.denoised(x_, v, s), x, sigmas, sampling=SD3, noise=NoiseSource(0), disable=True
    )
    denoised = x - v * sigmas[0]
    assert torch.equal(x1, x + (x - denoised) / sigmas[0] * (sigmas[1] - sigmas[0]))
    assert torch.allclose(x1, x + v * (sigmas[1] - sigmas[0]), atol=1e-6)  # the diffusers step, up to rounding


def test_sde_samplers_start_below_sigma_one():
    """The first sigma 1 is moved to percent_to_sigma(1e-4) for the half-log-SNR (ComfyUI's offset)."""
    seen = []
    eps = torch.randn(1, 4, 8, 8)
    run("dpmpp_2m_sde", eps, sigmas_for(SD3, "simple", 4), callback=seen.append)
    assert seen[0]["sigma"].item() == pytest.approx(SD3.percent_to_sigma(1e-4), abs=1e-7)
    assert SD3.percent_to_sigma(1e-4) < 1.0
