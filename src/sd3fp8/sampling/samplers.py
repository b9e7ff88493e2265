"""The sampler registry: ComfyUI's sampler names -> our functions, in ComfyUI's order.

All share `fn(model, x, sigmas, *, sampling, noise, callback=None, disable=None) -> x` (see `ode`).
"""

from __future__ import annotations

from sd3fp8.errors import ConfigError
from sd3fp8.sampling import ancestral, ode, sde, unipc

# comfy/samplers.py KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"] (v0.8.0, 44 names): the order
# ComfyUI's /object_info lists them in.
COMFYUI_SAMPLER_NAMES = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)  # fmt: skip

_IMPLEMENTED = {
    "euler": ode.euler,
    "euler_ancestral": ancestral.euler_ancestral,
    "heun": ode.heun,
    "dpm_2": ode.dpm_2,
    "dpm_2_ancestral": ancestral.dpm_2_ancestral,
    "dpmpp_sde": sde.dpmpp_sde,
    "dpmpp_sde_gpu": sde.dpmpp_sde_gpu,
    "dpmpp_2m": ode.dpmpp_2m,
    "dpmpp_2m_sde": sde.dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": sde.dpmpp_2m_sde_gpu,
    "dpmpp_2m_sde_heun": sde.dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": sde.dpmpp_2m_sde_heun_gpu,
    "dpmpp_3m_sde": sde.dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": sde.dpmpp_3m_sde_gpu,
    "lcm": ancestral.lcm,
    # ComfyUI's "ddim" is euler (its only difference, random inpainting noise, needs a mask)
    "ddim": ode.euler,
    "uni_pc": unipc.uni_pc,
    "uni_pc_bh2": unipc.uni_pc_bh2,
}

SAMPLERS = {name: _IMPLEMENTED[name] for name in COMFYUI_SAMPLER_NAMES if name in _IMPLEMENTED}
SAMPLER_NAMES = list(SAMPLERS)


def sampler_fn(name: str):
    """The sampler function for a ComfyUI sampler name, else ConfigError listing the valid names."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    why = "is a ComfyUI sampler sd3fp8 does not implement" if name in COMFYUI_SAMPLER_NAMES else "is unknown"
    raise ConfigError(f"sampler {name!r} {why}; valid: {', '.join(SAMPLER_NAMES)}")
