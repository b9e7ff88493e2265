"""Sampler and scheduler names: ComfyUI's own, plus AUTOMATIC1111's display names as aliases.

One table per kind, matched case-insensitively. A1111 names come from its sd_samplers_kdiffusion /
sd_schedulers (e.g. "Euler a", "DPM++ 2M SDE", scheduler "Karras"); the pre-1.9 combined names
("DPM++ 2M Karras") are split by `parse_sampler_scheduler`.
"""

from __future__ import annotations

from sd3fp8.errors import ConfigError
from sd3fp8.sampling.samplers import COMFYUI_SAMPLER_NAMES, SAMPLER_NAMES
from sd3fp8.sampling.schedulers import SCHEDULER_NAMES

SAMPLER_ALIASES = {
    "euler": "euler",
    "euler a": "euler_ancestral",
    "k_euler": "euler",
    "k_euler_a": "euler_ancestral",
    "heun": "heun",
    "k_heun": "heun",
    "dpm2": "dpm_2",
    "k_dpm_2": "dpm_2",
    "dpm2 a": "dpm_2_ancestral",
    "k_dpm_2_a": "dpm_2_ancestral",
    "dpm++ 2m": "dpmpp_2m",
    "k_dpmpp_2m": "dpmpp_2m",
    "dpm++ sde": "dpmpp_sde",
    "k_dpmpp_sde": "dpmpp_sde",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "k_dpmpp_2m_sde": "dpmpp_2m_sde",
    "dpm++ 2m sde heun": "dpmpp_2m_sde_heun",
    "dpm++ 3m sde": "dpmpp_3m_sde",
    "k_dpmpp_3m_sde": "dpmpp_3m_sde",
    "ddim": "ddim",
    "lcm": "lcm",
    "unipc": "uni_pc",
}

SCHEDULER_ALIASES = {
    # A1111's "Automatic" is the model's own discretization: for SD3 that is diffusers' default
    # FlowMatchEuler schedule, which equals ComfyUI's "normal"; "Uniform" is the same schedule
    "automatic": "normal",
    "uniform": "normal",
    "karras": "karras",
    "exponential": "exponential",
    "sgm uniform": "sgm_uniform",
    "simple": "simple",
    "normal": "normal",
    "beta": "beta",
    "kl optimal": "kl_optimal",
    "ddim": "ddim_uniform",
    "linear quadratic": "linear_quadratic",
}


def _lookup(name, canonical: list[str], aliases: dict[str, str], kind: str) -> str:
    if isinstance(name, str):
        key = name.strip()
        if key in canonical:
            return key
        lowered = key.lower()
        if lowered in canonical:
            return lowered
        if lowered in aliases:
            return aliases[lowered]
    names = ", ".join(canonical)
    unimplemented = kind == "sampler" and name in COMFYUI_SAMPLER_NAMES
    extra = " (a ComfyUI sampler sd3fp8 does not implement)" if unimplemented else ""
    raise ConfigError(f"unknown {kind} {name!r}{extra}; valid: {names} (and A1111 names such as 'Euler a')")


def parse_sampler(name: str) -> str:
    """ComfyUI sampler name for a ComfyUI or A1111 name ("Euler a" -> "euler_ancestral")."""
    return _lookup(name, SAMPLER_NAMES, SAMPLER_ALIASES, "sampler")


def parse_scheduler(name: str) -> str:
    """ComfyUI scheduler name for a ComfyUI or A1111 name ("Karras" -> "karras")."""
    return _lookup(name, SCHEDULER_NAMES, SCHEDULER_ALIASES, "scheduler")


def parse_sampler_scheduler(sampler: str, scheduler: str | None = None) -> tuple[str, str | None]:
    """(sampler, scheduler) from A1111 request fields, splitting legacy combined names such as
    "DPM++ 2M Karras"; an explicit `scheduler` wins over the suffix. The scheduler stays None
    when neither gives one."""
    if isinstance(sampler, str) and sampler.strip().lower() not in SAMPLER_ALIASES:
        head, _, tail = sampler.strip().rpartition(" ")
        if head and tail.lower() in ("karras", "exponential"):
            return parse_sampler(head), parse_scheduler(scheduler if scheduler else tail)
    return parse_sampler(sampler), parse_scheduler(scheduler) if scheduler else None
