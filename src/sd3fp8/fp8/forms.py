"""How an FP8Linear computes: the forms, the choice among them, and each form's forward.

Forms, best first (a layer whose weight scale is per channel, or whose activations are scaled per
token, needs a "row" form; a per-tensor layer needs only tensor-wise scales):

- ``rowwise``: one FP8 GEMM with both scale vectors (and the bias) in its epilogue.
- ``tensorwise``: one FP8 GEMM with scalar scales (and the bias) in its epilogue.
- ``tensorwise+rescale``: a tensor-wise FP8 GEMM into float32, then the per-channel weight scale
  (and a per-token activation scale) applied to its output and the bias added: exact, since
  ``y[m, n] = s_x[m] * s_w[n] * sum_k xq[m, k] * wq[n, k]``. What runs where row-wise does not
  (SM89 before torch 2.7, Blackwell, torch 2.4, Windows) and what e5m2 weights need (row-wise
  wants an e4m3 weight everywhere).
- ``emulated``: W8A8 numerics without FP8 tensor cores (GPUs below CC 8.9, ``--force-fp8``):
  quantize the activation to e4m3, GEMM over the dequantized operands in the compute dtype.
- ``weight-only``: decode the FP8 weight, 16/32-bit GEMM.

Every ``_scaled_mm`` form is probed on the device before a layer uses it (:mod:`sd3fp8.fp8.probe`).
"""

from __future__ import annotations

import dataclasses
import enum
import threading

import torch
import torch.nn.functional as F

from sd3fp8.fp8.numerics import FP8Format, Granularity, amax, amax_to_scale, decode, quantize
from sd3fp8.fp8.probe import PROBE_ERRORS, ROWWISE, TENSORWISE, ProbeKey, call_scaled_mm, platform_of, probe

ACTIVATION_FORMAT = FP8Format.E4M3  # e5m2 x e5m2 is rejected by _scaled_mm; e4m3 has the precision
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


class Form(enum.Enum):
    ROWWISE = "rowwise"
    TENSORWISE = "tensorwise"
    RESCALED = "tensorwise+rescale"
    EMULATED = "emulated"
    WEIGHT_ONLY = "weight-only"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A layer's chosen form; ``key`` is the probed ``_scaled_mm`` call it makes, ``note`` why a
    better form was not taken."""

    form: Form
    out_dtype: torch.dtype | None = None
    fused_bias: bool = False
    key: ProbeKey | None = None
    note: str | None = None


WEIGHT_ONLY_PLAN = Plan(Form.WEIGHT_ONLY)
EMULATED_PLAN = Plan(Form.EMULATED)


class ScaledMMFailed(RuntimeError):
    """``torch._scaled_mm`` refused a call at run time (wraps CUDA's RuntimeError/ValueError)."""


def per_token(layer) -> bool:
    """Dynamic activation scales per token (row of the [M, K] input)."""
    return layer.input_scale is None and layer.activation.value == "row"


def needs_row_form(layer) -> bool:
    return layer.weight_scale.numel() > 1 or per_token(layer)


def candidates(layer, compute: torch.dtype) -> list[Plan]:
    """The ``_scaled_mm`` plans that would serve ``layer`` at ``compute`` dtype, best first."""
    weight, fast, bias = layer.weight.dtype, layer.fast_accum, layer.bias is not None
    plans = []

    def add(form: Form, probe_form: str, out: torch.dtype):
        fused = bias and out in SIXTEEN_BIT and form is not Form.RESCALED  # the rescale comes after the GEMM
        plan = Plan(form, out, fused, ProbeKey(probe_form, weight, out, fused, fast))
        if plan not in plans:
            plans.append(plan)

    if needs_row_form(layer):
        # CUDA's row-wise kernel writes bf16 only (torch <= 2.9): the compute dtype where it works (CPU), else bf16
        for out in (compute, torch.bfloat16):
            add(Form.ROWWISE, ROWWISE, out)
        # float32 out: the unscaled product overflows fp16 (|xq * wq| <= 448^2 per term, K terms)
        for out in (torch.float32, torch.bfloat16):
            add(Form.RESCALED, TENSORWISE, out)
    else:
        for out in (compute, torch.bfloat16, torch.float32):
            add(Form.TENSORWISE, TENSORWISE, out)
    return plans


def choose(layer, device: torch.device, compute: torch.dtype, exclude: frozenset = frozenset()) -> Plan:
    """The best plan whose ``_scaled_mm`` call the device runs (probed); weight-only if none does."""
    notes: list[str] = []
    for plan in candidates(layer, compute):
        if plan.key is None or plan.key in exclude:
            continue
        reason = probe(device, plan.key)
        if reason is None:
            return dataclasses.replace(plan, note="; ".join(notes) or None)
        notes.append(f"{plan.key}: {reason}")
    first = notes[0] if notes else "every form failed at run time"
    return Plan(Form.WEIGHT_ONLY, note=f"no FP8 GEMM form runs on {platform_of(device)} ({first})")


# ---- the forms' forwards ([M, K] in, [M, N] out in the input's dtype) ------------------------

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


def decoded_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The unscaled FP8 weight in ``dtype`` [N, K]: a plain cast when compiled (inductor fuses it),
    else the pair-table decode, into the shared workspace on a CPU without autograd."""
    if torch.compiler.is_compiling():
        return layer.weight.to(dtype)
    reuse = layer.weight.device.type == "cpu" and not torch.is_grad_enabled()
    out = _workspace.get(layer.weight.numel(), dtype) if reuse else None
    return decode(layer.weight, dtype, out)


def _scaled_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The decoded weight with its scale folded in. For fp16: applying the scale after the GEMM
    lets the unscaled product overflow (e4m3, input std 10: 28 % inf); folded, the weight holds its
    own values (the multiply runs in float32, rounded to fp16 once)."""
    w = decoded_weight(layer, dtype)
    scale = layer.weight_scale.reshape(-1, 1) if layer.weight_scale.dim() else layer.weight_scale
    return w * scale if torch.compiler.is_compiling() else w.mul_(scale)


def _add_scale_bias(layer, y: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return y if layer.bias is None else y + layer.bias.to(y.dtype)
    scale = scale.to(y.dtype)
    return torch.addcmul(layer.bias.to(y.dtype), y, scale) if layer.bias is not None else y * scale


def weight_only(layer, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float16:
        return _add_scale_bias(layer, F.linear(x, _scaled_weight(layer, x.dtype)), None)
    # bf16 / fp32: the scale is applied to the [M, N] output, cheaper than scaling the [N, K] weight
    return _add_scale_bias(layer, F.linear(x, decoded_weight(layer, x.dtype)), layer.weight_scale)


def quantize_input(layer, x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in e4m3, its float32 scale: [] per tensor or static, [M, 1] per row)."""
    if layer.input_scale is not None:
        scale = layer.input_scale  # static: no amax reduction per call
        if layer.clip_watch is not None and not torch.compiler.is_compiling():
            counter, name = layer.clip_watch
            counter.record(name, float(amax(x, Granularity.TENSOR)), float(scale) * ACTIVATION_FORMAT.max)
    else:
        scale = amax_to_scale(amax(x, Granularity.CHANNEL if per_row else Granularity.TENSOR), ACTIVATION_FORMAT)
    return quantize(x, scale, ACTIVATION_FORMAT), scale


def emulated(layer, x: torch.Tensor) -> torch.Tensor:
    """W8A8 without FP8 cores: the same quantized operands as scaled-mm, multiplied in x's dtype."""
    xq, x_scale = quantize_input(layer, x, per_token(layer))
    if x.dtype == torch.float16:  # fold both scales into the operands: no unscaled fp16 product
        x_hat = (xq.float() * x_scale).to(x.dtype)
        return _add_scale_bias(layer, F.linear(x_hat, _scaled_weight(layer, x.dtype)), None)
    y = F.linear(xq.to(x.dtype), decoded_weight(layer, x.dtype))  # e4m3 codes are exact in bf16 and fp32
    return _add_scale_bias(layer, y, x_scale * layer.weight_scale)  # [M, 1] x [N] or [] x [N]


def scaled_mm(layer, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """One FP8 GEMM in the plan's form; a refusal raises :class:`ScaledMMFailed`."""
    xq, x_scale = quantize_input(layer, x, per_token(layer))
    m, n = x.shape[0], layer.out_features
    w_scale = layer.weight_scale
    post = None  # scales applied to the output (tensorwise+rescale)
    if plan.form is Form.ROWWISE:  # (M, 1) and (1, N), both contiguous
        scale_a = x_scale.reshape(-1, 1).expand(m, 1).contiguous()
        scale_b = w_scale.reshape(1, -1).expand(1, n).contiguous()
    elif plan.form is Form.TENSORWISE:  # shaped [1]: 0-D scales trip torch.compile's lowering (vLLM)
        scale_a, scale_b = x_scale.reshape(1), w_scale.reshape(1)
    else:
        one = torch.ones(1, dtype=torch.float32, device=x.device)
        scale_a = x_scale.reshape(1) if x_scale.numel() == 1 else one
        scale_b = w_scale.reshape(1) if w_scale.numel() == 1 else one
        post = [s for s in (x_scale if x_scale.numel() > 1 else None, w_scale if w_scale.numel() > 1 else None) if s is not None]
    bias = layer.bias.to(plan.out_dtype) if plan.fused_bias else None
    if torch.compiler.is_compiling():  # planned and probed before compiling; no fallback inside a graph
        y = call_scaled_mm(xq, layer.weight.t(), scale_a, scale_b, bias, plan.out_dtype, layer.fast_accum)
    else:
        try:
            y = call_scaled_mm(xq, layer.weight.t(), scale_a, scale_b, bias, plan.out_dtype, layer.fast_accum)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from 2.5; this alias exists in 2.4 too
            raise
        except PROBE_ERRORS as e:
            raise ScaledMMFailed(f"{type(e).__name__}: {e}") from e
    if post is not None:
        scale = post[0] if len(post) == 1 else post[0] * post[1]
        return _add_scale_bias(layer, y.float() if y.dtype != torch.float32 else y, scale).to(x.dtype)
    y = y.to(x.dtype)
    return y if plan.fused_bias or layer.bias is None else y + layer.bias.to(x.dtype)
