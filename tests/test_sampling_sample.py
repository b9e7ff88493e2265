"""sample(): ComfyUI's KSampler flow around a sampler; aliases for A1111 names."""

import pytest
import torch

from sd3fp8.errors import ConfigError
from sd3fp8.sampling import (
    SAMPLER_NAMES,
    SAMPLERS,
    SCHEDULER_NAMES,
    FlowSampling,
    NoiseSource,
    fix_empty_latent_channels,
    initial_noise,
    parse_sampler,
    parse_sampler_scheduler,
    parse_scheduler,
    process_in,
    process_out,
    sample,
    sigmas_for,
)

SD3 = FlowSampling(shift=3.0)


def constant(value):
    return lambda x, sigma: torch.full_like(x, value)


def test_txt2img_leaves_the_empty_latent_alone():
    noise = initial_noise([1, 16, 8, 8], 42)
    seen = []
    out = sample(
        constant(0.3),
        SD3,
        noise=noise,
        latent=torch.zeros(1, 16, 8, 8),
        sigmas=torch.tensor([1.0, 0.0]),
        sampler="euler",
        seed=42,
        callback=seen.append,
    )
    assert torch.equal(seen[0]["x"], noise)  # sigma0 = 1: x = noise, no process_in of the zero latent
    d = torch.full_like(noise, 0.3)
    assert torch.equal(out, process_out(noise + (noise - d) * -1.0))  # one Euler step to sigma 0
    assert torch.allclose(out, process_out(d), atol=1e-6)


def test_img2img_starts_from_the_processed_latent():
    noise, latent = initial_noise([1, 16, 8, 8], 1), torch.randn(1, 16, 8, 8)
    sigmas = sigmas_for(SD3, "simple", 10, denoise=0.5)
    seen = []
    sample(constant(0.0), SD3, noise=noise, latent=latent, sigmas=sigmas, sampler="euler", seed=1, callback=seen.append)
    expected = sigmas[0] * noise + (1 - sigmas[0]) * process_in(latent)
    assert torch.equal(seen[0]["x"], expected)


def test_denoise_zero_returns_the_latent():
    latent = torch.randn(1, 16, 8, 8)
    sigmas = sigmas_for(SD3, "normal", 20, denoise=0.0)
    assert (
        sample(
            constant(0.0), SD3, noise=torch.randn(1, 16, 8, 8), latent=latent, sigmas=sigmas, sampler="euler", seed=0
        )
        is latent
    )


def test_uni_pc_divides_by_one_minus_its_last_sigma():
    noise = initial_noise([1, 16, 8, 8], 3)
    sigmas = sigmas_for(SD3, "simple", 6, sampler="uni_pc")
    model = constant(0.2)
    raw = SAMPLERS["uni_pc"](model, noise.clone(), sigmas, sampling=SD3, noise=NoiseSource(3), disable=True)
    out = sample(model, SD3, noise=noise, latent=torch.zeros_like(noise), sigmas=sigmas, sampler="uni_pc", seed=3)
    assert torch.equal(out, process_out(raw / (1.0 - torch.tensor(0.001))))
    assert sigmas[-1] == 0  # the caller's sigmas are not edited


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_runs_through_sample(name):
    noise = initial_noise([1, 16, 8, 8], 5)
    sigmas = sigmas_for(SD3, "sgm_uniform", 6, sampler=name)
    out = sample(
        lambda x, s: x * 0.5,
        SD3,
        noise=noise,
        latent=torch.zeros_like(noise),
        sigmas=sigmas,
        sampler=name,
        seed=5,
        disable=True,
    )
    assert out.shape == noise.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_sample_rejects_bad_input():
    noise = torch.randn(1, 16, 8, 8)
    with pytest.raises(ConfigError, match="sampler 'warp'"):
        sample(constant(0.0), SD3, noise=noise, latent=noise, sigmas=torch.ones(2), sampler="warp", seed=0)
    with pytest.raises(ConfigError, match="same shape"):
        sample(
            constant(0.0),
            SD3,
            noise=noise,
            latent=torch.zeros(1, 16, 4, 4),
            sigmas=torch.ones(2),
            sampler="euler",
            seed=0,
        )
    with pytest.raises(ConfigError, match="seed"):
        sample(constant(0.0), SD3, noise=noise, latent=noise, sigmas=torch.ones(2), sampler="euler", seed=-5)


def test_fix_empty_latent_channels():
    assert fix_empty_latent_channels(torch.zeros(2, 4, 8, 8)).shape == (2, 16, 8, 8)
    latent = torch.ones(1, 4, 8, 8)
    assert fix_empty_latent_channels(latent) is latent  # a non-empty latent is the caller's business


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("Euler", "euler"),
        ("Euler a", "euler_ancestral"),
        ("DPM++ 2M", "dpmpp_2m"),
        ("DPM++ 2M SDE", "dpmpp_2m_sde"),
        ("DPM++ SDE", "dpmpp_sde"),
        ("DPM2", "dpm_2"),
        ("Heun", "heun"),
        ("DDIM", "ddim"),
        ("LCM", "lcm"),
        ("UniPC", "uni_pc"),
        ("dpmpp_3m_sde", "dpmpp_3m_sde"),
        (" euler ", "euler"),
        ("k_euler_a", "euler_ancestral"),
    ],
)
def test_sampler_aliases(alias, name):
    assert parse_sampler(alias) == name


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("Karras", "karras"),
        ("Exponential", "exponential"),
        ("SGM Uniform", "sgm_uniform"),
        ("Simple", "simple"),
        ("Normal", "normal"),
        ("Beta", "beta"),
        ("KL Optimal", "kl_optimal"),
        ("Automatic", "normal"),
        ("ddim_uniform", "ddim_uniform"),
    ],
)
def test_scheduler_aliases(alias, name):
    assert parse_scheduler(alias) == name


def test_every_canonical_name_parses_to_itself():
    assert [parse_sampler(n) for n in SAMPLER_NAMES] == SAMPLER_NAMES
    assert [parse_scheduler(n) for n in SCHEDULER_NAMES] == SCHEDULER_NAMES


def test_legacy_combined_a1111_names():
    assert parse_sampler_scheduler("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert parse_sampler_scheduler("DPM++ 2M SDE Exponential", "Simple") == ("dpmpp_2m_sde", "simple")
    assert parse_sampler_scheduler("Euler a") == ("euler_ancestral", None)
    assert parse_sampler_scheduler("Euler", "SGM Uniform") == ("euler", "sgm_uniform")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown sampler 'Euler b'.*euler_ancestral"):
        parse_sampler("Euler b")
    with pytest.raises(ConfigError, match="does not implement"):
        parse_sampler("lms")
    with pytest.raises(ConfigError, match="unknown scheduler 'Align Your Steps'.*kl_optimal"):
        parse_scheduler("Align Your Steps")
    with pytest.raises(ConfigError, match="unknown sampler None"):
        parse_sampler(None)
