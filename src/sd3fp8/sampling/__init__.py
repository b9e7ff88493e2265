"""ComfyUI's sampling layer for SD3, reproduced (in progress): model sampling and schedules.

Modules: `model_sampling` (sigma <-> timestep, latent format), `schedulers`.
"""

from .model_sampling import SD3_LATENT, FlowSampling, LatentFormat, process_in, process_out
from .schedulers import SCHEDULER_NAMES, SCHEDULERS, sigmas_for

__all__ = [
    "SCHEDULERS",
    "SCHEDULER_NAMES",
    "SD3_LATENT",
    "FlowSampling",
    "LatentFormat",
    "process_in",
    "process_out",
    "sigmas_for",
]
