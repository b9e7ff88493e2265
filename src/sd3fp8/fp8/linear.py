"""FP8Linear: an nn.Linear replacement with FP8 weights and float32 scales.

State is plain buffers (``weight`` fp8 [out, in], ``weight_scale`` f32 [] or [out], optional
``input_scale`` f32 []) so state dicts stay format-compatible. The backend is chosen at
construction; a scaled-mm layer picks its form (row-wise, tensor-wise, tensor-wise + rescale) from
what the device was probed to run (:mod:`sd3fp8.fp8.forms`), before its first GEMM on a device, and
steps down a form if ``_scaled_mm`` refuses a call at run time.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from sd3fp8.enums import ChoiceEnum
from sd3fp8.errors import ConfigError
from sd3fp8.fp8 import forms
from sd3fp8.fp8.forms import ACTIVATION_FORMAT, EMULATED_PLAN, WEIGHT_ONLY_PLAN, Form, Plan, ScaledMMFailed
from sd3fp8.fp8.numerics import FP8Format, Granularity, quantize_weight
from sd3fp8.fp8.probe import normalize, platform_of

__all__ = ["ACTIVATION_FORMAT", "ActivationScaling", "Backend", "ClipCounter", "FP8Linear", "Form", "resolve_backend"]

# torch._scaled_mm on CUDA wants K and N to be multiples of 16 (the FP8 tensor-core tile).
SCALED_MM_ALIGNMENT = 16
log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()  # (form, error) pairs already reported: one warning each


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
    EMULATED = "emulated"  # W8A8 numerics without FP8 cores: quantized activation, 16/32-bit GEMM


class ActivationScaling(ChoiceEnum, what="activation scaling"):
    """How ``scaled-mm`` scales activations when no static (calibrated) input scale is set."""

    TENSOR = "tensor"  # one dynamic amax per call
    ROW = "row"  # one dynamic amax per token (row of the [M, K] input)


def has_fp8_tensor_cores(device: torch.device | str) -> bool:
    """PyTorch's own gate for FP8 GEMMs: compute capability 8.9 (Ada) or >= 9.0 (Hopper+)."""
    return platform_of(device).fp8_cores


def resolve_backend(backend: str | Backend, device: torch.device | str, force_fp8: bool = False) -> Backend:
    """Pick the concrete backend for layers that will run on ``device``.

    ``force_fp8`` asks for W8A8 numerics anywhere: the FP8 GEMM where ``_scaled_mm`` exists (the
    CPU kernel on a CPU), emulated on GPUs without FP8 cores, whose ``_scaled_mm`` refuses every call.
    """
    backend = Backend.parse(backend)
    platform = platform_of(device)
    if force_fp8 or backend is Backend.EMULATED:
        return Backend.EMULATED if backend is Backend.EMULATED or (platform.is_gpu and not platform.fp8_cores) else Backend.SCALED_MM
    if backend is Backend.AUTO:
        return Backend.SCALED_MM if platform.fp8_cores else Backend.WEIGHT_ONLY
    if backend is Backend.SCALED_MM and not platform.fp8_cores:
        raise ConfigError(
            f"backend scaled-mm needs FP8 tensor cores (CUDA compute capability >= 8.9); device "
            f"{torch.device(device)} has none. Use --force-fp8 to run W8A8 anyway (emulated on such GPUs, slow on CPUs)."
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
    parts: list[int] | None = None  # a fused q/k/v layer: its parts' output widths (fp8/fused.py)

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
        fast_accum: bool = True,
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
        # use_fast_accum: what torchao's FP8 inference config does by default; the CPU kernel ignores it
        self.fast_accum = fast_accum
        fixed = {Backend.WEIGHT_ONLY: WEIGHT_ONLY_PLAN, Backend.EMULATED: EMULATED_PLAN}
        self.plan: Plan | None = fixed.get(self.backend)  # scaled-mm: chosen on the device (prepare)
        self._planned_for: tuple | None = None  # (device, compute dtype) the plan was chosen for
        self._failed: frozenset = frozenset()  # probe keys that failed at run time in this layer
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
        fast_accum: bool = True,
    ) -> FP8Linear:
        """Quantize ``linear`` into a new FP8Linear.

        fmt: "e4m3" or "e5m2". granularity: "tensor" or "channel" (one scale per output row).
        backend: "auto" (scaled-mm on GPUs with FP8 tensor cores, else weight-only),
        "scaled-mm", "weight-only" or "emulated". ``device`` is where the layer will run (default:
        where ``linear`` is); ``force_fp8`` runs W8A8 anywhere (scaled-mm; emulated on GPUs without
        FP8 cores; exact but slow on CPU).
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
            fast_accum=fast_accum,
        )
        layer.weight, layer.weight_scale = quantize_weight(linear.weight.detach(), fmt, granularity, f"{name}.weight")
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if input_scale is not None:
            layer.set_input_scale(input_scale)
        return layer

    def set_input_scale(self, scale: float | torch.Tensor | None) -> None:
        """Set (or clear, with None) the static activation scale used by scaled-mm."""
        if self.backend is Backend.SCALED_MM:
            self.plan = None  # static or dynamic scales may need another form: chosen again at the next call
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
        # 2-D on purpose: F.linear on a non-contiguous 3-D input without bias falls back to bmm,
        # which took 103 ms instead of ~20 ms for one SD3.5-Medium attention projection here.
        y = self._forward_2d(x.reshape(-1, self.in_features))  # [M, K] -> [M, N]
        return y.reshape(*x.shape[:-1], self.out_features)

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.plan is not None:
            return self._run(self.plan, x)  # planned before compiling (prepare); no fallback inside a graph
        if self.plan is None or (self.plan.key is not None and self._planned_for != (x.device, x.dtype)):
            self.prepare(x.device, x.dtype)
        while True:
            plan = self.plan
            assert plan is not None  # prepare() always leaves one
            try:
                return self._run(plan, x)
            except ScaledMMFailed as e:  # one step down the ladder for this layer; never fails a generation
                self._fall_back(e, x)

    def _run(self, plan: Plan, x: torch.Tensor) -> torch.Tensor:
        if plan.form is Form.WEIGHT_ONLY:
            return forms.weight_only(self, x)
        if plan.form is Form.EMULATED:
            return forms.emulated(self, x)
        return forms.scaled_mm(self, plan, x)

    def prepare(self, device: torch.device | str, compute_dtype: torch.dtype) -> Plan:
        """Choose this layer's form for ``device`` and ``compute_dtype`` (probing the device once)."""
        device = normalize(device)
        if self.backend is Backend.SCALED_MM:
            self.plan = forms.choose(self, device, compute_dtype, self._failed)
            self._planned_for = (device, compute_dtype)
        assert self.plan is not None  # fixed at construction for the other backends
        return self.plan

    def _fall_back(self, error: ScaledMMFailed, x: torch.Tensor) -> None:
        failed = self.plan
        assert failed is not None
        self._failed = self._failed | {failed.key}
        now = self.prepare(x.device, x.dtype)
        message = str(error).splitlines()[0]
        if (failed.form.value, message) not in _logged:
            _logged.add((failed.form.value, message))
            log.warning("torch._scaled_mm refused %s (%s); falling back to %s for this layer (and any other it refuses)",
                        failed.key, message, now.form.value)

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
            "form": self.plan.form.value if self.plan is not None else "unprepared",
            "form_note": self.plan.note if self.plan is not None else None,
        }

    def extra_repr(self) -> str:
        d = self.describe()
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fmt={d['format']}, granularity={d['granularity']}, backend={d['backend']}, scale_shape={tuple(d['scale_shape'])}"
        )
        if self.backend is not Backend.WEIGHT_ONLY:
            text += f", activation={d['activation']}, form={d['form']}"
        if d["fallback"]:
            text += f", fallback=({d['fallback']})"
        return text
