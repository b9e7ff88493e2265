"""The Ray replicas' engine Backend over :class:`~sd3fp8.engine.pipeline.SD3FP8Pipeline`: whole
checkpoints only (CheckpointLoaderSimple), ComfyUI's text encoding, noise and sampling.

``sd3fp8 serve`` itself uses the full engine backend (server/engine_backend.py: separate loaders,
weight_dtype policies, a ComfyUI models tree). The replicas serve the OpenAI and A1111 routes only,
whose workflows load whole checkpoints, and they batch: so they keep this smaller backend, which
besides the protocol offers the two optional methods the API layer looks for:

- ``model_defaults(name) -> dict`` (steps, cfg, width, height): the checkpoint's recipe, without
  loading it;
- ``sample_batch(requests, callback, interrupt) -> list[Tensor]``: several KSampler runs with the
  same schedule as ONE sampler run over the concatenated batch (each request keeps its own seed's
  noise and its own conditioning). Only for samplers that draw no noise of their own.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sd3fp8.workflow.backend import SampleRequest, StepCallback, TextPrompts
from sd3fp8.workflow.types import CondEntry, InterruptFlag, NodeError

log = logging.getLogger(__name__)

# Samplers that draw no noise after the initial one: a batch of requests sampled together gives each
# the images it gets alone (up to the float rounding of a larger matmul).
DETERMINISTIC_SAMPLERS = frozenset({"euler", "heun", "dpm_2", "dpmpp_2m", "ddim", "uni_pc", "uni_pc_bh2"})


@dataclass(frozen=True)
class Checkpoint:
    """Where a checkpoint name loads from: SD3FP8Pipeline.from_pretrained's ``path`` and options."""

    path: Path
    options: dict = field(default_factory=dict)  # checkpoint=..., extra_files=..., tokenizers=...


def bundled_checkpoints() -> dict[str, Checkpoint]:
    from sd3fp8.miniature.bundled import default_model_path

    return {"sd3fp8-mini": Checkpoint(default_model_path())}


class PipelineBackend:
    """Backend protocol over SD3FP8Pipeline. ``checkpoints``: name -> Checkpoint (or a path);
    default: the bundled miniature model as ``sd3fp8-mini``. ``policy``/``runtime`` apply to every
    pipeline loaded. Pipelines stay loaded until free(unload_models=True)."""

    def __init__(self, checkpoints: Mapping[str, Checkpoint | str | Path] | None = None, policy=None, runtime=None,
                 text_mode: str = "comfy", threads: int | None = None):
        if checkpoints is None:
            checkpoints = bundled_checkpoints()
        self.checkpoints = {name: c if isinstance(c, Checkpoint) else Checkpoint(Path(c)) for name, c in checkpoints.items()}
        self.policy, self.runtime, self.text_mode = policy, runtime, text_mode
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()
        if threads:
            torch.set_num_threads(threads)

    # -- inventory (any thread) ----------------------------------------------------------------
    def model_files(self, folder: str) -> list[str]:
        return list(self.checkpoints) if folder == "checkpoints" else []

    def sampler_names(self) -> list[str]:
        from sd3fp8.sampling import SAMPLER_NAMES

        return list(SAMPLER_NAMES)

    def scheduler_names(self) -> list[str]:
        from sd3fp8.sampling import SCHEDULER_NAMES

        return list(SCHEDULER_NAMES)

    def model_defaults(self, name: str) -> dict:
        """The checkpoint's generation defaults (its sd3fp8.json, else SD3.5's), without loading it."""
        from sd3fp8.engine.request import Recipe, read_recipe

        with self._lock:
            pipe = self._loaded.get(name)
        if pipe is not None:
            recipe = pipe.recipe
        else:
            checkpoint = self.checkpoints.get(name)
            folder = checkpoint.path if checkpoint is not None else None
            recipe = Recipe()
            if folder is not None and (folder / "model_index.json").is_file():
                try:
                    recipe = read_recipe(folder, _default_side(folder))
                except (OSError, ValueError, KeyError, TypeError) as e:
                    log.warning("cannot read the defaults of %s: %s", folder, e)
        return {"steps": recipe.steps, "cfg": recipe.cfg, "width": recipe.width, "height": recipe.height}

    # -- loaders ---------------------------------------------------------------------------------
    def pipeline(self, name: str):
        from sd3fp8.engine.pipeline import SD3FP8Pipeline

        with self._lock:
            if name not in self._loaded:
                if name not in self.checkpoints:
                    raise NodeError(f"no such checkpoint: {name}")
                checkpoint = self.checkpoints[name]
                self._loaded[name] = SD3FP8Pipeline.from_pretrained(checkpoint.path, self.policy, self.runtime, **checkpoint.options)
            return self._loaded[name]

    def load_checkpoint(self, ckpt_name: str):
        pipe = self.pipeline(ckpt_name)
        return pipe, pipe, pipe

    def _whole_checkpoints_only(self, *args, **kwargs):
        raise NodeError("this backend loads whole checkpoints only (CheckpointLoaderSimple); separate diffusion model, "
                        "text encoder and VAE loaders need the full engine backend")

    load_diffusion_model = load_text_encoders = load_vae = _whole_checkpoints_only

    # -- work (the worker thread) ----------------------------------------------------------------
    def encode_text(self, clip, prompts: TextPrompts):
        if not (prompts.clip_l == prompts.clip_g == prompts.t5xxl) or not prompts.empty_padding:
            raise NodeError("this backend encodes one text for all three encoders, padded with the empty prompt")
        with torch.inference_mode():
            cond = clip.encode(prompts.t5xxl, None, self.text_mode).positive
        return tuple(CondEntry(context=c.context, pooled=c.pooled) for c in cond)

    def sample(self, request: SampleRequest, callback: StepCallback, interrupt: InterruptFlag) -> torch.Tensor:
        return self.sample_batch([request], callback, interrupt)[0]

    def sample_batch(self, requests: Sequence[SampleRequest], callback: StepCallback, interrupt: InterruptFlag) -> list[torch.Tensor]:
        """One sampler run over all ``requests`` concatenated (one request: KSampler exactly).
        They must share model, shift, steps, cfg, sampler, scheduler, denoise and latent size, and
        with more than one the sampler must be deterministic."""
        from sd3fp8.engine.denoise import transformer_predictor
        from sd3fp8.sampling import Cond, cfg_denoiser, fix_empty_latent_channels, initial_noise, sample, sigmas_for

        first = requests[0]
        pipe = first.model.handle
        if len(requests) > 1:
            _check_batchable(requests)
        sampling = pipe.flow_sampling(first.model.shift)
        sigmas = _window(sigmas_for(sampling, first.scheduler, first.steps, first.denoise, first.sampler_name), first)
        latents, noises, positive, negative = [], [], [], []
        for r in requests:
            latent = fix_empty_latent_channels(r.latent.samples.to(torch.float32), pipe.latent_channels)
            latents.append(latent)
            index = list(r.latent.batch_index) if r.latent.batch_index is not None else None
            noises.append(initial_noise(latent.shape, r.seed, index) if r.add_noise else torch.zeros_like(latent))
            positive.append(r.positive)
            negative.append(r.negative)
        sizes = [latent.shape[0] for latent in latents]
        device = pipe.device
        with torch.inference_mode(), pipe.stage("transformer") as modules:
            transformer = modules["transformer"] if "transformer" in modules else pipe.component("transformer")
            model = cfg_denoiser(transformer_predictor(transformer, pipe.compute_dtype), sampling,
                                 _conds(positive, sizes, device, Cond), _conds(negative, sizes, device, Cond), first.cfg)

            def guarded(x, sigma):
                interrupt.check()
                return model(x, sigma)

            def on_step(info):
                callback(info["i"] + 1, len(sigmas) - 1, info["denoised"])

            out = sample(guarded, sampling, noise=torch.cat(noises).to(device), latent=torch.cat(latents).to(device),
                         sigmas=sigmas.to(device), sampler=first.sampler_name, seed=first.seed, callback=on_step, disable=True,
                         latent_format=pipe.latent_format)
        return list(out.to("cpu", torch.float32).split(sizes))

    def vae_decode(self, vae, samples: torch.Tensor) -> torch.Tensor:
        module = vae.component("vae")
        with torch.inference_mode():
            image = module.decode(samples.to(vae.device, module.dtype), return_dict=False)[0]
        return (image.to("cpu", torch.float32) / 2 + 0.5).clamp(0, 1).movedim(1, -1).contiguous()

    def vae_encode(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        module = vae.component("vae")
        x = (pixels[..., :3].movedim(-1, 1) * 2 - 1).to(vae.device, module.dtype)
        with torch.inference_mode():
            return module.encode(x).latent_dist.mode().to("cpu", torch.float32)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        if unload_models:
            with self._lock:
                self._loaded.clear()
        if free_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()


def _default_side(folder: Path) -> int:
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(transformer["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _window(sigmas: torch.Tensor, r: SampleRequest) -> torch.Tensor:
    """KSamplerAdvanced's start/end steps (comfy/samplers.py KSampler.sample)."""
    if r.last_step is not None and r.last_step < len(sigmas) - 1:
        sigmas = sigmas[: r.last_step + 1].clone()
        if r.force_full_denoise:
            sigmas[-1] = 0
    if r.start_step is not None:
        sigmas = sigmas[r.start_step:] if r.start_step < len(sigmas) - 1 else sigmas[:0]
    return sigmas


def _conds(conditionings: list, sizes: list[int], device, cond_type: Callable) -> tuple:
    """One conditioning list for the whole batch: a single request's entries as they are; several
    requests' single entries stacked, each repeated over its images."""
    if len(conditionings) == 1:
        return tuple(cond_type(e.context.to(device), e.pooled.to(device), e.start_percent, e.end_percent, e.strength)
                     for e in conditionings[0])
    context = torch.cat([c[0].context.to(device).expand(n, -1, -1) for c, n in zip(conditionings, sizes)])
    pooled = torch.cat([c[0].pooled.to(device).expand(n, -1) for c, n in zip(conditionings, sizes)])
    return (cond_type(context, pooled),)


def batch_key(r: SampleRequest) -> tuple | None:
    """Requests with equal keys can share one sampler run; None: this one cannot share."""
    if r.sampler_name not in DETERMINISTIC_SAMPLERS or len(r.positive) != 1 or len(r.negative) != 1:
        return None
    p, n = r.positive[0], r.negative[0]
    if (p.start_percent, p.end_percent, p.strength, n.start_percent, n.end_percent, n.strength) != (0.0, 1.0, 1.0, 0.0, 1.0, 1.0):
        return None
    if p.context.shape[0] != 1 or n.context.shape[0] != 1:
        return None
    return (id(r.model.handle), r.model.shift, r.steps, float(r.cfg), r.sampler_name, r.scheduler, float(r.denoise), r.add_noise,
            r.start_step, r.last_step, r.force_full_denoise, tuple(r.latent.samples.shape[1:]), tuple(p.context.shape),
            tuple(p.pooled.shape), tuple(n.context.shape), tuple(n.pooled.shape))


def _check_batchable(requests: Sequence[SampleRequest]) -> None:
    keys = {batch_key(r) for r in requests}
    if None in keys or len(keys) != 1:
        raise NodeError("these sampler runs cannot share one batch (different schedules, sizes or conditioning shapes, "
                        "or a sampler that draws its own noise)")
