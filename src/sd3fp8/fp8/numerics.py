"""FP8 formats and the pure numerics of scaled FP8 quantization.

Formats follow the OCP 8-bit floating point specification (arXiv 2209.05433). The scale
convention is the dequantizing one used by ``torch._scaled_mm``: ``x ~= stored * scale`` with
``scale = amax / format_max`` held in float32.
"""

from __future__ import annotations

import functools

import torch

from sd3fp8.enums import ChoiceEnum
from sd3fp8.errors import ConfigError, NonFiniteWeightError

# other spellings of the two formats: fp8-e4m3, e4m3fn, float8_e4m3fn (torch's dtype name), ...
_FORMAT_ALIASES = {f"{prefix}{name}{suffix}": name for name in ("e4m3", "e5m2") for prefix in ("", "fp8-", "fp8_", "float8_")
                   for suffix in (("", "fn") if name == "e4m3" else ("",)) if f"{prefix}{name}{suffix}" != name}


class FP8Format(ChoiceEnum, what="FP8 format", aliases=_FORMAT_ALIASES):
    """The two OCP FP8 encodings torch supports."""

    E4M3 = "e4m3"  # float8_e4m3fn: no inf, one NaN code per sign, max 448
    E5M2 = "e5m2"  # float8_e5m2: IEEE-like, inf and NaNs, max 57344

    @property
    def dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self is FP8Format.E4M3 else torch.float8_e5m2

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @classmethod
    def from_dtype(cls, dtype: torch.dtype) -> FP8Format:
        for fmt in cls:
            if fmt.dtype == dtype:
                return fmt
        raise ConfigError(f"{dtype} is not an FP8 dtype this engine supports (float8_e4m3fn, float8_e5m2)")


class Granularity(ChoiceEnum, what="scale granularity"):
    """How many scales a weight carries."""

    TENSOR = "tensor"  # one scale for the whole tensor
    CHANNEL = "channel"  # one scale per output channel (row of an [out, in] weight)
    NONE = "none"  # no scale: a plain cast (value = stored number), what naive fp8 checkpoints do


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


# Smallest magnitude byte (sign bit cleared) that is not a finite number: e4m3fn has NaN only
# (S.1111.111), e5m2 has Inf at S.11111.00 and NaN above it.
_FP8_NONFINITE_FROM = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def fp8_all_finite(tensor: torch.Tensor) -> bool:
    """Whether an FP8 tensor holds only finite values, read from its bytes (no float conversion:
    checking an 8 GB FP8 checkpoint through float32 copies cost more than loading it)."""
    if tensor.numel() == 0:
        return True
    # one max over the magnitudes: 4 ms for a 2432x9728 weight here, 7x faster than compare + any()
    return int((tensor.view(torch.uint8) & 0x7F).max()) < _FP8_NONFINITE_FROM[tensor.dtype]


def all_finite(tensor: torch.Tensor, chunk: int = 2**24) -> bool:
    """No NaN/Inf in ``tensor`` (FP8 read from bytes). Checked in chunks: isfinite on a bf16 tensor
    makes float32 and bool copies of it, 1.1 GB for SD3.5 Medium's pos-embed buffer at once."""
    if is_fp8(tensor.dtype):
        return fp8_all_finite(tensor)
    if not tensor.is_floating_point():
        return True
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(chunk))


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise if ``tensor`` holds NaN or Inf: a scale derived from it would poison every value."""
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteWeightError(f"tensor {name!r} has {bad} NaN/Inf value(s); refusing to quantize it")


def amax(tensor: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Absolute maximum in float32: shape [] per tensor, [rows, 1] per channel."""
    t = tensor.detach().abs().float()
    if granularity is Granularity.TENSOR:
        return t.amax()
    return t.amax(dim=-1, keepdim=True)


def amax_to_scale(amax_value: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """Dequantizing scale ``amax / max`` in float32.

    An all-zero tensor (or row) gets scale 1: any scale reproduces zeros exactly, and 1 keeps
    the division in :func:`quantize` finite.
    """
    scale = amax_value.float() / fmt.max
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(tensor: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """Round ``tensor / scale`` to FP8, saturating at the format's max.

    The clamp comes first because casts do not saturate on every stack (e5m2 overflows to inf
    on this CPU build; some CUDA paths give NaN for e4m3).
    """
    scaled = tensor.float() / scale
    return scaled.clamp(-fmt.max, fmt.max).to(fmt.dtype)


def dequantize(tensor_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``stored * scale`` computed in float32, returned in ``dtype``."""
    return (tensor_fp8.float() * scale).to(dtype)


def quantize_weight(
    weight: torch.Tensor, fmt: FP8Format, granularity: Granularity, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D [out, in] weight: returns (weight_fp8, scale_fp32).

    The scale is [] per tensor and [out] per channel, the shapes stored in checkpoints. Same math
    as ``quantize(weight, amax_to_scale(amax(weight)))`` in fewer passes over memory (one float32
    copy, scaled and clamped in place; NaN/Inf show up in the min/max), which is what bounds
    `sd3fp8 quantize`'s throughput.
    """
    w = weight.detach().to(torch.float32, copy=True)
    lo, hi = torch.aminmax(w) if granularity is not Granularity.CHANNEL else torch.aminmax(w, dim=-1, keepdim=True)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        check_finite(weight, name)  # names the count of bad values
    if granularity is Granularity.NONE:
        scale = torch.ones((), dtype=torch.float32, device=weight.device)
    else:
        scale = amax_to_scale(torch.maximum(lo.abs(), hi.abs()), fmt)  # [] or [out, 1]
        w.div_(scale)
    weight_fp8 = w.clamp_(-fmt.max, fmt.max).to(fmt.dtype)
    return weight_fp8, scale.reshape(-1) if granularity is Granularity.CHANNEL else scale


@functools.cache
def decode_table(fmt: FP8Format, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """The value of each of the 256 codes, in ``dtype``: a 256-entry lookup table.

    Every E4M3 and E5M2 value is exact in bfloat16, float16 and float32, so the table is exact.
    """
    codes = torch.arange(256, dtype=torch.uint8).view(fmt.dtype)
    return codes.float().to(dtype=dtype, device=device)


@functools.cache
def pair_decode_table(fmt: FP8Format, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """A [65536, 2] table decoding two adjacent codes at once (indexed by their uint16 bits).

    Cached (a constant per format, dtype and device; 256 KiB in bf16) so every layer shares it.
    """
    single = decode_table(fmt, dtype, device)
    pairs = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(-1, 2)
    return single[pairs.to(device).long()].contiguous()


def decode(tensor_fp8: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Unscaled FP8 -> ``dtype`` through a lookup table, optionally into a reused ``out`` buffer.

    Measured on this CPU (2 cores, AVX2) for a 1536x1536 weight: ``.to(bfloat16)`` 7.2 ms,
    a 256-entry gather 6.8 ms, the pair table 3.2 ms (a GEMM at M=256 takes 18 ms). ``out``
    (at least ``numel`` elements of ``dtype``) saves the page faults of a fresh large allocation.
    """
    fmt = FP8Format.from_dtype(tensor_fp8.dtype)
    if tensor_fp8.device.type != "cpu":
        return tensor_fp8.to(dtype)  # GPUs convert in registers; tables only pay off on CPUs
    numel = tensor_fp8.numel()
    if tensor_fp8.shape[-1] % 2 or not tensor_fp8.is_contiguous():
        table = decode_table(fmt, dtype)
        return table[tensor_fp8.view(torch.uint8).long()]
    index = tensor_fp8.view(torch.uint16).reshape(-1).int()  # [numel/2], the bits of two codes
    flat = None if out is None else out.reshape(-1)[:numel].view(-1, 2)
    pairs = torch.index_select(pair_decode_table(fmt, dtype), 0, index, out=flat)  # [numel/2, 2]
    return pairs.view(tensor_fp8.shape)


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; inf when exact)."""
    ref = reference.detach().double()
    noise = (ref - approximation.detach().double()).pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).mean() / noise))
