"""Initial noise and the samplers' noise sources vs ComfyUI (tests/data/comfy_sigmas_noise.json)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sd3fp8.errors import ConfigError
from sd3fp8.sampling import NoiseSource, check_seed, initial_noise

REFERENCE = json.loads((Path(__file__).parent / "data" / "comfy_sigmas_noise.json").read_text())


def test_batch_noise_equals_comfyui_checksum():
    noise = initial_noise([2, 16, 128, 128], 42)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert hashlib.sha256(noise.numpy().tobytes()).hexdigest() == REFERENCE["noise seed=42 sha256"]
    assert noise[0].flatten()[:5].tolist() == REFERENCE["noise seed=42 shape=[2,16,128,128] first5 of image0"]
    assert noise[1].flatten()[:5].tolist() == REFERENCE["noise seed=42 first5 of image1"]


def test_largest_seed_and_seeds_above_2_63():
    noise = initial_noise([1, 16, 128, 128], 2**64 - 1)
    assert noise.flatten()[:3].tolist() == REFERENCE["noise seed=2**64-1 first3"]
    assert not torch.equal(initial_noise([1, 4, 8, 8], 2**63), initial_noise([1, 4, 8, 8], 2**63 - 1))


def test_image_i_is_the_next_draw_not_seed_plus_i():
    batch = initial_noise([2, 16, 32, 32], 42)
    assert torch.equal(initial_noise([1, 16, 32, 32], 42)[0], batch[0])
    assert not torch.equal(initial_noise([1, 16, 32, 32], 43)[0], batch[1])
    # ComfyUI's batch_index: image 1 of the batch reproduced alone, and out-of-order picks
    assert torch.equal(initial_noise([1, 16, 32, 32], 42, batch_index=[1])[0], batch[1])
    picked = initial_noise([3, 16, 32, 32], 42, batch_index=[1, 0, 1])
    assert torch.equal(picked[0], batch[1]) and torch.equal(picked[1], batch[0]) and torch.equal(picked[2], batch[1])


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "42", None, True])
def test_bad_seeds_raise_config_error_naming_the_seed(seed):
    with pytest.raises(ConfigError, match=f"got {seed!r}".replace("(", r"\(").replace(")", r"\)")):
        initial_noise([1, 16, 8, 8], seed)
    with pytest.raises(ConfigError):
        NoiseSource(seed)


def test_bad_shapes_and_batch_index():
    assert check_seed(0) == 0
    with pytest.raises(ConfigError, match="shape"):
        initial_noise([0, 16, 8, 8], 1)
    with pytest.raises(ConfigError, match="batch_index"):
        initial_noise([2, 16, 8, 8], 1, batch_index=[0])
    with pytest.raises(ConfigError, match="batch_index"):
        initial_noise([1, 16, 8, 8], 1, batch_index=[-1])


def test_gaussian_source_is_comfyuis_default_noise_sampler():
    x = torch.zeros(2, 4, 8, 8)
    draw = NoiseSource(7).gaussian(x)
    g = torch.Generator("cpu").manual_seed(8)  # seed + 1 on the CPU
    expected = [torch.randn(x.shape, generator=g) for _ in range(2)]
    assert torch.equal(draw(1.0, 0.5), expected[0]) and torch.equal(draw(0.5, 0.2), expected[1])
    wrapped = NoiseSource(2**64 - 1).gaussian(x)(1.0, 0.5)  # seed + 1 wraps instead of overflowing
    assert torch.equal(wrapped, torch.randn(x.shape, generator=torch.Generator("cpu").manual_seed(0)))


def test_brownian_source_is_deterministic_and_unit_variance():
    x = torch.zeros(1, 4, 32, 32)
    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.0])
    a = NoiseSource(3).brownian(x, sigmas)
    b = NoiseSource(3).brownian(x, sigmas, cpu=False)  # the _gpu variant: same stream on the CPU
    w1, w2 = a(sigmas[0], sigmas[1]), a(sigmas[1], sigmas[2])
    assert torch.equal(w1, b(sigmas[0], sigmas[1])) and torch.equal(w2, b(sigmas[1], sigmas[2]))
    assert 0.9 < w1.std().item() < 1.1 and abs(w1.mean().item()) < 0.1
    assert abs(torch.corrcoef(torch.stack([w1.flatten(), w2.flatten()]))[0, 1].item()) < 0.1  # independent steps
    assert not torch.equal(w1, NoiseSource(4).brownian(x, sigmas)(sigmas[0], sigmas[1]))
