"""Random-weight MMDiTs at SD3.5 width for benchmarks, built without ever holding the 16/32-bit model.

The blocks are made on the meta device and materialized one module at a time on the CPU: a layer
that becomes FP8 gets its float32 weights, is quantized and released before the next is drawn, so
peak memory is the stored model plus one layer (building SD3.5 Large in float32 first would take
32 GB, and building it on the GPU in bf16 first, as bench once did, inflated the GPU's peak memory).
Weights follow nn.Linear's default initialization from a seeded generator, so every process builds
the same model whatever its storage.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sd3fp8.evalkit.metrics import module_bytes

if TYPE_CHECKING:
    from sd3fp8.evalkit.bench import BenchSpec

SYNTHETIC_HEADS = {"medium": 24, "large": 38}  # x 64 = width


def synthetic_config(kind: str, blocks: int, height: int) -> dict:
    heads = SYNTHETIC_HEADS[kind]
    return dict(num_layers=blocks, num_attention_heads=heads, attention_head_dim=64, joint_attention_dim=4096,
                caption_projection_dim=64 * heads, pooled_projection_dim=2048, pos_embed_max_size=96,
                sample_size=height // 8, qk_norm="rms_norm")


def _draw_linear(linear: nn.Linear, g: torch.Generator) -> nn.Linear:
    """A float32 CPU copy of ``linear`` (meta) with nn.Linear's default init: U(+-1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(linear.in_features)
    real = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    real.weight = nn.Parameter(torch.empty(linear.out_features, linear.in_features).uniform_(-bound, bound, generator=g), requires_grad=False)
    if linear.bias is not None:
        real.bias = nn.Parameter(torch.empty(linear.out_features).uniform_(-bound, bound, generator=g), requires_grad=False)
    return real


def build_synthetic(kind: str, blocks: int, height: int, dtype: torch.dtype,
                    to_fp8: Callable[[str, nn.Linear], nn.Module] | None = None, keep: Callable[[str], bool] = lambda name: False,
                    seed: int = 0) -> nn.Module:
    """An SD3 MMDiT of ``kind``'s width on the CPU, ``blocks`` deep; its non-FP8 tensors in ``dtype``.

    ``to_fp8(name, float32 linear)`` makes the module that replaces each linear ``keep`` selects.
    """
    from diffusers import SD3Transformer2DModel

    config = synthetic_config(kind, blocks, height)
    torch.manual_seed(seed)
    edges: nn.Module = SD3Transformer2DModel(**{**config, "num_layers": 0})  # type: ignore[assignment]  # a ModelMixin is an nn.Module  # embedders, pos-embed buffer, final layer: small
    with torch.device("meta"):
        model: nn.Module = SD3Transformer2DModel(**config)  # type: ignore[assignment]
    for name, child in edges.named_children():
        if name != "transformer_blocks":
            setattr(model, name, child)
    g = torch.Generator().manual_seed(seed + 1)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.weight.is_meta:
            real = _draw_linear(module, g)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, to_fp8(name, real) if to_fp8 is not None and keep(name) else real.to(dtype))
        elif not isinstance(module, nn.Linear):
            for pname, p in list(module.named_parameters(recurse=False)):
                if p.is_meta:  # norms: weight 1, bias 0
                    value = torch.ones(p.shape) if pname == "weight" else torch.zeros(p.shape)
                    setattr(module, pname, nn.Parameter(value, requires_grad=False))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(dtype).eval()  # the embedders and norms; FP8Linear keeps its storage dtypes


def run_synthetic_config(name: str, spec: BenchSpec) -> dict:
    """The transformer alone at SD3.5 width: random weights (seeded), one input, forward timed. FP8
    models are quantized layer by layer on the CPU, then moved (never 16-bit on the device first)."""
    from sd3fp8.engine.fastpath import prepare_transformer
    from sd3fp8.errors import ConfigError
    from sd3fp8.evalkit.bench import CallTimer, peak_memory_bytes, reset_peak_memory
    from sd3fp8.evalkit.configs import parse_configuration, route_layers
    from sd3fp8.evalkit.routes import apply_route
    from sd3fp8.fp8.linear import FP8Linear, resolve_backend
    from sd3fp8.policy import Policy, Precision
    from sd3fp8.runtime import DTYPES, RuntimeConfig, resolve_compute_dtype, resolve_device

    config = parse_configuration(name)
    if not config.transformer_only:
        raise ConfigError(f"{name} is not available for synthetic transformers (no text encoders, nothing to calibrate on)")
    base = spec.base_policy() or Policy()
    policy, runtime = base.replace(**config.policy), RuntimeConfig(**config.runtime)
    device = resolve_device(runtime.device)
    compute = resolve_compute_dtype(runtime.dtype, device, policy.transformer)
    width, height = spec.width or 512, spec.height or 512
    fp8 = policy.transformer.is_fp8
    storage = compute if policy.transformer is Precision.AUTO or fp8 else DTYPES[policy.transformer.value]
    keep = policy.layer_filter("transformer") if fp8 else route_layers(base)
    backend = resolve_backend(runtime.backend, device, runtime.force_fp8)
    to_fp8 = (lambda n, linear: FP8Linear.from_linear(linear, policy.transformer.fp8_format, policy.granularity, backend, name=n,
                                                      activation=runtime.activation, fast_accum=runtime.fast_accum)) if fp8 else None
    start = time.perf_counter()
    reset_peak_memory(device)
    model = build_synthetic(spec.synthetic or "medium", spec.blocks, height, storage, to_fp8, keep).to(device)
    if config.route is not None and not fp8:
        apply_route(config.route, model, keep, compute)
    if fp8 or runtime.compile:
        prepare_transformer(model, runtime, device, compute)
    load_seconds, load_peak = time.perf_counter() - start, peak_memory_bytes(device)
    g = torch.Generator().manual_seed(1)
    latent = height // 8, width // 8
    inputs = dict(hidden_states=torch.randn(1, 16, *latent, generator=g), encoder_hidden_states=torch.randn(1, 333, 4096, generator=g),
                  pooled_projections=torch.randn(1, 2048, generator=g), timestep=torch.tensor([500.0]))
    inputs = {k: v.to(device, compute if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    timer = CallTimer(model, device)
    with torch.inference_mode():
        out = model(**inputs).sample  # warm-up
        timer.times.clear()
        reset_peak_memory(device)
        for _ in range(spec.repeats):
            out = model(**inputs).sample
    Path(spec.out, "raw").mkdir(parents=True, exist_ok=True)
    torch.save(out.float().cpu(), Path(spec.out, "raw", f"{name}.pt"))
    return {
        "load_seconds": load_seconds, "seconds_per_step": statistics.median(timer.times),
        "transformer_seconds_per_call": statistics.median(timer.times), "seconds_per_image": None,
        "peak_memory_bytes": peak_memory_bytes(device), "load_peak_memory_bytes": load_peak,
        "bytes": {"transformer": module_bytes(model)},
        "compute_dtype": str(compute).removeprefix("torch."), "device": str(device),
    }
