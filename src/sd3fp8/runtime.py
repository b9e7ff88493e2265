"""Where and how the model runs: device, compute dtype, backend, offload (RuntimeConfig), and
the resolution of "auto" values against the machine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sd3fp8.enums import ChoiceStrEnum
from sd3fp8.errors import ConfigError
from sd3fp8.fp8.linear import ActivationScaling, Backend
from sd3fp8.policy import Precision


class ComputeDtype(ChoiceStrEnum, what="compute dtype", aliases={"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}):
    """The dtype activations flow in (``auto``: see resolve_compute_dtype)."""

    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class Offload(ChoiceStrEnum, what="offload mode"):
    """Where components wait while another runs."""

    NONE = "none"  # every component resident on the device
    MODEL = "model"  # diffusers' model CPU offload (needs an accelerator)
    # load each stage's components when it runs and free them after: text encoders, then the
    # transformer; peak memory is the largest stage instead of the sum, at the price of loading on every call
    STAGES = "stages"


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the model runs (as opposed to how it is stored: that is the Policy)."""

    device: str = "auto"  # auto = cuda if present, else cpu
    dtype: ComputeDtype = ComputeDtype.AUTO
    backend: Backend = Backend.AUTO
    force_fp8: bool = False  # run scaled-mm even without FP8 tensor cores (slow on CPU; for testing)
    activation: ActivationScaling = ActivationScaling.TENSOR
    offload: Offload = Offload.NONE
    watch_clipping: bool = False  # count scaled-mm calls clipped by static (calibrated) input scales
    compile: bool = False  # torch.compile the transformer (inductor: fused quantization, fused epilogues)
    fast_accum: bool = True  # _scaled_mm's use_fast_accum (torchao's inference default); off: full-precision accumulation
    # fuse each attention's q/k/v FP8 layers into one (one activation quantization instead of three):
    # auto = where the layers quantize activations (scaled-mm, emulated), on = all FP8 layers, off
    fuse_qkv: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "backend", Backend.parse(self.backend))
        object.__setattr__(self, "activation", ActivationScaling.parse(self.activation))
        object.__setattr__(self, "dtype", ComputeDtype.parse(self.dtype))
        object.__setattr__(self, "offload", Offload.parse(self.offload))
        if self.fuse_qkv not in ("auto", "on", "off"):
            raise ConfigError(f"unknown fuse_qkv {self.fuse_qkv!r}: expected auto, on or off")
        if self.compile and self.offload is Offload.STAGES:
            raise ConfigError("--compile with --offload stages would recompile the transformer for every image: use --offload none or model")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matmul instructions (AVX512-BF16 or AMX).

    Without them bf16 GEMMs are emulated: 6x slower than fp32 on this machine (AMD EPYC, AVX2).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_compute_dtype(name: ComputeDtype | str, device: torch.device, transformer: Precision = Precision.FP8_E4M3) -> torch.dtype:
    """The dtype activations flow in.

    A 16/32-bit transformer runs in its own dtype (that is what a "bf16 baseline" means). With
    FP8 weights: bf16 by default, fp32 on CPUs that would emulate bf16.
    """
    name = ComputeDtype.parse(name)
    if transformer.is_fp8 or transformer is Precision.AUTO:
        if name != "auto":
            return DTYPES[name]
        if device.type == "cpu" and not cpu_has_native_bf16():
            return torch.float32
        return torch.bfloat16
    own = transformer.storage_dtype(torch.float32)
    if name != "auto" and DTYPES[name] != own:
        raise ConfigError(f"precision {transformer.value} runs the transformer in {transformer.value}; --dtype {name} contradicts it")
    return own
