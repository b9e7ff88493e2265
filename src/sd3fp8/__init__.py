"""sd3fp8: FP8 inference for Stable Diffusion 3.5 (MMDiT) on PyTorch.

The public API, importable from here; each name is loaded on first use, so importing the package
(and starting the CLI) does not import torch:

    from sd3fp8 import SD3FP8Pipeline, Policy, RuntimeConfig, FP8Linear, quantize_file

Where things live: ``fp8/`` (numerics, FP8Linear, swap, calibration statistics), ``io/`` (files),
``engine/`` (the pipeline), ``evalkit/`` (metrics, eval, bench), ``miniature/`` (the bundled model),
``cli/`` (the command line).
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0.dev0"

# public name -> module that defines it
_EXPORTS = {
    "SD3FP8Error": "sd3fp8.errors",
    "ConfigError": "sd3fp8.errors",
    "ModelLoadError": "sd3fp8.errors",
    "NonFiniteWeightError": "sd3fp8.errors",
    "FP8Format": "sd3fp8.fp8.numerics",
    "Granularity": "sd3fp8.fp8.numerics",
    "ActivationScaling": "sd3fp8.fp8.linear",
    "Backend": "sd3fp8.fp8.linear",
    "FP8Linear": "sd3fp8.fp8.linear",
    "quantize_linears": "sd3fp8.fp8.swap",
    "Calibration": "sd3fp8.fp8.calibration",
    "Policy": "sd3fp8.policy",
    "Precision": "sd3fp8.policy",
    "RuntimeConfig": "sd3fp8.runtime",
    "SD3FP8Pipeline": "sd3fp8.engine.pipeline",
    "GenerationResult": "sd3fp8.engine.pipeline",
    "QuantizeOptions": "sd3fp8.io.quantize",
    "quantize_file": "sd3fp8.io.quantize",
    "load_transformer": "sd3fp8.io.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sd3fp8' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
