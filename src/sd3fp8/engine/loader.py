"""Assemble an engine's parts: resolve the sources, load each component as the policy says,
apply a calibration, and read the model's generation defaults."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from sd3fp8.engine.fastpath import prepare_transformer
from sd3fp8.errors import ConfigError
from sd3fp8.fp8.calibration import Calibration, apply_calibration
from sd3fp8.fp8.linear import ClipCounter, resolve_backend
from sd3fp8.fp8.swap import fp8_layers as fp8_layers_of
from sd3fp8.io import schemas
from sd3fp8.io.components import FileSource
from sd3fp8.policy import COMPONENTS, Policy, Precision
from sd3fp8.runtime import RuntimeConfig, resolve_compute_dtype, resolve_device

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

log = logging.getLogger(__name__)


def load_engine_parts(path, policy: Policy, runtime: RuntimeConfig, transformer_file, checkpoint, extra_files, tokenizers,
                      calibration) -> dict:
    """The keyword arguments of SD3FP8Pipeline(...) for a model at ``path`` (see from_pretrained)."""
    from diffusers import StableDiffusion3Pipeline

    from sd3fp8.io.folders import check_model_folder
    from sd3fp8.io.loading import LoadSettings, effective_policy, load_component, load_scheduler, load_tokenizers
    from sd3fp8.io.preflight import check_before_loading
    from sd3fp8.io.sources import resolve_sources

    device = resolve_device(runtime.device)
    compute_dtype = resolve_compute_dtype(runtime.dtype, device, policy.transformer)
    if runtime.offload == "model" and device.type == "cpu":
        raise ConfigError("--offload model needs a GPU (it moves components between CPU and GPU); this run is on the CPU: use --offload none or stages")
    backend = resolve_backend(runtime.backend, device, runtime.force_fp8)  # the one resolution; fails early on a bad request
    cal = Calibration.load(calibration) if calibration is not None else None  # ... or a bad calibration file
    sources = resolve_sources(path, policy, checkpoint, tuple(Path(p) for p in extra_files), Path(tokenizers) if tokenizers else None)
    if sources.folder is not None:
        check_model_folder(sources.folder)
    if transformer_file is not None:
        sources = dataclasses.replace(sources, files={**sources.files, "transformer": FileSource(Path(transformer_file))})
    policy = effective_policy(policy, sources)
    check_before_loading(sources, policy, device, compute_dtype, runtime.offload)  # fit and memory, from configs
    # offload=model: every component stays on the CPU until diffusers' hooks move it (one at a time)
    place = torch.device("cpu") if runtime.offload == "model" else device
    settings = LoadSettings(device, compute_dtype, backend, runtime.force_fp8, runtime.activation, place)
    with_t5 = policy.text_encoder_3 is not Precision.OFF
    tokenizer_set = load_tokenizers(sources, with_t5)
    staged = ("transformer",) + TEXT_ENCODERS if runtime.offload == "stages" else ()
    clip_counter = ClipCounter() if runtime.watch_clipping else None

    def load(name):
        module, names = load_component(name, sources, policy, settings, tokenizer_set)
        if name == "transformer" and cal is not None:
            uncovered = apply_calibration(module, cal, sources.label)
            if uncovered:
                log.warning("calibration has no statistics for %d FP8 layers (dynamic scales there): %s", len(uncovered), uncovered[:5])
        if name == "transformer" and clip_counter is not None:
            for layer_name, layer in fp8_layers_of(module).items():
                layer.clip_watch = (clip_counter, layer_name)
        if name == "transformer":
            prepare_transformer(module, runtime, device, compute_dtype)
            names = list(fp8_layers_of(module))  # q/k/v may be fused now
        return module, names

    resident, fp8_layers = {}, {}
    for name in COMPONENTS:
        if name in staged or (name == "text_encoder_3" and not with_t5):
            resident[name] = None
            continue
        resident[name], fp8_layers[name] = load(name)
    pipe = StableDiffusion3Pipeline(scheduler=load_scheduler(sources), **resident, tokenizer=tokenizer_set["tokenizer"],
                                    tokenizer_2=tokenizer_set["tokenizer_2"], tokenizer_3=tokenizer_set.get("tokenizer_3"))
    if runtime.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    return {"pipe": pipe, "policy": policy, "runtime": runtime, "model_path": sources.folder or Path(sources.label),
            "compute_dtype": compute_dtype, "device": device, "backend": backend, "fp8_layers": fp8_layers,
            "recipe": model_recipe(sources, pipe), "sources": sources, "stage_loader": load if staged else None,
            "calibration": cal, "clip_counter": clip_counter,
            "context_width": transformer_config(sources, pipe, "joint_attention_dim")}


def transformer_config(sources, pipe, key: str):
    """A value of the MMDiT's config, whether the transformer is resident, staged or in a file."""
    value = sources.mmdit.mmdit_config.get(key) if sources.mmdit else None
    if value is None:
        value = (getattr(pipe.transformer.config, key) if pipe.transformer is not None
                 else schemas.transformer_config(sources.folder / "transformer" / "config.json")[key])
    return value


def model_recipe(sources, pipe):
    """Generation defaults: the folder's sd3fp8.json, else the model card's for the detected variant."""
    from sd3fp8.engine.request import read_recipe, variant_recipe

    side = transformer_config(sources, pipe, "sample_size") * pipe.vae_scale_factor
    return read_recipe(sources.folder, side) if sources.folder else variant_recipe(sources.mmdit.variant, side)
