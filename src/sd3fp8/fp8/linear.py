"""FP8Linear: an nn.Linear replacement with FP8 weights and float32 scales.

State is plain buffers (``weight`` fp8 [out, in], ``weight_scale`` f32 [] or [out], optional
``input_scale`` f32 []) so state dicts stay format-compatible. The backend is chosen once, at
construction; ``forward`` is a few flat lines per backend.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from sd3fp8.enums import ChoiceEnum
from sd3fp8.errors import ConfigError
from sd3fp8.fp8.numerics import FP8Format, Granularity, amax, amax_to_scale, decode, quantize, quantize_weight

# torch._scaled_mm on CUDA wants K and N to be multiples of 16 (the FP8 tensor-core tile).
SCALED_MM_ALIGNMENT = 16
ACTIVATION_FORMAT = FP8Format.E4M3  # e5m2 x e5m2 is rejected by _scaled_mm; e4m3 has the precision


class _DecodeWorkspace(threading.local):
    """One reused buffer per thread and dtype for the weight-only path's decoded weight.

    Layers run one after another, so one buffer sized to the largest layer serves all of them
    (Large, fp32: 142 MB). Reusing it instead of a fresh 10-140 MB allocation per call (page
    faults) took a 1536x6144 fp32 FP8 linear at M=256 from 103 to 94 ms on this CPU.
    """

    def __init__(self):
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            with torch.inference_mode(False):  # a normal tensor: writable under no_grad and inference_mode alike
                buffer = self.buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buffer


_workspace = _DecodeWorkspace()


class ClipCounter:
    """Counts scaled-mm calls whose live activations exceeded the calibrated range (input_scale x 448),
    i.e. were clipped: a calibration that does not fit the prompts shows up here, layer by layer.
    Watching costs one amax per call, the reduction static scales save, so it is opt-in."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.clipped: dict[str, int] = {}
        self.worst: dict[str, float] = {}  # largest live amax / calibrated range

    def record(self, name: str, live_amax: float, limit: float) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if live_amax > limit:
            self.clipped[name] = self.clipped.get(name, 0) + 1
            self.worst[name] = max(self.worst.get(name, 0.0), live_amax / limit)

    def report(self) -> list[dict]:
        """Clipped layers, worst first."""
        rows = [{"name": n, "clipped_calls": c, "calls": self.calls[n], "worst_ratio": self.worst[n]} for n, c in self.clipped.items()]
        return sorted(rows, key=lambda r: -r["worst_ratio"])


class Backend(ChoiceEnum, what="backend", aliases={"scaled_mm": "scaled-mm", "weight_only": "weight-only"}):
    AUTO = "auto"
    SCALED_MM = "scaled-mm"  # quantize the activation, FP8 GEMM (torch._scaled_mm)
    WEIGHT_ONLY = "weight-only"  # dequantize the weight on the fly, 16/32-bit GEMM


class ActivationScaling(ChoiceEnum, what="activation scaling"):
    """How ``scaled-mm`` scales activations when no static (calibrated) input scale is set."""

    TENSOR = "tensor"  # one dynamic amax per call
    ROW = "row"  # one dynamic amax per token (row of the [M, K] input)


def has_fp8_tensor_cores(device: torch.device | str) -> bool:
    """PyTorch's own gate for FP8 GEMMs: compute capability 8.9 (Ada) or >= 9.0 (Hopper+)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_backend(backend: str | Backend, device: torch.device | str, force_fp8: bool = False) -> Backend:
    """Pick the concrete backend for layers that will run on ``device``."""
    backend = Backend.parse(backend)
    if force_fp8:
        return Backend.SCALED_MM
    fast = has_fp8_tensor_cores(device)
    if backend is Backend.AUTO:
        return Backend.SCALED_MM if fast else Backend.WEIGHT_ONLY
    if backend is Backend.SCALED_MM and not fast:
        raise ConfigError(
            f"backend scaled-mm needs FP8 tensor cores (CUDA compute capability >= 8.9); device "
            f"{torch.device(device)} has none. Use --force-fp8 to run the slow emulated path anyway."
        )
    return backend


def scaled_mm_unsupported_reason(in_features: int, out_features: int) -> str | None:
    """Why a layer of this shape cannot use torch._scaled_mm, or None when it can."""
    bad = [f"{n}={v}" for n, v in (("in_features", in_features), ("out_features", out_features)) if v % SCALED_MM_ALIGNMENT]
    return f"{', '.join(bad)} not a multiple of {SCALED_MM_ALIGNMENT}" if bad else None


class FP8Linear(nn.Module):
    """A Linear layer whose weight is stored in FP8 with float32 scale(s).

    Build it with :meth:`from_linear`. ``backend`` is the resolved one (never ``auto``); a layer
    whose shape does not suit ``scaled-mm`` runs ``weight-only`` and says why in
    ``fallback_reason``.
    """

    # Tensors whose dtype is the storage format, not the compute dtype: Module.to(dtype) must not cast them.
    _storage_tensors = ("weight", "weight_scale", "input_scale")
    weight: torch.Tensor  # buffers and parameters, declared for type checkers (nn.Module types attributes loosely)
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: FP8Format = FP8Format.E4M3,
        granularity: Granularity = Granularity.CHANNEL,
        backend: Backend = Backend.WEIGHT_ONLY,
        activation: ActivationScaling = ActivationScaling.TENSOR,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        if backend is Backend.AUTO:
            raise ConfigError("FP8Linear needs a resolved backend; use FP8Linear.from_linear(backend='auto')")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.granularity, self.activation = fmt, granularity, activation
        self.fallback_reason = None
        if backend is Backend.SCALED_MM:
            self.fallback_reason = scaled_mm_unsupported_reason(in_features, out_features)
        self.backend = Backend.WEIGHT_ONLY if self.fallback_reason else backend
        scale_shape = (out_features,) if granularity is Granularity.CHANNEL else ()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=fmt.dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("input_scale", None)
        self.clip_watch: tuple[ClipCounter, str] | None = None  # (counter, this layer's name) when watched
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        fmt: str | FP8Format = "e4m3",
        granularity: str | Granularity = "channel",
        backend: str | Backend = "auto",
        *,
        activation: str | ActivationScaling = "tensor",
        input_scale: float | torch.Tensor | None = None,
        force_fp8: bool = False,
        device: torch.device | str | None = None,
        name: str = "linear",
    ) -> FP8Linear:
        """Quantize ``linear`` into a new FP8Linear.

        fmt: "e4m3" or "e5m2". granularity: "tensor" or "channel" (one scale per output row).
        backend: "auto" (scaled-mm on GPUs with FP8 tensor cores, else weight-only),
        "scaled-mm" or "weight-only". ``device`` is where the layer will run (default: where
        ``linear`` is); ``force_fp8`` runs scaled-mm anywhere (exact but slow on CPU).
        ``input_scale`` sets a static (calibrated) activation scale for scaled-mm.
        """
        fmt, granularity = FP8Format.parse(fmt), Granularity.parse(granularity)
        run_on = torch.device(device) if device is not None else linear.weight.device
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            fmt=fmt,
            granularity=granularity,
            backend=resolve_backend(backend, run_on, force_fp8),
            activation=ActivationScaling.parse(activation),
            device="meta",
        )
        layer.weight, layer.weight_scale = quantize_weight(linear.weight.detach(), fmt, granularity, f"{name}.weight")
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if input_scale is not None:
            layer.set_input_scale(input_scale)
        return layer

    def set_input_scale(self, scale: float | torch.Tensor | None) -> None:
        """Set (or clear, with None) the static activation scale used by scaled-mm."""
        if scale is None:
            self.input_scale = None
            return
        scale = torch.as_tensor(scale, dtype=torch.float32, device=self.weight.device).reshape(())
        if not torch.isfinite(scale) or scale <= 0:
            raise ConfigError(f"input scale must be a positive finite number, got {float(scale)}")
        self.input_scale = scale

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the layer computes with it, [out, in] in ``dtype``."""
        scale = self.weight_scale.reshape(-1, 1) if self.weight_scale.dim() else self.weight_scale
        return (self.weight.float() * scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is Backend.SCALED_MM:
            return self._forward_scaled_mm(x)
        return self._forward_weight_only(x)

    def _forward_weight_only(self, x: torch.Tensor) -> torch.Tensor:
        # The scale is applied to the [.., out] output: cheaper than scaling the [out, in] weight.
        # The shared workspace is only safe when autograd will not keep the decoded weight.
        reuse = x.device.type == "cpu" and not torch.is_grad_enabled()
        out = _workspace.get(self.weight.numel(), x.dtype) if reuse else None
        # 2-D on purpose: F.linear on a non-contiguous 3-D input without bias falls back to bmm,
        # which took 103 ms instead of ~20 ms for one SD3.5-Medium attention projection here.
        y = F.linear(x.reshape(-1, self.in_features), decode(self.weight, x.dtype, out))  # [M, N]
        scale = self.weight_scale.to(x.dtype)
        y = torch.addcmul(self.bias, y, scale) if self.bias is not None else y * scale
        return y.reshape(*x.shape[:-1], self.out_features)

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        x_2d = x.reshape(-1, self.in_features)  # [M, K]
        if self.input_scale is not None:
            x_scale = self.input_scale  # static: no amax reduction per call
            if self.clip_watch is not None:
                counter, name = self.clip_watch
                counter.record(name, float(amax(x_2d, Granularity.TENSOR)), float(x_scale) * ACTIVATION_FORMAT.max)
        elif self.activation is ActivationScaling.ROW:
            x_scale = amax_to_scale(amax(x_2d, Granularity.CHANNEL), ACTIVATION_FORMAT)  # [M, 1]
        else:
            x_scale = amax_to_scale(amax(x_2d, Granularity.TENSOR), ACTIVATION_FORMAT)  # []
        x_fp8 = quantize(x_2d, x_scale, ACTIVATION_FORMAT)
        scale_a, scale_b = x_scale, self.weight_scale
        row_wise = scale_a.numel() > 1 or scale_b.numel() > 1
        out_dtype = x.dtype
        if row_wise:
            # The row-wise form needs both scales shaped (M, 1) and (1, N); on CUDA it is built for bf16 output.
            scale_a = scale_a.reshape(-1, 1).expand(x_2d.shape[0], 1).contiguous()
            scale_b = scale_b.reshape(1, -1).expand(1, self.out_features).contiguous()
            if x.is_cuda:
                out_dtype = torch.bfloat16
        # _scaled_mm takes a bias only with a 16-bit output.
        fused_bias = self.bias is not None and out_dtype in (torch.bfloat16, torch.float16)
        y = torch._scaled_mm(
            x_fp8,
            self.weight.t(),  # column-major [K, N] view of the row-major [N, K] weight
            scale_a=scale_a,
            scale_b=scale_b,
            bias=self.bias.to(out_dtype) if fused_bias and self.bias is not None else None,
            out_dtype=out_dtype,
        )
        y = y.to(x.dtype)
        if self.bias is not None and not fused_bias:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor, float8 and the float32 scales included.
        # Storage tensors follow device moves only; the compute dtype reaches the bias alone.
        target = fn(torch.empty(0, device=self.weight.device))
        for name in self._storage_tensors:
            tensor = self._buffers.get(name)
            if tensor is not None:
                self._buffers[name] = tensor.to(device=target.device)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.data), requires_grad=False)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dtype != self.fmt.dtype:
            error_msgs.append(f"{prefix}weight: expected {self.fmt.dtype}, found {weight.dtype}")
            return
        if weight is not None:  # this layer is being loaded: its input scale is present only once calibrated
            self.set_input_scale(state_dict.get(prefix + "input_scale"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def describe(self) -> dict:
        """What this layer is: the one source for extra_repr and `sd3fp8 inspect`."""
        return {
            "format": self.fmt.value,
            "granularity": self.granularity.value,
            "backend": self.backend.value,
            "fallback": self.fallback_reason,
            "scale_shape": list(self.weight_scale.shape),
            "activation": "static" if self.input_scale is not None else self.activation.value,
        }

    def extra_repr(self) -> str:
        d = self.describe()
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fmt={d['format']}, granularity={d['granularity']}, backend={d['backend']}, scale_shape={tuple(d['scale_shape'])}"
        )
        if self.backend is Backend.SCALED_MM:
            text += f", activation={d['activation']}"
        if d["fallback"]:
            text += f", fallback=({d['fallback']})"
        return text
