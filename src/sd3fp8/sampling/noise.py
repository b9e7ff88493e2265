"""ComfyUI's initial noise, exactly: one CPU generator per batch, one float32 draw (comfy/sample.py).

Image i of a batch is the (i+1)-th [1, C, H, W] draw of that generator (not seed + i), so a single
image is reproduced alone with `batch_index=[i]`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sd3fp8.errors import ConfigError

SEED_MAX = 2**64 - 1  # ComfyUI's seed widget range; torch.Generator.manual_seed takes uint64 as is


def check_seed(seed) -> int:
    """The seed as an int in [0, 2^64 - 1], else ConfigError naming it."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed must be an integer in 0..{SEED_MAX} (2^64-1, ComfyUI's range), got {seed!r}")
    return seed


def cpu_generator(seed: int) -> torch.Generator:
    """A private CPU generator; the same stream as ComfyUI's `torch.manual_seed(seed)` without
    touching the global RNG."""
    return torch.Generator("cpu").manual_seed(check_seed(seed))


def initial_noise(shape: Sequence[int], seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """Gaussian noise of `shape` = [B, C, H, W], float32 on the CPU, as ComfyUI's prepare_noise.

    Without `batch_index`: one draw of the whole batch. With it (ComfyUI's latent "batch_index"),
    [1, C, H, W] draws are taken in order up to max(batch_index) and image b gets draw batch_index[b].
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ConfigError(f"noise shape must be [B, C, ...] with positive sizes, got {list(shape)}")
    generator = cpu_generator(seed)
    if batch_index is None:
        return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")
    index = [int(i) for i in batch_index]
    if len(index) != shape[0] or any(i < 0 for i in index):
        raise ConfigError(f"batch_index must hold {shape[0]} indices >= 0, got {list(batch_index)}")
    wanted = set(index)
    draws = {}
    for i in range(max(index) + 1):  # draws not wanted are still taken: they advance the stream
        draw = torch.randn((1,) + shape[1:], dtype=torch.float32, generator=generator, device="cpu")
        if i in wanted:
            draws[i] = draw
    return torch.cat([draws[i] for i in index])


NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NoiseSource:
    """Where stochastic samplers draw fresh noise, seeded from the generation seed as ComfyUI does."""

    seed: int

    def __post_init__(self):
        check_seed(self.seed)

    def gaussian(self, x: torch.Tensor) -> NoiseSampler:
        """ComfyUI's default_noise_sampler: one generator on x's device, seeded seed + 1 on the CPU
        (so it does not replay the initial noise) and seed on other devices. seed + 1 wraps to 0 at
        2^64 - 1, where ComfyUI's manual_seed overflows."""
        seed = (self.seed + 1) % 2**64 if x.device.type == "cpu" else self.seed
        generator = torch.Generator(device=x.device).manual_seed(seed)
        return lambda sigma, sigma_next: torch.randn(
            x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator
        )

    def brownian(self, x: torch.Tensor, sigmas: torch.Tensor, cpu: bool = True) -> NoiseSampler:
        """ComfyUI's BrownianTreeNoiseSampler over [smallest sigma > 0, largest sigma], entropy = seed;
        the tree lives on the CPU unless `cpu` is False (the `_gpu` samplers)."""
        return _BrownianNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), self.seed, cpu)


class _BrownianNoise:
    """Unit-variance increments W(s, s_next) / sqrt|s_next - s| of one torchsde BrownianTree
    (Li et al. 2020), so steps over the same interval see the same noise whatever the step count."""

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, seed: int, cpu: bool):
        import torchsde  # imported here: only the SDE samplers need it

        self.cpu = cpu
        w0 = torch.zeros_like(x)
        t0, t1 = sigma_min, sigma_max
        if cpu:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self.tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        device, dtype = t0.device, t0.dtype
        if self.cpu:
            t0, t1 = t0.detach().cpu().float(), t1.detach().cpu().float()
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends to its 1e-6 tolerance, then warns when a query at the
            # exact smallest sigma falls outside and clamps it; ComfyUI runs the same clamp
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = self.tree(t0, t1).to(device=device, dtype=dtype) * sign
        return w / (sigma_next - sigma).abs().sqrt()
