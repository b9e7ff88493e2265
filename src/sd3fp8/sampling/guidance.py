"""Classifier-free guidance over ComfyUI-style conditioning lists (comfy/samplers.py v0.8.0).

A conditioning is a sequence of `Cond` entries. At each sigma, the entries active there are run
through the transformer (batched together when their tensors have the same shapes, as ComfyUI
batches cond and uncond), their denoised predictions averaged weighted by strength, and
D = D_uncond + (D_cond - D_uncond) * cfg. With cfg == 1 the negative is not evaluated at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from sd3fp8.errors import ConfigError
from sd3fp8.sampling.model_sampling import FlowSampling

# (x [N, C, H, W], timestep [N] = 1000 * sigma, context [N, T, 4096], pooled [N, 2048]) -> velocity v
Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Cond:
    """One conditioning entry: the joint text context, the pooled vector, and ComfyUI's options
    (ConditioningSetTimestepRange's start/end percent, a strength weighting it in averages)."""

    context: torch.Tensor  # [1 or B, T, 4096]
    pooled: torch.Tensor  # [1 or B, 2048]
    start_percent: float = 0.0
    end_percent: float = 1.0
    strength: float = 1.0

    def __post_init__(self):
        if self.context.ndim != 3 or self.pooled.ndim != 2:
            raise ConfigError(
                f"Cond needs context [B, T, D] and pooled [B, D], got {list(self.context.shape)} "
                f"and {list(self.pooled.shape)}"
            )
        for name in ("start_percent", "end_percent"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"Cond {name} must be in [0, 1], got {value!r}")
        if not math.isfinite(self.strength):
            raise ConfigError(f"Cond strength must be finite, got {self.strength!r}")


def zero_out(conds: Sequence[Cond]) -> tuple[Cond, ...]:
    """ComfyUI's ConditioningZeroOut: context and pooled zeroed, options kept. For SD3 this is not
    the same as encoding the empty prompt."""
    return tuple(replace(c, context=torch.zeros_like(c.context), pooled=torch.zeros_like(c.pooled)) for c in conds)


def set_timestep_range(conds: Sequence[Cond], start: float, end: float) -> tuple[Cond, ...]:
    """ComfyUI's ConditioningSetTimestepRange: entries active only for percent_to_sigma(end) <=
    sigma <= percent_to_sigma(start)."""
    return tuple(replace(c, start_percent=start, end_percent=end) for c in conds)


def combine(*conditionings: Sequence[Cond]) -> tuple[Cond, ...]:
    """ComfyUI's ConditioningCombine: the lists concatenated (their predictions get averaged)."""
    return tuple(c for conds in conditionings for c in conds)


def _active(cond: Cond, sampling: FlowSampling, sigma: torch.Tensor) -> bool:
    # tensor-vs-float comparisons run in float32, as ComfyUI's do: a boundary equal to a schedule
    # sigma after float32 rounding counts as inside
    if sigma > sampling.percent_to_sigma(cond.start_percent):
        return False
    return not bool(sigma < sampling.percent_to_sigma(cond.end_percent))


def _repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] > batch:
        return t[:batch]
    if t.shape[0] < batch:
        return t.repeat([math.ceil(batch / t.shape[0])] + [1] * (t.ndim - 1))[:batch]
    return t


def calc_cond_batch(
    predict: Predict,
    sampling: FlowSampling,
    groups: Sequence[Sequence[Cond] | None],
    x: torch.Tensor,
    sigma: torch.Tensor,
) -> list[torch.Tensor]:
    """Denoised prediction per conditioning group (strength-weighted average of its active entries;
    zeros when none is active), with one transformer call per set of same-shaped entries."""
    batch = x.shape[0]
    to_run = [(g, c) for g, conds in enumerate(groups) for c in conds or () if _active(c, sampling, sigma[0])]
    out = [torch.zeros_like(x) for _ in groups]
    count = [torch.full((), 1e-37, dtype=x.dtype, device=x.device) for _ in groups]  # ComfyUI's 0/0 guard
    while to_run:
        shapes = (to_run[0][1].context.shape, to_run[0][1].pooled.shape)
        same = [j for j, (_, c) in enumerate(to_run) if (c.context.shape, c.pooled.shape) == shapes]
        chunk = [to_run.pop(j) for j in reversed(same)]  # ComfyUI's order: the last entry first
        n = len(chunk)
        x_in, sigma_in = torch.cat([x] * n), torch.cat([sigma] * n)
        context = torch.cat([_repeat_to_batch(c.context, batch) for _, c in chunk])
        pooled = torch.cat([_repeat_to_batch(c.pooled, batch) for _, c in chunk])
        v = predict(x_in, sampling.timestep(sigma_in), context, pooled)
        denoised = sampling.denoised(x_in, v, sigma_in).chunk(n)
        for (g, c), d in zip(chunk, denoised):
            out[g] += d * c.strength
            count[g] += c.strength
    return [o / c for o, c in zip(out, count)]


def cfg_denoiser(
    predict: Predict, sampling: FlowSampling, positive: Sequence[Cond], negative: Sequence[Cond], cfg: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`model(x, sigma[B]) -> D` for the samplers: D = D_u + (D_c - D_u) * cfg, float32.
    The negative is skipped (D_u = 0) when cfg is 1 (math.isclose), as ComfyUI does."""
    if not math.isfinite(cfg):
        raise ConfigError(f"cfg must be a finite number, got {cfg!r}")
    groups = (tuple(positive), None if math.isclose(cfg, 1.0) else tuple(negative))

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond, uncond = calc_cond_batch(predict, sampling, groups, x, sigma)
        return uncond + (cond - uncond) * cfg

    return model
