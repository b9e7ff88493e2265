"""The transformer's FP8 run-time setup after loading: fast accumulation, fused q/k/v projections,
each layer's form chosen on the device (probed), and torch.compile when asked for."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from sd3fp8.fp8.compiled import compile_module, prepare_layers
from sd3fp8.fp8.fused import fuse_qkv
from sd3fp8.fp8.linear import Backend, FP8Linear
from sd3fp8.runtime import RuntimeConfig

log = logging.getLogger(__name__)


def prepare_transformer(module: nn.Module, runtime: RuntimeConfig, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """Set up ``module``'s FP8 layers to run on ``device`` as ``runtime`` says (in place)."""
    layers = [m for m in module.modules() if isinstance(m, FP8Linear)]
    for layer in layers:
        layer.fast_accum = runtime.fast_accum
    if layers and runtime.fuse_qkv != "off":
        backends = tuple(Backend) if runtime.fuse_qkv == "on" else (Backend.SCALED_MM, Backend.EMULATED)
        fused = fuse_qkv(module, backends)
        if fused:
            log.info("fused q/k/v of %d attention streams into single FP8 layers", len(fused))
    if runtime.compile:
        compile_module(module, device, compute_dtype)
    elif layers:
        forms = prepare_layers(module, device, compute_dtype)
        log.info("FP8 forms on %s: %s", device, dict(forms))
    return module


def fp8_forms(module: nn.Module | None) -> dict[str, int]:
    """How many of ``module``'s FP8 layers run each form ("unprepared": not yet run on a device)."""
    if module is None:
        return {}
    return dict(Counter(m.describe()["form"] for m in module.modules() if isinstance(m, FP8Linear)))
