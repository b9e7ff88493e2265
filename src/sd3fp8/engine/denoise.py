"""The engine's side of sampling: encoded prompts as ComfyUI-style conditioning lists, and the
transformer wrapped as the velocity predictor the sampling layer calls."""

from __future__ import annotations

import dataclasses

import torch

from sd3fp8.sampling.guidance import Cond, Predict


@dataclasses.dataclass(frozen=True, eq=False)
class Conditioning:
    """What ``encode`` returns: the positive and negative conditioning lists (one Cond each for a
    plain prompt; workflows combine, zero out or time-range them)."""

    positive: tuple[Cond, ...]
    negative: tuple[Cond, ...]


def transformer_predictor(transformer, compute_dtype: torch.dtype) -> Predict:
    """(x, timestep, context, pooled) -> velocity, float32; the transformer sees the compute dtype."""

    def predict(x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        v = transformer(hidden_states=x.to(compute_dtype), timestep=timestep.to(torch.float32),
                        encoder_hidden_states=context.to(compute_dtype), pooled_projections=pooled.to(compute_dtype),
                        return_dict=False)[0]
        return v.float()

    return predict


def scheduler_shift(scheduler) -> float:
    """The flow shift the model's scheduler config states (SD3.5: 3.0; the miniature model: 1.0)."""
    return float(getattr(scheduler.config, "shift", 3.0))
