"""A deterministic stand-in for the engine backend: small tensors, call counts, optional slowness.

It honours the Backend protocol's contract (shapes, callback per step, interrupt within a step)
so the workflow and server tests exercise everything but the real model.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import Counter

import torch

from sd3fp8.workflow import CondEntry, NodeError

COMFY_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0", "exp_heun_2_x0_sde",
    "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde",
    "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
    "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
COMFY_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal"]

# the files of the ComfyUI installation object_info_sd35.json was taken from
REFERENCE_FILES = {
    "checkpoints": ["sd3.5_large_fp8_scaled.safetensors", "sd3.5_medium.safetensors"],
    "diffusion_models": [],
    "text_encoders": ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"],
    "vae": ["pixel_space"],
}


def _text_seed(text: str) -> int:
    return zlib.crc32(text.encode())


class FakeBackend:
    def __init__(self, files: dict | None = None, samplers=None, schedulers=None, step_delay: float = 0.0):
        self.files = {k: list(v) for k, v in (files or REFERENCE_FILES).items()}
        self.samplers = list(samplers or ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"])
        self.schedulers = list(schedulers or ["simple", "sgm_uniform", "normal", "beta"])
        self.step_delay = step_delay
        self.calls: Counter = Counter()
        self.sampling = threading.Event()  # set while a sample() call runs
        self.fail_next_sample: str | None = None
        self.requests = []

    # inventory -------------------------------------------------------------------------------
    def model_files(self, folder: str) -> list[str]:
        return list(self.files.get(folder, []))

    def sampler_names(self) -> list[str]:
        return list(self.samplers)

    def scheduler_names(self) -> list[str]:
        return list(self.schedulers)

    # loaders -----------------------------------------------------------------------------------
    def _need(self, folder: str, name: str) -> None:
        if name not in self.files.get(folder, []):
            raise NodeError(f"no such file in {folder}: {name}")

    def load_checkpoint(self, ckpt_name):
        self.calls["load_checkpoint"] += 1
        self._need("checkpoints", ckpt_name)
        return f"model:{ckpt_name}", f"clip:{ckpt_name}", f"vae:{ckpt_name}"

    def load_diffusion_model(self, unet_name, weight_dtype):
        self.calls["load_diffusion_model"] += 1
        self._need("diffusion_models", unet_name)
        return f"model:{unet_name}:{weight_dtype}"

    def load_text_encoders(self, clip_names, clip_type, device):
        self.calls["load_text_encoders"] += 1
        for name in clip_names:
            self._need("text_encoders", name)
        return "clip:" + "+".join(clip_names)

    def load_vae(self, vae_name):
        self.calls["load_vae"] += 1
        self._need("vae", vae_name)
        return f"vae:{vae_name}"

    # work ----------------------------------------------------------------------------------------
    def encode_text(self, clip, prompts):
        self.calls["encode_text"] += 1
        g = torch.Generator().manual_seed(_text_seed(prompts.clip_l + "|" + prompts.t5xxl))
        return (CondEntry(context=torch.randn(1, 4, 8, generator=g), pooled=torch.randn(1, 8, generator=g)),)

    def sample(self, request, callback, interrupt):
        self.calls["sample"] += 1
        self.requests.append(request)
        samples = request.latent.samples
        if samples.shape[1] != 16 and not samples.any():
            samples = samples.new_zeros((samples.shape[0], 16, *samples.shape[2:]))
        g = torch.Generator().manual_seed(request.seed % (2**63))
        x = torch.randn(samples.shape, generator=g) + samples
        target = request.positive[0].pooled.mean() if request.positive else torch.tensor(0.0)
        self.sampling.set()
        try:
            for step in range(request.steps):
                interrupt.check()
                if self.fail_next_sample:
                    message, self.fail_next_sample = self.fail_next_sample, None
                    raise RuntimeError(message)
                if self.step_delay:
                    time.sleep(self.step_delay)
                x = x + (target - x) / (request.steps - step)
                callback(step + 1, request.steps, x)
        finally:
            self.sampling.clear()
        return x.to(torch.float32)

    def vae_decode(self, vae, samples):
        self.calls["vae_decode"] += 1
        rgb = torch.sigmoid(samples[:, :3])  # [B, 3, h, w]
        return rgb.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).movedim(1, -1).contiguous()

    def vae_encode(self, vae, pixels):
        self.calls["vae_encode"] += 1
        pooled = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8)  # [B, 3, h, w]
        return torch.cat([pooled, pooled.new_zeros(pooled.shape[0], 13, *pooled.shape[2:])], dim=1)

    def free(self, unload_models, free_memory):
        self.calls["free"] += 1
