"""Build models from safetensors files, one tensor at a time: the SD3Transformer2DModel of an
original-layout single file or a diffusers ``transformer/`` folder (sharded too), and (through
io/components.py) CLIP and T5, in any precision the files hold.

The model is built on the ``meta`` device and real tensors are assigned (never allocated twice);
each file tensor is read when its layer is built (:class:`FileTensor`), so loading a 16-bit file
into FP8 holds the FP8 model plus one 16-bit tensor, never the file's state dict. FP8 weights that
the policy keeps FP8 stay byte-identical (a fused ``qkv`` is split with its shared scale); FP8
weights the policy wants in 16 bit are dequantized; 16/32-bit weights the policy wants in FP8 are
quantized as they are read.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sd3fp8.errors import ModelLoadError
from sd3fp8.fp8.linear import ActivationScaling, Backend, FP8Linear, resolve_backend
from sd3fp8.fp8.numerics import FP8Format, Granularity, all_finite, dequantize, is_fp8, quantize_weight
from sd3fp8.fp8.swap import replace_module
from sd3fp8.io.checkpoint import LazyTensors
from sd3fp8.io.comfyquant import ENTRY_SUFFIX, LayerQuant, quant_layers
from sd3fp8.io.detection import detect
from sd3fp8.io.layouts import IDENTITY, MMDIT_PREFIX, Transform, original_key_to_diffusers
from sd3fp8.policy import Policy

# Per-layer scale tensors, by the name each format gives them: ComfyUI's old scaled-fp8 names,
# and the newer names (ComfyUI's comfy_quant and the sd3fp8 format).
WEIGHT_SCALE_SUFFIXES = ("scale_weight", "weight_scale")
INPUT_SCALE_SUFFIXES = ("scale_input", "input_scale")
SKIPPED_SUFFIXES = (ENTRY_SUFFIX[1:],)  # per-layer entries, read by comfyquant.quant_layers


class TensorReader:
    """Reads tensors of open files and keeps the last one read: the three parts of a fused qkv are
    read in a row (one read instead of three), and at most one whole file tensor stays cached (one
    reader for all the shards of a model)."""

    def __init__(self):
        self._key: tuple | None = None
        self._tensor: torch.Tensor | None = None

    def read(self, files: LazyTensors, key: str, transform: Transform) -> torch.Tensor:
        if (id(files), key) != self._key:
            self._key, self._tensor = None, None  # freed before the next read
            self._tensor, self._key = files.get(key), (id(files), key)
        assert self._tensor is not None
        value = transform.apply(self._tensor)
        if value.untyped_storage().nbytes() > value.nbytes:
            value = value.clone()  # a part of a fused tensor must not keep the whole alive
        return value


@dataclasses.dataclass(frozen=True)
class FileTensor:
    """A file tensor under its model name, read when its layer is built (shape and dtype from the header)."""

    reader: TensorReader
    files: LazyTensors
    key: str
    transform: Transform
    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self) -> torch.Tensor:
        return self.reader.read(self.files, self.key, self.transform)


def read_now(value):
    """A FileTensor's tensor; anything else as it is."""
    return value.read() if isinstance(value, FileTensor) else value


@dataclasses.dataclass
class SourceLinear:
    """What a file holds for one diffusers Linear (after key mapping): weight and bias as FileTensors
    (or tensors), scales as tensors (small, read at once)."""

    weight: FileTensor | torch.Tensor | None = None
    bias: FileTensor | torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    full_precision: bool = False  # ComfyUI's full_precision_matrix_mult: never an FP8 matmul, no input scale


def _mmdit_prefix(keys) -> str:
    return MMDIT_PREFIX if any(k.startswith(MMDIT_PREFIX) for k in keys) else ""


def same_name(key: str) -> list[tuple[str, Transform]]:
    """The key mapping of layouts that already use the model's own names (text encoders)."""
    return [(key, IDENTITY)]


def gather_tensors(files: LazyTensors, prefix: str, key_targets: Callable[[str], list[tuple[str, Transform]]],
                   quant: dict[str, LayerQuant] | None = None, reader: TensorReader | None = None
                   ) -> tuple[dict[str, SourceLinear], dict[str, FileTensor], bool]:
    """Map the tensors of ``files`` under ``prefix`` to the model's names (``key_targets`` raises
    KeyError for a key the model does not have); ``quant`` is the file's checked per-layer entries.

    Returns (per-module weight/bias/scales, other tensors by key, weights-only flag). Weights, biases
    and other tensors are :class:`FileTensor`\ s: nothing big is read here.
    Weights-only is ComfyUI's 2-element ``scaled_fp8`` marker: no FP8 matmul, no input scales.
    """
    full_precision = {layer for layer, q in (quant or {}).items() if q.full_precision}
    modules: dict[str, SourceLinear] = {}
    others: dict[str, FileTensor] = {}
    weights_only = False
    reader = reader or TensorReader()
    for key in files.keys():
        if not key.startswith(prefix):
            continue  # another component of an all-in-one file
        name = key[len(prefix):]
        if name == "scaled_fp8":
            weights_only = files.header.tensors[key].numel == 2
            continue
        module, _, suffix = name.rpartition(".")
        if suffix in SKIPPED_SUFFIXES:
            continue
        scale_field = "weight_scale" if suffix in WEIGHT_SCALE_SUFFIXES else "input_scale" if suffix in INPUT_SCALE_SUFFIXES else None
        try:
            targets = key_targets(module + ".weight" if scale_field else name)
        except KeyError:
            raise ModelLoadError(f"{files.header.path}: unexpected tensor {key!r}") from None
        if scale_field:
            scale = files.get(key)
            scale = scale.float().reshape(-1) if scale.numel() > 1 else scale.float().reshape(())
        info = files.header.tensors[key]
        for target, transform in targets:
            module_name, _, field = target.rpartition(".")
            if scale_field:
                setattr(modules.setdefault(module_name, SourceLinear()), scale_field, transform.apply(scale))
                continue
            shape = info.shape if not info.shape or transform.parts == 1 else (info.shape[0] // transform.parts, *info.shape[1:])
            value = FileTensor(reader, files, key, transform, shape, info.dtype)
            if field in ("weight", "bias") and module_name:
                source = modules.setdefault(module_name, SourceLinear())
                setattr(source, field, value)
                source.full_precision |= field == "weight" and key.removesuffix(".weight") in full_precision
            else:
                others[target] = value
    return modules, others, weights_only


def gather_mmdit_tensors(files: LazyTensors, num_layers: int, quant: dict[str, LayerQuant] | None = None
                         ) -> tuple[dict[str, SourceLinear], dict[str, FileTensor], bool]:
    """Every MMDiT tensor of an original-layout file, under diffusers names."""
    return gather_tensors(files, _mmdit_prefix(files.keys()), lambda key: original_key_to_diffusers(key, num_layers), quant)


@dataclasses.dataclass(frozen=True)
class FP8Scheme:
    """Which linears of a component become FP8Linear, and how they run (``backend`` resolved, never auto)."""

    keep: Callable[[str], bool]  # module name -> FP8?
    fmt: FP8Format
    granularity: Granularity
    backend: Backend
    activation: ActivationScaling = ActivationScaling.TENSOR

    @classmethod
    def from_policy(cls, policy: Policy, component: str, backend: Backend, activation) -> FP8Scheme | None:
        """``backend``: the transformer's, as resolve_backend gave it."""
        precision = policy.precision(component)
        if not precision.is_fp8:
            return None
        # text encoders run once per prompt: weight-only is cheaper than quantizing activations
        own = backend if component == "transformer" else Backend.WEIGHT_ONLY
        return cls(policy.layer_filter(component), precision.fp8_format, policy.granularity, own, ActivationScaling.parse(activation))


def materialize(model: nn.Module, sources: dict[str, SourceLinear], others: dict, dtype: torch.dtype,
                scheme: FP8Scheme | None, path, weights_only: bool = False, fp32_modules: tuple[str, ...] = ()) -> list[str]:
    """Give ``model`` (parameters on meta) its tensors from a file; returns the names of its FP8 linears.

    Linears the scheme keeps FP8 become FP8Linear (FP8 bytes of a matching format kept as they are),
    the rest are dequantized/cast to ``dtype`` (modules named in ``fp32_modules`` stay float32).
    Each file tensor is read when its layer is built and released once converted.
    """
    state: dict[str, torch.Tensor] = {}
    fp8_names = []
    sources = dict(sources)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        src = sources.pop(name, None)
        if src is None or src.weight is None:
            raise ModelLoadError(f"{path}: missing weight of {name!r}")
        if tuple(src.weight.shape) != (module.out_features, module.in_features):
            raise ModelLoadError(f"{path}: {name}.weight has shape {list(src.weight.shape)}, expected {[module.out_features, module.in_features]}")
        if (src.bias is None) != (module.bias is None):
            raise ModelLoadError(f"{path}: bias of {name!r} is {'missing' if src.bias is None else 'unexpected'}")
        src = dataclasses.replace(src, weight=read_now(src.weight), bias=read_now(src.bias))  # this layer's tensors only
        if scheme is not None and scheme.keep(name):
            replace_module(model, name, _fp8_layer(name, module, src, scheme, weights_only, dtype, path))
            fp8_names.append(name)
            continue
        own = torch.float32 if name.rpartition(".")[2] in fp32_modules else dtype
        weight = src.weight
        if is_fp8(weight.dtype):
            _checked(weight, name + ".weight", path)
            scale = src.weight_scale if src.weight_scale is not None else torch.tensor(1.0)
            weight = dequantize(weight, scale.reshape(-1, 1) if scale.dim() else scale, own)
        state[name + ".weight"] = _checked(weight, name + ".weight", path).to(own)
        if src.bias is not None:
            state[name + ".bias"] = _checked(src.bias, name + ".bias", path).to(own)
    for key, value in {**others, **_non_linear_tensors(model, sources, path)}.items():
        tensor = read_now(value)
        state[key] = _checked(tensor.float() if is_fp8(tensor.dtype) else tensor, key, path).to(dtype)
    for target, source in (getattr(model, "_tied_weights_keys", None) or {}).items():
        if isinstance(target, str) and target not in state and source in state:
            state[target] = state[source]  # e.g. T5's encoder.embed_tokens = shared
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches
        raise ModelLoadError(f"{path}: tensors do not fit the architecture read from the file: {str(e).splitlines()[-1].strip()}") from None
    fp8_set = set(fp8_names)
    missing = [k for k in missing if k.rpartition(".")[0] not in fp8_set]
    still_meta = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if missing or unexpected or still_meta:
        raise ModelLoadError(f"{path}: missing tensors {(missing or still_meta)[:5]}, unexpected {unexpected[:5]}")
    return fp8_names


def _non_linear_tensors(model: nn.Module, sources: dict[str, SourceLinear], path) -> dict:
    """The weights and biases of the modules left in ``sources`` (convolutions, norms, embeddings) by key."""
    module_names = dict(model.named_modules())
    out = {}
    for name, src in sources.items():
        if name not in module_names:
            raise ModelLoadError(f"{path}: tensors for {name!r} match no layer of the detected architecture")
        if src.weight_scale is not None:  # only linears apply scales: anything else would load wrong by its factor
            raise ModelLoadError(f"{path}: {name!r} carries a weight scale but is not a linear layer; no loader applies it")
        for field in ("weight", "bias"):
            tensor = getattr(src, field)
            if tensor is not None:
                out[f"{name}.{field}"] = tensor
    return out


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
        sources, others, weights_only = gather_mmdit_tensors(files, config["num_layers"], quant_layers(files))
        with torch.device("meta"):
            model = SD3Transformer2DModel(**config)
        scheme = FP8Scheme.from_policy(policy, "transformer", resolve_backend(backend, device, force_fp8), activation)
        fp8_names = materialize(model, sources, others, compute_dtype, scheme, path, weights_only)
    return model.eval(), fp8_names, detection


WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def folder_weight_files(folder: Path, weights_file: str = WEIGHTS_FILE) -> list[Path]:
    """A diffusers or transformers component folder's safetensors (``weights_file``: diffusers'
    name, or transformers' ``model.safetensors``): one file, or the shards its index names."""
    from sd3fp8.io.safe_read import read_json

    if (folder / weights_file).is_file():
        return [folder / weights_file]
    index = folder / (weights_file + ".index.json")
    if not index.is_file():
        raise ModelLoadError(f"{folder}: no {weights_file} and no {index.name}")
    content = read_json(index, "shard index")
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: expected a 'weight_map' object naming the shards")
    names = sorted({str(v) for v in weight_map.values()})
    bad = [n for n in names if Path(n).name != n or not n.endswith(".safetensors") or not (folder / n).is_file()]
    if bad:
        raise ModelLoadError(f"{index}: shard {bad[0]!r} is not a .safetensors file in {folder}")
    return [folder / n for n in names]


def load_folder_mmdit(folder: Path, scheme: FP8Scheme, compute_dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    """The SD3Transformer2DModel of a diffusers ``transformer/`` folder (one file or shards), built on
    meta and filled one tensor at a time, its FP8 layers quantized as they are read: the 16-bit model
    never exists, as with single files."""
    from diffusers import SD3Transformer2DModel

    config = SD3Transformer2DModel.load_config(folder, local_files_only=True)
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    with contextlib.ExitStack() as stack:
        modules, others, weights_only = gather_folder(stack, folder, WEIGHTS_FILE)
        fp8_names = materialize(model, modules, others, compute_dtype, scheme, folder, weights_only)
    return model.eval(), fp8_names


def gather_folder(stack: contextlib.ExitStack, folder: Path, weights_file: str
                  ) -> tuple[dict[str, SourceLinear], dict[str, FileTensor], bool]:
    """gather_tensors over every safetensors file of a folder (opened on ``stack``: they must stay
    open until the model is materialized), with one reader cache for all of them."""
    modules: dict[str, SourceLinear] = {}
    others: dict[str, FileTensor] = {}
    weights_only = False
    reader = TensorReader()
    for path in folder_weight_files(folder, weights_file):
        files = stack.enter_context(LazyTensors(path))
        shard_modules, shard_others, shard_weights_only = gather_tensors(files, "", same_name, quant_layers(files), reader)
        for name, src in shard_modules.items():  # a layer's weight and bias may sit in different shards
            merged = modules.setdefault(name, SourceLinear())
            for field in dataclasses.fields(SourceLinear):
                value = getattr(src, field.name)
                if value is not None and value is not False:
                    setattr(merged, field.name, value)
        others.update(shard_others)
        weights_only |= shard_weights_only
    return modules, others, weights_only


def _checked(tensor: torch.Tensor, name: str, path) -> torch.Tensor:
    if not all_finite(tensor):
        raise ModelLoadError(f"{path}: tensor {name!r} holds NaN/Inf")
    return tensor


def _fp8_layer(name, module, src: SourceLinear, scheme: FP8Scheme, weights_only: bool, compute_dtype, path) -> FP8Linear:
    """An FP8Linear from file tensors: FP8 bytes kept as they are when the format matches. A layer
    the file marks full precision (``full_precision_matrix_mult``, or ComfyUI's 2-element marker)
    runs weight-only: 16/32-bit matmul, as ComfyUI runs it, and its input scale is not used."""
    fmt, granularity = scheme.fmt, scheme.granularity
    full_precision = src.full_precision or weights_only
    if is_fp8(src.weight.dtype) and src.weight.dtype == fmt.dtype:
        _checked(src.weight, name + ".weight", path)
        scale = src.weight_scale if src.weight_scale is not None else torch.tensor(1.0)  # plain cast: value = stored
        weight_fp8 = src.weight.contiguous()
        granularity = Granularity.CHANNEL if scale.dim() else Granularity.TENSOR
    else:
        weight = src.weight
        if is_fp8(weight.dtype):  # e5m2 file, e4m3 policy (or back): through float32
            scale = src.weight_scale if src.weight_scale is not None else torch.tensor(1.0)
            weight = dequantize(weight, scale.reshape(-1, 1) if scale.dim() else scale)
        weight_fp8, scale = quantize_weight(weight, fmt, granularity, f"{path}: {name}.weight")
    backend = Backend.WEIGHT_ONLY if full_precision else scheme.backend
    layer = FP8Linear(module.in_features, module.out_features, bias=module.bias is not None, fmt=fmt,
                      granularity=granularity, backend=backend, activation=scheme.activation, device="meta")
    layer.weight, layer.weight_scale = weight_fp8, scale.float()
    if src.bias is not None:
        layer.bias = nn.Parameter(_checked(src.bias, name + ".bias", path).to(compute_dtype), requires_grad=False)
    if src.input_scale is not None and not full_precision:
        layer.set_input_scale(src.input_scale)
    return layer
