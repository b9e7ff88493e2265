"""ComfyUI's sampling layer for SD3, reproduced (in progress): model sampling, schedules, noise.

Modules: `model_sampling` (sigma <-> timestep, latent format), `schedulers`, `noise`.
"""

from .model_sampling import SD3_LATENT, FlowSampling, LatentFormat, process_in, process_out
from .noise import NoiseSource, check_seed, initial_noise
from .schedulers import SCHEDULER_NAMES, SCHEDULERS, sigmas_for

__all__ = [
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
    "sigmas_for",
]
