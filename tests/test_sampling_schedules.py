"""Model sampling and schedules vs ComfyUI v0.8.0's own numbers (tests/data/comfy_sigmas_noise.json)."""

import json
from pathlib import Path

import pytest
import torch

from sd3fp8.errors import ConfigError
from sd3fp8.sampling import SCHEDULER_NAMES, FlowSampling, process_in, process_out, sigmas_for
from sd3fp8.sampling.schedulers import SCHEDULERS

REFERENCE = json.loads((Path(__file__).parent / "data" / "comfy_sigmas_noise.json").read_text())
SCHEDULE_KEYS = [k for k in REFERENCE if "/" in k]
SD3 = FlowSampling(shift=3.0)


def test_sigma_table_is_comfyuis():
    table = SD3.sigmas
    assert table.dtype == torch.float32 and table.shape == (1000,)
    assert table[:5].tolist() == REFERENCE["sigmas_table_first5"]
    assert table[-3:].tolist() == REFERENCE["sigmas_table_last3"]
    assert float(SD3.sigma_min) == REFERENCE["sigma_min"] and float(SD3.sigma_max) == REFERENCE["sigma_max"]


def test_timestep_sigma_and_percent():
    assert SD3.percent_to_sigma(0.1) == REFERENCE["percent_to_sigma(0.1)"]
    assert SD3.percent_to_sigma(0.0) == 1.0 and SD3.percent_to_sigma(1.0) == 0.0
    sigma = torch.tensor([0.25, 1.0])
    assert torch.equal(SD3.timestep(sigma), sigma * 1000)
    assert torch.allclose(SD3.sigma(SD3.timestep(torch.tensor(0.5))), torch.tensor(0.75))  # shift(0.5) = 0.75
    assert FlowSampling(shift=1.0).sigma(torch.tensor(300.0)) == 0.3  # shift 1 is the identity


def test_denoised_and_noise_scaling():
    x, v = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigma = torch.tensor([0.5, 0.25])
    d = SD3.denoised(x, v.half(), sigma)
    assert d.dtype == torch.float32
    assert torch.equal(d, x - v.half().float() * sigma.view(2, 1, 1, 1))
    noise, latent = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    assert torch.equal(SD3.noise_scaling(torch.tensor(1.0), noise, latent), noise)
    x0 = SD3.noise_scaling(torch.tensor(0.3), noise, latent)
    assert torch.allclose(x0, 0.3 * noise + 0.7 * latent)
    assert torch.equal(SD3.inverse_noise_scaling(torch.tensor(0.0), x0), x0)


def test_latent_format_round_trip():
    z = torch.randn(1, 16, 8, 8)
    assert torch.equal(process_in(z), (z - 0.0609) * 1.5305)
    assert torch.allclose(process_out(process_in(z)), z, atol=1e-6)


@pytest.mark.parametrize("key", SCHEDULE_KEYS)
def test_schedule_equals_comfyui(key):
    name, steps = key.split("/")
    got = SCHEDULERS[name](SD3, int(steps))
    ref = torch.tensor(REFERENCE[key])
    assert got.dtype == torch.float32 and got.shape == ref.shape
    # bit-exact on most CPUs; vectorised tan/exp may differ by 1 ulp between CPU generations
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)


def test_ksampler_quirks():
    dpm2 = sigmas_for(SD3, "simple", 20, sampler="dpm_2")
    assert torch.allclose(
        dpm2, torch.tensor(REFERENCE["KSampler dpm_2 simple steps=20 (discard penultimate)"]), atol=1e-6
    )
    assert dpm2.shape == (21,) and dpm2[:3].tolist() == pytest.approx([1.0, 0.983827, 0.966192], abs=1e-6)
    assert dpm2[-3:].tolist() == pytest.approx([0.333593, 0.241611, 0.0], abs=1e-6)  # serving.md's example
    img2img = sigmas_for(SD3, "simple", 20, denoise=0.6)
    assert torch.allclose(img2img, torch.tensor(REFERENCE["KSampler simple steps=20 denoise=0.6"]), atol=1e-6)
    assert torch.equal(sigmas_for(SD3, "simple", 20, denoise=0.6), SCHEDULERS["simple"](SD3, 33)[-21:])
    assert sigmas_for(SD3, "normal", 20, denoise=0.0).numel() == 0
    assert torch.equal(sigmas_for(SD3, "beta", 20, denoise=0.99995), SCHEDULERS["beta"](SD3, 20))
    assert len(sigmas_for(SD3, "ddim_uniform", 28)) == 30  # ComfyUI's 29 steps for 28


def test_every_scheduler_ends_at_zero_and_descends():
    for name in SCHEDULER_NAMES:
        for steps in (1, 2, 7):
            sigmas = sigmas_for(SD3, name, steps)
            assert sigmas[-1] == 0 and torch.isfinite(sigmas).all(), name
            assert (sigmas[:-1] >= sigmas[1:]).all(), name


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="unknown scheduler 'karas'.*karras"):
        sigmas_for(SD3, "karas", 20)
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="steps"):
            sigmas_for(SD3, "normal", steps)
    with pytest.raises(ConfigError, match="denoise"):
        sigmas_for(SD3, "normal", 20, denoise=float("nan"))
    for shift in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError, match="shift"):
            FlowSampling(shift=shift)


def test_shift_changes_every_schedule():
    for name in SCHEDULER_NAMES:
        if name in ("linear_quadratic",):  # defined on [0, 1] whatever the table
            continue
        assert not torch.equal(sigmas_for(FlowSampling(shift=6.0), name, 20), sigmas_for(SD3, name, 20)), name


@pytest.mark.parametrize("steps", [20, 28, 40])
def test_normal_schedule_equals_diffusers_flow_match_euler(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    assert torch.allclose(sigmas_for(SD3, "normal", steps), scheduler.sigmas.float(), rtol=0, atol=1e-6)
