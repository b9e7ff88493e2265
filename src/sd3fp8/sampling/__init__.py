"""ComfyUI's sampling layer for SD3, reproduced: model sampling, schedules, samplers, noise, CFG.

Modules: `model_sampling` (sigma <-> timestep, latent format), `schedulers`, `samplers` (registry
over `ode`, `ancestral`, `sde`, `unipc`), `noise`, `guidance` (CFG over conditioning lists),
`sample` (one KSampler run), `aliases` (A1111 names).
"""

from sd3fp8.sampling.aliases import parse_sampler, parse_sampler_scheduler, parse_scheduler
from sd3fp8.sampling.guidance import Cond, cfg_denoiser, combine, set_timestep_range, zero_out
from sd3fp8.sampling.model_sampling import SD3_LATENT, FlowSampling, LatentFormat, process_in, process_out
from sd3fp8.sampling.noise import NoiseSource, check_seed, initial_noise
from sd3fp8.sampling.sample import fix_empty_latent_channels, sample
from sd3fp8.sampling.samplers import SAMPLER_NAMES, SAMPLERS, sampler_fn
from sd3fp8.sampling.schedulers import SCHEDULER_NAMES, SCHEDULERS, sigmas_for

__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SCHEDULERS",
    "SCHEDULER_NAMES",
    "SD3_LATENT",
    "Cond",
    "FlowSampling",
    "LatentFormat",
    "NoiseSource",
    "cfg_denoiser",
    "check_seed",
    "combine",
    "fix_empty_latent_channels",
    "initial_noise",
    "parse_sampler",
    "parse_sampler_scheduler",
    "parse_scheduler",
    "process_in",
    "process_out",
    "sample",
    "sampler_fn",
    "set_timestep_range",
    "sigmas_for",
    "zero_out",
]
