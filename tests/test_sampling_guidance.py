"""CFG and ComfyUI's conditioning semantics, with a fake transformer that records its calls."""

import math

import pytest
import torch

from sd3fp8.errors import ConfigError
from sd3fp8.sampling import Cond, FlowSampling, cfg_denoiser, combine, set_timestep_range, zero_out

SD3 = FlowSampling(shift=3.0)


class FakeTransformer:
    """v = (mean of the context + pooled[0]) everywhere, plus x * 0.1: each conditioning is
    recognisable in the output, and every call is recorded."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, timestep, context, pooled):
        self.calls.append((x.shape[0], context.shape[1], timestep.clone()))
        per_sample = context.mean(dim=(1, 2)) + pooled[:, 0]
        return x * 0.1 + per_sample.view(-1, 1, 1, 1)


def cond(value, tokens=4, **kw):
    return Cond(torch.full((1, tokens, 8), float(value)), torch.zeros(1, 3), **kw)


def expected_denoised(x, sigma, value):
    v = x * 0.1 + value
    return x - v * sigma


@pytest.fixture
def x():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def test_cfg_arithmetic_and_one_batched_forward(x):
    fake = FakeTransformer()
    model = cfg_denoiser(fake, SD3, [cond(2.0)], [cond(-1.0)], cfg=4.5)
    sigma = torch.full((2,), 0.75)
    d = model(x, sigma)
    d_c, d_u = expected_denoised(x, 0.75, 2.0), expected_denoised(x, 0.75, -1.0)
    assert torch.allclose(d, d_u + (d_c - d_u) * 4.5, atol=1e-5)
    assert d.dtype == torch.float32
    assert [c[:2] for c in fake.calls] == [(4, 4)]  # uncond and cond in one forward of 2 x batch
    assert torch.equal(fake.calls[0][2], torch.full((4,), 750.0))  # timestep = 1000 * sigma


def test_cfg_one_never_evaluates_the_negative(x):
    fake = FakeTransformer()
    model = cfg_denoiser(fake, SD3, [cond(2.0)], [cond(-1.0)], cfg=1.0 + 1e-12)
    d = model(x, torch.full((2,), 0.5))
    assert [c[:2] for c in fake.calls] == [(2, 4)]
    assert torch.allclose(d, expected_denoised(x, 0.5, 2.0), atol=1e-6)


def test_different_token_counts_run_separately(x):
    fake = FakeTransformer()
    cfg_denoiser(fake, SD3, [cond(2.0, tokens=6)], [cond(-1.0, tokens=4)], cfg=3.0)(x, torch.full((2,), 0.5))
    assert sorted(c[:2] for c in fake.calls) == [(2, 4), (2, 6)]


def test_combine_averages_weighted_by_strength(x):
    fake = FakeTransformer()
    positive = combine([cond(1.0)], [cond(4.0, strength=3.0)])
    d = cfg_denoiser(fake, SD3, positive, [], cfg=1.0)(x, torch.full((2,), 0.5))
    mean = (expected_denoised(x, 0.5, 1.0) + 3 * expected_denoised(x, 0.5, 4.0)) / 4
    assert torch.allclose(d, mean, atol=1e-5)
    assert [c[:2] for c in fake.calls] == [(4, 4)]  # both entries in one forward


def test_timestep_ranges_switch_entries_on_and_off(x):
    early = set_timestep_range([cond(1.0)], 0.0, 0.5)  # sigma in [shift(0.5) = 0.75, 1]
    late = set_timestep_range([cond(5.0)], 0.5, 1.0)  # sigma in [0, 0.75]
    model = cfg_denoiser(FakeTransformer(), SD3, combine(early, late), [], cfg=1.0)
    assert torch.allclose(model(x, torch.full((2,), 0.9)), expected_denoised(x, 0.9, 1.0), atol=1e-6)
    assert torch.allclose(model(x, torch.full((2,), 0.3)), expected_denoised(x, 0.3, 5.0), atol=1e-6)
    both = model(x, torch.full((2,), 0.75))  # the boundary belongs to both
    assert torch.allclose(both, (expected_denoised(x, 0.75, 1.0) + expected_denoised(x, 0.75, 5.0)) / 2, atol=1e-6)


def test_boundaries_compare_in_float32_as_comfyui():
    sigma = torch.tensor([SD3.percent_to_sigma(0.1)], dtype=torch.float32)  # rounds above the float64 value
    assert float(sigma[0]) > SD3.percent_to_sigma(0.1)
    model = cfg_denoiser(FakeTransformer(), SD3, set_timestep_range([cond(1.0)], 0.1, 1.0), [], cfg=1.0)
    x = torch.zeros(1, 4, 8, 8)
    assert torch.allclose(model(x, sigma), expected_denoised(x, float(sigma[0]), 1.0))  # still active


def test_no_active_entry_predicts_zero(x):
    fake = FakeTransformer()
    model = cfg_denoiser(fake, SD3, set_timestep_range([cond(1.0)], 0.5, 1.0), [cond(2.0)], cfg=2.0)
    d = model(x, torch.full((2,), 0.9))
    d_u = expected_denoised(x, 0.9, 2.0)
    assert torch.allclose(d, d_u + (0 - d_u) * 2.0, atol=1e-5)  # ComfyUI's empty average is 0
    assert [c[:2] for c in fake.calls] == [(2, 4)]


def test_zero_out_zeroes_tensors_and_keeps_options():
    c = Cond(torch.ones(1, 4, 8), torch.ones(1, 3), start_percent=0.2, end_percent=0.8, strength=2.0)
    (z,) = zero_out([c])
    assert torch.count_nonzero(z.context) == 0 and torch.count_nonzero(z.pooled) == 0
    assert (z.start_percent, z.end_percent, z.strength) == (0.2, 0.8, 2.0)
    assert torch.count_nonzero(c.context) == 32  # the input is untouched


def test_per_image_conditioning_is_repeated_to_the_batch(x):
    fake = FakeTransformer()
    cfg_denoiser(fake, SD3, [cond(1.0)], [], cfg=1.0)(x, torch.full((2,), 0.5))
    assert fake.calls[0][0] == 2


def test_bad_conds_and_cfg_raise_config_error():
    with pytest.raises(ConfigError, match="context"):
        Cond(torch.zeros(4, 8), torch.zeros(1, 3))
    with pytest.raises(ConfigError, match="end_percent"):
        cond(1.0, end_percent=1.5)
    with pytest.raises(ConfigError, match="cfg"):
        cfg_denoiser(FakeTransformer(), SD3, [], [], cfg=math.nan)
