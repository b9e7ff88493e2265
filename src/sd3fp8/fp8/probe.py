"""Which ``torch._scaled_mm`` forms run where: the device-capability seam, the probe and its cache.

CUDA's ``_scaled_mm`` contract depends on the GPU, the torch release and the platform (see
docs/gpu.md): row-wise scaling needs SM90 with torch >= 2.5 or SM89 with torch >= 2.7, is absent on
torch 2.4 and on Windows, and Blackwell needs torch >= 2.7 built for CUDA 12.8. Instead of a table
the engine asks the device: before the first FP8 GEMM it makes one tiny real call per form a layer
needs (row-wise or tensor-wise, weight format, output dtype, fused bias, fast accumulation), checks
the numbers against float32, and caches the answer per (platform, device).

The seam: :func:`platform_of` is the only place the engine reads the device's capability and the
torch version. :func:`simulated_platform` makes it report a given GPU and torch release, so tests run
the engine's CUDA choices on the CPU against a strict stand-in of CUDA's ``_scaled_mm``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import threading

import torch

log = logging.getLogger(__name__)

ROWWISE, TENSORWISE = "rowwise", "tensorwise"
# what _scaled_mm raises for a call it refuses: RuntimeError (TORCH_CHECK), ValueError
# (TORCH_CHECK_VALUE, torch >= 2.10), TypeError / NotImplementedError (signature, missing kernels)
PROBE_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError)


@dataclasses.dataclass(frozen=True)
class Platform:
    """What decides the ``_scaled_mm`` contract of a device."""

    device_type: str  # cuda | cpu | ...
    capability: tuple[int, int] | None  # CUDA compute capability; None off CUDA
    torch_version: tuple[int, int]
    system: str = "linux"  # linux | windows | darwin
    simulated: bool = False

    @property
    def fp8_cores(self) -> bool:
        """FP8 tensor cores: CUDA compute capability 8.9 (Ada) or >= 9.0 (Hopper, Blackwell)."""
        return self.device_type == "cuda" and self.capability is not None and tuple(self.capability) >= (8, 9)

    @property
    def is_gpu(self) -> bool:
        return self.device_type == "cuda"

    def __str__(self) -> str:
        where = f"SM{self.capability[0]}{self.capability[1]}" if self.capability else self.device_type
        return f"{where} torch {self.torch_version[0]}.{self.torch_version[1]} {self.system}" + (" (simulated)" if self.simulated else "")


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _system() -> str:
    return "windows" if sys.platform.startswith("win") else "darwin" if sys.platform == "darwin" else "linux"


_simulated: Platform | None = None


def platform_of(device: torch.device | str) -> Platform:
    """The platform a device runs on (the simulated one inside :func:`simulated_platform`)."""
    if _simulated is not None:
        return _simulated
    device = torch.device(device)
    capability: tuple[int, int] | None = None
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        capability = (major, minor)
    return Platform(device.type, capability, torch_version(), _system())


@contextlib.contextmanager
def simulated_platform(capability: tuple[int, int], version: tuple[int, int], system: str = "linux"):
    """Report a CUDA GPU of ``capability`` under torch ``version`` for every device (tests: CPU
    tensors, a GPU's choices; pair it with a stand-in for ``torch._scaled_mm``)."""
    global _simulated
    previous = _simulated
    _simulated = Platform("cuda", (capability[0], capability[1]), (version[0], version[1]), system, simulated=True)
    try:
        yield _simulated
    finally:
        _simulated = previous
        forget(simulated_only=True)


# ---- the probe -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProbeKey:
    """One ``_scaled_mm`` call shape: e4m3 activations x ``weight`` (a float8 dtype)."""

    form: str  # rowwise | tensorwise
    weight: torch.dtype
    out: torch.dtype
    bias: bool  # a fused bias in the output dtype
    fast_accum: bool

    def __str__(self) -> str:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        return f"{self.form} e4m3 x {name(self.weight)} -> {name(self.out)}{' +bias' if self.bias else ''}{' fast' if self.fast_accum else ''}"


_cache: dict[tuple[Platform, str], dict[ProbeKey, str | None]] = {}
_lock = threading.Lock()


def forget(simulated_only: bool = False) -> None:
    """Drop cached probe results (all, or only those of simulated platforms)."""
    with _lock:
        for key in [k for k in _cache if not simulated_only or k[0].simulated]:
            del _cache[key]


def call_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype, fast_accum) -> torch.Tensor:
    """``torch._scaled_mm`` by keyword (torch 2.4 takes the scales keyword-only), unwrapping 2.4's
    ``(out, amax)`` tuple."""
    out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return out[0] if isinstance(out, tuple) else out


def _probe_once(key: ProbeKey, device: torch.device) -> str | None:
    """None if a tiny call of this form runs and is right, else why not (the error text)."""
    m, k, n = 17, 32, 32  # M deliberately not a multiple of 16 (M is free in every form)
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(m, k, generator=g) * 8).to(torch.float8_e4m3fn).to(device)
    b = (torch.randn(n, k, generator=g) * 8).clamp(-448, 448).to(key.weight).to(device).t()  # column-major
    if key.form == ROWWISE:
        scale_a = (torch.rand(m, 1, generator=g) + 0.5).to(device)
        scale_b = (torch.rand(1, n, generator=g) + 0.5).to(device)
    else:
        scale_a, scale_b = torch.full((1,), 0.75, device=device), torch.full((1,), 1.25, device=device)
    bias = torch.randn(n, generator=g).to(device, key.out) if key.bias else None
    try:
        out = call_scaled_mm(a, b, scale_a, scale_b, bias, key.out, key.fast_accum)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except PROBE_ERRORS as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    expected = (a.float() * scale_a) @ (b.float() * scale_b) + (bias.float() if bias is not None else 0)
    got = out.float()
    if out.dtype != key.out or got.shape != expected.shape:
        return f"wrong result: {out.dtype} {tuple(got.shape)}"
    error = (got - expected).abs().max() / expected.abs().max().clamp_min(1e-6)
    if not torch.isfinite(got).all() or error > 2e-2:
        return f"wrong numbers (relative error {float(error):.3g})"
    return None


def normalize(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:N`` (the current device), as tensors report it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def probe(device: torch.device | str, key: ProbeKey) -> str | None:
    """Whether ``key``'s form runs on ``device``: None if it does, else the reason. Cached."""
    device = normalize(device)
    platform = platform_of(device)
    if platform.is_gpu and not platform.fp8_cores:
        return f"{platform} has no FP8 tensor cores (compute capability < 8.9)"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "cannot probe inside CUDA graph capture: run one step before capturing"  # not cached
    slot = (platform, str(device))
    with _lock:
        known = _cache.setdefault(slot, {})
        if key in known:
            return known[key]
    reason = _probe_once(key, device)
    with _lock:
        _cache[slot][key] = reason
    log.debug("probe %s on %s: %s", key, platform, reason or "runs")
    return reason


def probed(device: torch.device | str) -> dict[str, str]:
    """What has been probed on ``device``: form -> "runs" or the reason it does not."""
    device = normalize(device)
    with _lock:
        known = dict(_cache.get((platform_of(device), str(device)), {}))
    return {str(k): v or "runs" for k, v in known.items()}
