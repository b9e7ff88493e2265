"""`sd3fp8 quantize`: convert a 16/32-bit checkpoint to FP8 by streaming, tensor by tensor.

The output header is planned from the source header alone (every output tensor's dtype and shape
is known before any data is read), written first, then each tensor is read (one at a time, plain reads),
converted and appended: peak memory is a few copies of the largest tensor, never the model.
Output goes to a temporary file beside the destination and is renamed at the very end.

Formats (all keep the source's key layout, so every loader that reads the source reads them; what
ComfyUI does with each: docs/formats.md):
- ``comfy-quant``: ComfyUI's per-layer format: FP8 weights, float32 scalar ``<layer>.weight_scale``,
  a ``<layer>.comfy_quant`` entry naming the format (e4m3 or e5m2) and the same entries in the
  header's ``_quantization_metadata`` (see ``comfyquant``).
- ``sd3fp8``: the same layout with per-channel ([out]) or per-tensor scales; per-channel layers carry
  a format name only sd3fp8 knows, so ComfyUI refuses such a file rather than misreading it.
- ``comfy``: ComfyUI scaled FP8 (its older format): a ``scaled_fp8`` marker per model part, FP8
  weights and float32 scalar ``<layer>.scale_weight``; E4M3 only (ComfyUI reads every layer as E4M3).
All three record the sd3fp8 metadata: format version, the policy as written, granularity, FP8
format, the source file's SHA-256 and the calibration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from sd3fp8.errors import ConfigError, ModelLoadError
from sd3fp8.fp8.calibration import Calibration, file_fingerprint
from sd3fp8.fp8.numerics import FP8Format, Granularity, check_finite, quantize_weight
from sd3fp8.io import comfyquant
from sd3fp8.io.atomic import atomic_write
from sd3fp8.io.checkpoint import DTYPE_NAMES, Header, LazyTensors
from sd3fp8.io.detection import COMPONENT_PREFIXES, detect
from sd3fp8.io.fp8_targets import loader_dequantizes
from sd3fp8.io.layouts import MMDIT_PREFIX, original_module_to_diffusers
from sd3fp8.io.oserrors import check_output_file
from sd3fp8.policy import Policy, Precision, matches

FORMAT_VERSION = "2"  # 2: per-layer comfy_quant entries (sd3fp8, comfy-quant); 1: sd3fp8 files with weight_scale only
FORMATS = ("sd3fp8", "comfy-quant", "comfy")
HASH_PLACEHOLDER = "0" * 64  # the source's SHA-256, filled in once the background hash is done
T5_LINEAR_SUFFIXES = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    format: str = "sd3fp8"  # sd3fp8 | comfy-quant | comfy
    granularity: Granularity = Granularity.CHANNEL
    fp8: FP8Format = FP8Format.E4M3
    t5: str = "keep"  # keep | fp8
    policy: Policy = Policy()
    force: bool = False
    calibration: Calibration | None = None  # static input scales to store beside the FP8 weights

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"unknown output format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.t5 not in ("keep", "fp8"):
            raise ConfigError(f"--t5 must be 'fp8' or 'keep', got {self.t5!r}")
        object.__setattr__(self, "granularity", Granularity.parse(self.granularity))
        object.__setattr__(self, "fp8", FP8Format.parse(self.fp8))
        if self.format.startswith("comfy") and self.granularity is not Granularity.TENSOR:
            raise ConfigError(f"the {self.format} format stores one scale per tensor (ComfyUI's FP8 layout): use --granularity tensor")
        if self.format == "comfy" and self.fp8 is FP8Format.E5M2:
            raise ConfigError("ComfyUI reads every scaled_fp8 layer as float8_e4m3fn whatever the marker says "
                              "(comfy/utils.py convert_old_quants), so an e5m2 file would load wrong there: "
                              "use --format comfy-quant, which names the format per layer")


@dataclasses.dataclass(frozen=True)
class Planned:
    """One output tensor: where it comes from and what it becomes."""

    name: str
    source: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    role: str  # copy | weight | scale | marker | input_scale | entry
    value: float | None = None  # an input scale's value
    data: bytes = b""  # an entry's bytes (a marker has none)


def _mmdit_layer_is_fp8(module: str, num_layers: int, keep) -> bool:
    """An original-layout module goes FP8 when every diffusers module it maps to passes the policy."""
    try:
        targets = original_module_to_diffusers(module, num_layers)
    except KeyError:
        return False
    return all(keep(name) for name, _ in targets)


def input_scale_of(module: str, num_layers: int, scales: dict[str, float]) -> float | None:
    """Calibrated input scale of an original-layout module: q, k and v of a fused qkv see the same
    input, so their scales agree; the max covers them all. None when uncalibrated."""
    found = [scales[name] for name, _ in original_module_to_diffusers(module, num_layers) if name in scales]
    return max(found) if found else None


def plan(header: Header, options: QuantizeOptions) -> list[Planned]:
    """Every output tensor, in source order, with its dtype and shape."""
    detection = detect(header)
    if detection.fp8 != "none":
        raise ModelLoadError(f"{header.path} is already FP8 ({detection.fp8}): quantize converts 16/32-bit checkpoints")
    policy = options.policy
    keep_mmdit = policy.layer_filter("transformer") if policy.transformer.is_fp8 else (lambda n: False)
    t5_prefix = COMPONENT_PREFIXES["text_encoder_3"] if detection.kind == "mmdit-original" else ""
    mmdit_prefix = MMDIT_PREFIX if any(k.startswith(MMDIT_PREFIX) for k in header.tensors) else ""
    num_layers = detection.mmdit_config["num_layers"] if detection.mmdit_config else 0
    scale_suffix = "scale_weight" if options.format == "comfy" else "weight_scale"
    input_suffix = "scale_input" if options.format == "comfy" else "input_scale"
    input_scales = options.calibration.input_scales() if options.calibration else {}
    out: list[Planned] = []
    if options.format == "comfy" and detection.kind == "mmdit-original":
        out.append(Planned(f"{mmdit_prefix}scaled_fp8", "", options.fp8.dtype, (0,), "marker"))
    for name, info in header.tensors.items():
        fp8 = False  # decided anew for every tensor: a value carried over wrote CLIP-G's embeddings as FP8
        if info.dtype not in (torch.float32, torch.float16, torch.bfloat16) or len(info.shape) != 2:
            pass
        elif detection.kind == "mmdit-original" and name.startswith(mmdit_prefix) and name.endswith(".weight") and \
                not any(name.startswith(p) for p in COMPONENT_PREFIXES.values()):
            fp8 = _mmdit_layer_is_fp8(name[len(mmdit_prefix):-len(".weight")], num_layers, keep_mmdit)
        elif options.t5 == "fp8" and (detection.kind == "t5-xxl" or name.startswith(t5_prefix) and t5_prefix):
            fp8 = name.endswith(T5_LINEAR_SUFFIXES) and not matches(name[len(t5_prefix):-len(".weight")], policy.encoder_exclude)
        if fp8 and not loader_dequantizes(name, detection, mmdit_prefix):
            raise ModelLoadError(f"refusing to write {name!r} as FP8: no loader applies its scale (a bug: please report it)")
        if fp8:
            rows = info.shape[0]
            scale_shape = (rows,) if options.granularity is Granularity.CHANNEL else ()
            out.append(Planned(name, name, options.fp8.dtype, info.shape, "weight"))
            out.append(Planned(name[: -len("weight")] + scale_suffix, name, torch.float32, scale_shape, "scale"))
            if input_scales and name.startswith(mmdit_prefix) and detection.kind == "mmdit-original":
                value = input_scale_of(name[len(mmdit_prefix):-len(".weight")], num_layers, input_scales)
                if value is not None:
                    out.append(Planned(name[: -len("weight")] + input_suffix, "", torch.float32, (), "input_scale", value))
        else:
            out.append(Planned(name, name, info.dtype, info.shape, "copy"))
    if options.t5 == "fp8" and not any(p.role == "weight" and (p.name.startswith(t5_prefix) if t5_prefix else detection.kind == "t5-xxl") for p in out):
        raise ConfigError(f"--t5 fp8: {header.path} holds no T5-XXL encoder")
    if not any(p.role == "weight" for p in out):
        raise ConfigError(f"nothing to quantize: {header.path} holds {detection.describe()} and no tensor of it goes FP8 "
                          "(quantize converts SD3 MMDiT layers the policy makes FP8, and T5-XXL encoders with --t5 fp8)")
    return out


def output_plan(header: Header, options: QuantizeOptions) -> list[Planned]:
    """``plan`` and what the format adds around the FP8 weights: a ``comfy_quant`` entry after each
    weight's scale (sd3fp8, comfy-quant), or the ``scaled_fp8`` marker of a quantized T5 (comfy:
    ComfyUI converts a text encoder's layers only under a marker of its own, comfy/sd.py)."""
    planned = plan(header, options)
    if options.format == "comfy":
        if options.t5 == "fp8":
            prefix = COMPONENT_PREFIXES["text_encoder_3"] if detect(header).kind == "mmdit-original" else ""
            planned.insert(0, Planned(f"{prefix}scaled_fp8", "", options.fp8.dtype, (0,), "marker"))
        return planned
    data = comfyquant.encode_entry(comfyquant.entry(options.fp8, options.granularity))
    out = []
    for p in planned:
        out.append(p)
        if p.role == "scale":
            name = p.name.removesuffix(".weight_scale") + comfyquant.ENTRY_SUFFIX
            out.append(Planned(name, "", torch.uint8, (len(data),), "entry", data=data))
    return out


def recorded_policy(options: QuantizeOptions) -> Policy:
    """The policy as written: the FP8 format and granularity of the file, T5 as --t5 made it."""
    fp8 = Precision.FP8_E4M3 if options.fp8 is FP8Format.E4M3 else Precision.FP8_E5M2
    changes = {"granularity": options.granularity}
    if options.policy.transformer.is_fp8:
        changes["transformer"] = fp8
    if options.t5 == "fp8":
        changes["text_encoder_3"] = fp8
    return options.policy.replace(**changes)


def file_metadata(src: Path, options: QuantizeOptions, planned: list[Planned]) -> dict[str, str]:
    metadata = {
        "format": "pt", "sd3fp8_format_version": FORMAT_VERSION, "sd3fp8_layout": options.format,
        "fp8": options.fp8.value, "granularity": options.granularity.value, "t5": options.t5,
        "policy": json.dumps(recorded_policy(options).to_dict()), "source_sha256": HASH_PLACEHOLDER, "source_name": src.name,
    }
    if options.calibration is not None:
        metadata["calibration"] = json.dumps({"fingerprint": options.calibration.fingerprint, "method": options.calibration.method,
                                              "percentile": options.calibration.percentile, "prompts": len(options.calibration.prompts)})
    entries = {p.name.removesuffix(comfyquant.ENTRY_SUFFIX): json.loads(p.data) for p in planned if p.role == "entry"}
    if entries:  # the file's own names: what the loader for this kind of file reads (docs/formats.md)
        metadata[comfyquant.HEADER_KEY] = comfyquant.header_value(entries)
    return metadata


def check_calibration(files: LazyTensors, calibration: Calibration) -> None:
    detection = detect(files.header)
    if detection.kind != "mmdit-original":
        raise ConfigError(f"--calibration applies to SD3 MMDiT checkpoints; {files.header.path} holds {detection.describe()}")
    prefix = MMDIT_PREFIX if any(k.startswith(MMDIT_PREFIX) for k in files.keys()) else ""
    calibration.check_fingerprint(file_fingerprint(files, detection.mmdit_config, prefix), str(files.header.path))


def _nbytes(p: Planned) -> int:
    n = 1
    for d in p.shape:
        n *= d
    return n * torch.empty((), dtype=p.dtype).element_size()


def build_header(planned: list[Planned], metadata: dict[str, str]) -> bytes:
    entries, offset = {"__metadata__": metadata}, 0
    for p in planned:
        size = _nbytes(p)
        entries[p.name] = {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(blob)) + blob


def sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (1-D first: a 0-dim scale cannot be viewed as bytes)."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


class _BackgroundHash(threading.Thread):
    """SHA-256 of a file computed while the conversion runs (hashlib releases the GIL)."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.digest, self.error = path, None, None
        self.start()

    def run(self):
        try:
            self.digest = sha256_file(self.path)
        except OSError as e:
            self.error = e

    def result(self) -> str:
        self.join()
        if self.error is not None:
            raise ModelLoadError(f"cannot read {self.path}: {self.error.strerror}")
        return self.digest


def _tensor_data(p: Planned, files: LazyTensors, quantized: dict, options: QuantizeOptions, src: Path) -> bytes | memoryview:
    """One output tensor's bytes (a weight's scale waits in ``quantized`` until its turn)."""
    if p.role in ("marker", "entry"):
        return p.data
    if p.role == "weight":
        w8, scale = quantize_weight(files.get(p.source), options.fp8, options.granularity, f"{src}: {p.source}")
        quantized[p.source] = scale
        return _tensor_bytes(w8)
    if p.role == "input_scale":
        return _tensor_bytes(torch.tensor(p.value, dtype=torch.float32))
    if p.role == "scale":
        return _tensor_bytes(quantized.pop(p.source).reshape(p.shape))
    tensor = files.get(p.source)
    if tensor.is_floating_point():
        check_finite(tensor, f"{src}: {p.source}")
    return _tensor_bytes(tensor)


def quantize_file(src: str | Path, dst: str | Path, options: QuantizeOptions = QuantizeOptions(),
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Stream ``src`` into an FP8 checkpoint at ``dst`` (see the module docstring)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ConfigError(f"refusing to overwrite the source {src}")
    check_output_file(dst)  # a directory, a file on its path, a read-only disk: said before any work
    if dst.exists() and not options.force:
        raise ConfigError(f"{dst} exists: pass --force to overwrite it")
    if dst.suffix != ".safetensors":
        raise ConfigError(f"the output must be a .safetensors file, got {dst}")
    with LazyTensors(src) as files:
        planned = output_plan(files.header, options)
        if options.calibration is not None:
            check_calibration(files, options.calibration)
        total = sum(_nbytes(p) for p in planned)
        check_output_file(dst, total)  # a disk too full for the output fails now, not at 90 %
        source_hash = _BackgroundHash(src)
        with atomic_write(dst) as f:
            header = build_header(planned, file_metadata(src, options, planned))
            f.write(header)
            done, quantized = 0, {}
            for p in planned:
                data = _tensor_data(p, files, quantized, options, src)
                f.write(data)
                done += len(data)
                if progress:
                    progress(done, total)
            # the header was written with a placeholder of the hash's length: fill it in now
            key = b'"source_sha256":"'
            f.seek(header.index(key + HASH_PLACEHOLDER.encode()) + len(key))
            f.write(source_hash.result().encode())
    return dst
