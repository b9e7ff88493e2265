"""Build an SD3Transformer2DModel from an original-layout single file, in any precision it holds.

The model is built on the ``meta`` device and real tensors are assigned (never allocated twice);
file tensors are memory-mapped. FP8 weights that the policy keeps FP8 stay byte-identical
(a fused ``qkv`` is split with its shared scale); FP8 weights the policy wants in 16 bit are
dequantized; 16/32-bit weights the policy wants in FP8 are quantized as they are read.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

from .checkpoint import LazyTensors
from .detection import detect
from .errors import ModelLoadError
from .fp8 import FP8Format, Granularity, dequantize, is_fp8, quantize_weight
from .layouts import MMDIT_PREFIX, original_key_to_diffusers, original_module_to_diffusers
from .linear import ActivationScaling, Backend, FP8Linear, resolve_backend
from .policy import Policy

# Per-layer scale tensors, by the name each format gives them: ComfyUI's old scaled-fp8 names,
# and the newer names (ComfyUI's comfy_quant and the sd3fp8 format).
WEIGHT_SCALE_SUFFIXES = ("scale_weight", "weight_scale")
INPUT_SCALE_SUFFIXES = ("scale_input", "input_scale")
SKIPPED_SUFFIXES = ("comfy_quant",)  # per-layer metadata, read through the header


@dataclasses.dataclass
class SourceLinear:
    """What a file holds for one diffusers Linear (after key mapping)."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None


def _mmdit_prefix(keys) -> str:
    return MMDIT_PREFIX if any(k.startswith(MMDIT_PREFIX) for k in keys) else ""


def gather_mmdit_tensors(files: LazyTensors, num_layers: int) -> tuple[dict[str, SourceLinear], dict[str, torch.Tensor], bool]:
    """Map every MMDiT tensor of ``files`` to diffusers names.

    Returns (per-module weight/bias/scales, other tensors by diffusers key, weights-only flag).
    Weights-only is ComfyUI's 2-element ``scaled_fp8`` marker: input scales must not be used.
    """
    prefix = _mmdit_prefix(files.keys())
    modules: dict[str, SourceLinear] = {}
    others: dict[str, torch.Tensor] = {}
    weights_only = False
    for key in files.keys():
        if not key.startswith(prefix):
            continue  # VAE / text encoders of an all-in-one file
        name = key[len(prefix):]
        if name == "scaled_fp8":
            weights_only = files.header.tensors[key].numel == 2
            continue
        module, _, suffix = name.rpartition(".")
        if suffix in SKIPPED_SUFFIXES:
            continue
        try:
            if suffix in WEIGHT_SCALE_SUFFIXES + INPUT_SCALE_SUFFIXES:
                targets = original_module_to_diffusers(module, num_layers)
                tensor = files.get(key).float()
                field = "weight_scale" if suffix in WEIGHT_SCALE_SUFFIXES else "input_scale"
                for target, transform in targets:
                    setattr(modules.setdefault(target, SourceLinear()), field, transform.apply(tensor.reshape(-1) if tensor.numel() > 1 else tensor.reshape(())))
                continue
            targets = original_key_to_diffusers(name, num_layers)
        except KeyError:
            raise ModelLoadError(f"{files.header.path}: unexpected tensor {key!r} in an SD3 MMDiT") from None
        tensor = files.get(key)
        for target, transform in targets:
            module_name, _, field = target.rpartition(".")
            if field in ("weight", "bias") and module_name != "pos_embed":
                setattr(modules.setdefault(module_name, SourceLinear()), field, transform.apply(tensor))
            else:
                others[target] = transform.apply(tensor)
    return modules, others, weights_only


def _check_finite_fp8(tensor: torch.Tensor, name: str, path) -> None:
    if not torch.isfinite(tensor.float()).all():
        raise ModelLoadError(f"{path}: tensor {name!r} holds NaN/Inf")


def load_mmdit(
    path,
    policy: Policy,
    compute_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    backend: Backend | str = Backend.AUTO,
    force_fp8: bool = False,
    activation: ActivationScaling | str = ActivationScaling.TENSOR,
):
    """Load the MMDiT of an original-layout file; returns (model, names of its FP8 linears, detection)."""
    from diffusers import SD3Transformer2DModel

    with LazyTensors(path) as files:
        detection = detect(files.header)
        if detection.kind != "mmdit-original":
            raise ModelLoadError(f"{path}: holds {detection.describe()}, not an original-layout SD3 MMDiT")
        config = detection.mmdit_config
        formats = {q.get("format") for q in comfy_quant_layers(files).values()} - {"float8_e4m3fn", "float8_e5m2"}
        if formats:
            raise ModelLoadError(f"{path}: ComfyUI quantization format(s) {sorted(map(str, formats))} are not supported")
        sources, others, weights_only = gather_mmdit_tensors(files, config["num_layers"])
        with torch.device("meta"):
            model = SD3Transformer2DModel(**config)
        keep_fp8 = policy.layer_filter("transformer")
        fmt = policy.transformer.fp8_format if policy.transformer.is_fp8 else None
        resolved = resolve_backend(backend, device, force_fp8) if fmt else None
        state: dict[str, torch.Tensor] = {}
        fp8_names = []
        for name, module in list(model.named_modules()):
            if type(module) is not nn.Linear:
                continue
            src = sources.pop(name, None)
            if src is None or src.weight is None:
                raise ModelLoadError(f"{path}: missing weight of {name!r} (original layout)")
            if tuple(src.weight.shape) != (module.out_features, module.in_features):
                raise ModelLoadError(f"{path}: {name}.weight has shape {list(src.weight.shape)}, expected {[module.out_features, module.in_features]}")
            if (src.bias is None) != (module.bias is None):
                raise ModelLoadError(f"{path}: bias of {name!r} is {'missing' if src.bias is None else 'unexpected'}")
            if fmt is not None and keep_fp8(name):
                layer = _fp8_layer(name, module, src, fmt, policy.granularity, resolved, activation, weights_only, compute_dtype, path)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, layer)
                fp8_names.append(name)
            else:
                weight = src.weight
                if is_fp8(weight.dtype):
                    _check_finite_fp8(weight, name + ".weight", path)
                    scale = src.weight_scale if src.weight_scale is not None else torch.tensor(1.0)
                    weight = dequantize(weight, scale.reshape(-1, 1) if scale.dim() else scale, compute_dtype)
                state[name + ".weight"] = _checked(weight, name + ".weight", path).to(compute_dtype)
                if src.bias is not None:
                    state[name + ".bias"] = _checked(src.bias, name + ".bias", path).to(compute_dtype)
        module_names = dict(model.named_modules())
        for name, src in sources.items():  # convolutions and norms: plain tensors
            if name not in module_names:
                raise ModelLoadError(f"{path}: tensors for {name!r} match no layer of the detected architecture")
            for field in ("weight", "bias"):
                tensor = getattr(src, field)
                if tensor is not None:
                    others[f"{name}.{field}"] = tensor
        for key, tensor in others.items():
            state[key] = _checked(tensor.float() if is_fp8(tensor.dtype) else tensor, key, path).to(compute_dtype)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not any(k.startswith(n + ".") for n in fp8_names)]
        if missing or unexpected:
            raise ModelLoadError(f"{path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), fp8_names, detection


def _checked(tensor: torch.Tensor, name: str, path) -> torch.Tensor:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ModelLoadError(f"{path}: tensor {name!r} holds NaN/Inf")
    return tensor


def _fp8_layer(name, module, src: SourceLinear, fmt: FP8Format, granularity: Granularity, backend: Backend,
               activation, weights_only: bool, compute_dtype, path) -> FP8Linear:
    """An FP8Linear from file tensors: FP8 bytes kept as they are when the format matches."""
    if is_fp8(src.weight.dtype) and src.weight.dtype == fmt.dtype:
        _check_finite_fp8(src.weight, name + ".weight", path)
        scale = src.weight_scale if src.weight_scale is not None else torch.tensor(1.0)  # plain cast: value = stored
        weight_fp8 = src.weight.contiguous()
        granularity = Granularity.CHANNEL if scale.dim() else Granularity.TENSOR
    else:
        weight = src.weight
        if is_fp8(weight.dtype):  # e5m2 file, e4m3 policy (or back): through float32
            scale = src.weight_scale if src.weight_scale is not None else torch.tensor(1.0)
            weight = dequantize(weight, scale.reshape(-1, 1) if scale.dim() else scale)
        weight_fp8, scale = quantize_weight(weight, fmt, granularity, f"{path}: {name}.weight")
    layer = FP8Linear(module.in_features, module.out_features, bias=module.bias is not None, fmt=fmt,
                      granularity=granularity, backend=backend, activation=ActivationScaling.parse(activation), device="meta")
    layer.weight, layer.weight_scale = weight_fp8, scale.float()
    if src.bias is not None:
        layer.bias = nn.Parameter(_checked(src.bias, name + ".bias", path).to(compute_dtype), requires_grad=False)
    if src.input_scale is not None and not weights_only:
        layer.set_input_scale(src.input_scale)
    return layer


def comfy_quant_layers(files: LazyTensors) -> dict[str, dict]:
    """Per-layer ``comfy_quant`` entries (uint8 tensors holding JSON), by layer name."""
    out = {}
    for key in files.keys():
        if key.endswith(".comfy_quant"):
            try:
                out[key.removesuffix(".comfy_quant")] = json.loads(bytes(files.get(key).tolist()).decode())
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ModelLoadError(f"{files.header.path}: {key} is not UTF-8 JSON") from None
    return out
