"""ComfyUI's per-layer quantization format (``comfy_quant``): the entries we write, and the check
that a file's per-layer declarations match the tensors it stores.

What ComfyUI does with it (Comfy-Org/ComfyUI; see docs/formats.md for the full citations):

- ``comfy/ops.py`` ``_load_quantized_module``: a Linear whose ``<layer>.comfy_quant`` tensor (uint8
  bytes of UTF-8 JSON) names a ``format`` is built from ``QUANT_ALGOS[format]``
  (``comfy/quant_ops.py``): its weight is cast to that format's storage dtype
  (``weight.to(dtype=storage_t)``), ``<layer>.weight_scale`` is its scale, ``<layer>.input_scale``
  becomes a parameter and ``"full_precision_matrix_mult": true`` keeps the layer off FP8 matmuls
  (dequantize, then a 16-bit linear). A format missing from ``QUANT_ALGOS`` raises ``KeyError``:
  the load fails. A Linear without an entry loads its weight as a plain cast (scales dropped).
- ``float8_e4m3fn`` / ``float8_e5m2`` use comfy_kitchen's per-tensor FP8 layout: dequantized
  weight = ``weight.to(dtype) * scale``; its CUDA dequantize asserts a scalar scale, so a
  per-channel scale cannot be expressed in these formats.
- ``comfy/utils.py`` ``convert_old_quants``: when the header holds ``_quantization_metadata``
  (``{"format_version": "1.0", "layers": {name: entry}}``), every entry becomes a
  ``<name>.comfy_quant`` tensor, the name taken verbatim (no prefix handling).

sd3fp8 writes the entry both as a tensor beside each weight (it moves with the weight through any
prefix stripping a loader does) and in the header under the file's own key names. Per-channel
layers (the sd3fp8 format's default) get a format name ComfyUI does not know, so ComfyUI refuses
the file instead of misreading it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

from sd3fp8.errors import ModelLoadError
from sd3fp8.io.checkpoint import DTYPE_INFO, Header, LazyTensors
from sd3fp8.io.layouts import MMDIT_PREFIX
from sd3fp8.io.safe_read import parse_json

if TYPE_CHECKING:  # the header checks need no torch (`sd3fp8 inspect FILE` stays fast)
    from sd3fp8.fp8.numerics import FP8Format, Granularity

HEADER_KEY = "_quantization_metadata"
ENTRY_SUFFIX = ".comfy_quant"
FULL_PRECISION = "full_precision_matrix_mult"
# format name -> (FP8Format value, safetensors storage dtype)
COMFY_FORMATS = {"float8_e4m3fn": ("e4m3", "F8_E4M3"), "float8_e5m2": ("e5m2", "F8_E5M2")}  # per tensor: ComfyUI reads them
PER_CHANNEL_PREFIX = "sd3fp8_per_channel_"  # ours only: ComfyUI raises KeyError on it, sd3fp8 reads it
FORMATS = COMFY_FORMATS | {PER_CHANNEL_PREFIX + name: fmt for name, fmt in COMFY_FORMATS.items()}
FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """One layer's declaration, checked against its tensors."""

    layer: str  # the file's own name: its weight is ``<layer>.weight``
    format: str
    per_channel: bool
    full_precision: bool  # full_precision_matrix_mult: dequantized, 16/32-bit matmul, input scale unused

    @property
    def fmt(self) -> FP8Format:
        from sd3fp8.fp8.numerics import FP8Format

        return FP8Format(FORMATS[self.format][0])


def entry(fmt: FP8Format, granularity: Granularity) -> dict:
    """The per-layer entry for a weight quantized to ``fmt`` with ``granularity`` scales."""
    name = "float8_e4m3fn" if fmt.value == "e4m3" else "float8_e5m2"
    if granularity.value == "channel":
        return {"format": PER_CHANNEL_PREFIX + name}
    if granularity.value == "tensor":
        return {"format": name}
    raise ModelLoadError(f"no per-layer format for {granularity.value} scales")


def encode_entry(layer_entry: dict) -> bytes:
    """The bytes of a ``comfy_quant`` tensor: ``json.dumps`` as ``convert_old_quants`` builds them."""
    return json.dumps(layer_entry).encode("utf-8")


def header_value(layers: dict[str, dict]) -> str:
    return json.dumps({"format_version": "1.0", "layers": layers})


def _decode(raw: bytes | str, where: str) -> dict:
    value = parse_json(raw, where, ModelLoadError)  # the one safe reader: depth, size, numbers, UTF-8
    if not isinstance(value, dict):
        raise ModelLoadError(f"{where} is not a JSON object")
    return value


def header_entries(header: Header) -> dict[str, dict]:
    """``_quantization_metadata`` layers by the name the header gives them ({} without one)."""
    raw = header.metadata.get(HEADER_KEY)
    if raw is None:
        return {}
    layers = _decode(raw, f"{header.path}: {HEADER_KEY} in the header").get("layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ModelLoadError(f"{header.path}: {HEADER_KEY} has no 'layers' object of per-layer entries")
    return layers


def tensor_entries(files: LazyTensors) -> dict[str, dict]:
    """``<layer>.comfy_quant`` tensors, decoded, by layer name."""
    out = {}
    for key, info in files.header.tensors.items():
        if key.endswith(ENTRY_SUFFIX):
            if info.dtype_name != "U8" or len(info.shape) != 1:
                raise ModelLoadError(f"{files.header.path}: {key} must be a 1-D uint8 tensor, found {info.dtype_name} {list(info.shape)}")
            out[key.removesuffix(ENTRY_SUFFIX)] = _decode(files.read_bytes(key), f"{files.header.path}: {key}")
    return out


def _file_layer(header: Header, name: str) -> str:
    """The file layer a header entry names: verbatim, or without the MMDiT prefix (the naming
    ComfyUI's diffusion-model loader reads after stripping it)."""
    for candidate in (name, MMDIT_PREFIX + name):
        if candidate + ".weight" in header.tensors:
            return candidate
    raise ModelLoadError(f"{header.path}: {HEADER_KEY} names layer {name!r}, which the file does not hold")


def merge(header: Header, from_header: dict[str, dict], from_tensors: dict[str, dict]) -> dict[str, dict]:
    """One entry per file layer; a layer declared differently in the header and its tensor is refused."""
    merged = dict(from_tensors)
    for name, declared in from_header.items():
        layer = _file_layer(header, name)
        if layer in merged and merged[layer] != declared:
            raise ModelLoadError(f"{header.path}: layer {layer!r} is declared twice and differently: {HEADER_KEY} says "
                                 f"{json.dumps(declared)}, its comfy_quant tensor says {json.dumps(merged[layer])}")
        merged[layer] = declared
    return merged


def check(header: Header, entries: dict[str, dict]) -> dict[str, LayerQuant]:
    """Check each declared layer's stored tensors against its format; refuse the file naming the
    first bad layer (in file order)."""
    unsupported = sorted({str(e.get("format")) for e in entries.values()} - set(FORMATS))
    if unsupported:
        raise ModelLoadError(f"{header.path}: ComfyUI quantization format(s) {unsupported} are not supported "
                             f"(only float8_e4m3fn / float8_e5m2)")
    order = {key: i for i, key in enumerate(header.tensors)}
    out = {}
    for layer in sorted(entries, key=lambda n: order.get(n + ".weight", -1)):
        problem = _problem(header, layer, entries[layer])
        if problem:
            raise ModelLoadError(f"{header.path}: layer {layer!r} does not match its per-layer quantization entry: {problem}")
        fmt_name = entries[layer]["format"]
        out[layer] = LayerQuant(layer, fmt_name, fmt_name.startswith(PER_CHANNEL_PREFIX), bool(entries[layer].get(FULL_PRECISION, False)))
    return out


def _problem(header: Header, layer: str, declared: dict) -> str | None:
    """What is wrong with one layer's tensors for its declared format, or None."""
    fmt_name, tensors = declared["format"], header.tensors
    weight = tensors.get(layer + ".weight")
    if weight is None:
        return "the file holds no weight for it"
    storage = FORMATS[fmt_name][1]
    if weight.dtype_name != storage:
        stored = f"{weight.dtype_name} {list(weight.shape)}"
        if weight.itemsize == DTYPE_INFO[storage][0]:
            return f"declared {fmt_name} but the weight is stored as {stored}"
        expected = weight.numel * DTYPE_INFO[storage][0]
        return (f"declared {fmt_name} (1 byte a weight) but the weight is stored as {stored}: {weight.nbytes} bytes, "
                f"{weight.nbytes / max(expected, 1):g}x the {expected} bytes it needs")
    if len(weight.shape) != 2:
        return f"a linear weight is 2-D [out, in], this one is {list(weight.shape)}"
    scale = tensors.get(layer + ".weight_scale")
    if scale is None:
        return "no weight_scale"
    channels = fmt_name.startswith(PER_CHANNEL_PREFIX)
    if scale.dtype_name not in FLOAT_DTYPES or scale.numel != (weight.shape[0] if channels else 1):
        want = f"{weight.shape[0]} per-channel values" if channels else "one value (ComfyUI's FP8 layout is per tensor)"
        return f"weight_scale is {scale.dtype_name} {list(scale.shape)}, expected float32 with {want}"
    input_scale = tensors.get(layer + ".input_scale")
    if input_scale is not None and (input_scale.dtype_name not in FLOAT_DTYPES or input_scale.numel != 1):
        return f"input_scale is {input_scale.dtype_name} {list(input_scale.shape)}, expected one float value"
    if not isinstance(declared.get(FULL_PRECISION, False), bool):
        return f"{FULL_PRECISION} is {declared[FULL_PRECISION]!r}, expected true or false"
    return None


def check_header(header: Header) -> dict[str, LayerQuant]:
    """What the header alone declares (``_quantization_metadata``), checked: for detection."""
    return check(header, merge(header, header_entries(header), {}))


def quant_layers(files: LazyTensors) -> dict[str, LayerQuant]:
    """Every layer's declaration (header and ``comfy_quant`` tensors), checked against its tensors."""
    return check(files.header, merge(files.header, header_entries(files.header), tensor_entries(files)))
