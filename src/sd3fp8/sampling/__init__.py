"""ComfyUI's sampling layer for SD3, reproduced (in progress): model sampling, schedules, samplers, noise.

Modules: `model_sampling` (sigma <-> timestep, latent format), `schedulers`, `samplers` (registry
over `ode`, `ancestral`, `sde`, `unipc`), `noise`.
"""

from .model_sampling import SD3_LATENT, FlowSampling, LatentFormat, process_in, process_out
from .noise import NoiseSource, check_seed, initial_noise
from .samplers import SAMPLER_NAMES, SAMPLERS, sampler_fn
from .schedulers import SCHEDULER_NAMES, SCHEDULERS, sigmas_for

__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SCHEDULERS",
    "SCHEDULER_NAMES",
    "SD3_LATENT",
    "FlowSampling",
    "LatentFormat",
    "NoiseSource",
    "check_seed",
    "initial_noise",
    "process_in",
    "process_out",
    "sampler_fn",
    "sigmas_for",
]
