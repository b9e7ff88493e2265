"""sd3fp8: FP8 inference for Stable Diffusion 3.5 (MMDiT) on PyTorch."""

from .errors import ConfigError, ModelLoadError, NonFiniteWeightError, SD3FP8Error
from .fp8 import FP8Format, Granularity
from .linear import ActivationScaling, Backend, FP8Linear
from .pipeline import GenerationResult, RuntimeConfig, SD3FP8Pipeline
from .policy import Policy, Precision
from .swap import quantize_linears

__version__ = "0.1.0"

__all__ = [
    "ActivationScaling",
    "Backend",
    "ConfigError",
    "FP8Format",
    "FP8Linear",
    "GenerationResult",
    "Granularity",
    "ModelLoadError",
    "NonFiniteWeightError",
    "Policy",
    "Precision",
    "RuntimeConfig",
    "SD3FP8Error",
    "SD3FP8Pipeline",
    "quantize_linears",
]
