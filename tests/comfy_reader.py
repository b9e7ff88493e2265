"""What ComfyUI makes of a checkpoint file, transcribed from its loading rules: an independent
reader for tests (it shares no code with sd3fp8's loader).

Sources (Comfy-Org/ComfyUI; the comments name the function each step follows):
- comfy/sd.py: ``load_state_dict_guess_config`` (CheckpointLoaderSimple), ``load_diffusion_model_state_dict``
  (UNETLoader: diffusion_models/), ``load_clip`` (CLIPLoader / TripleCLIPLoader: text_encoders/);
- comfy/utils.py: ``convert_old_quants``, ``state_dict_prefix_replace``, ``detect_layer_quantization``;
- comfy/model_detection.py: ``unet_prefix_from_state_dict``;
- comfy/ops.py: ``_load_quantized_module`` (mixed-precision Linear), comfy/quant_ops.py: ``QUANT_ALGOS``;
- comfy_kitchen eager ``dequantize_per_tensor_fp8``: ``x.to(dtype) * scale.to(dtype)``.

Each loader returns its model parts as ``{name: Linear}`` for every 2-D ``.weight`` (names without
the part's prefix), the weight as ComfyUI computes with it, in float32.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from safetensors import safe_open

QUANT_ALGOS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}  # quant_ops.py storage_t
MMDIT = "model.diffusion_model."
T5 = "text_encoders.t5xxl.transformer."


@dataclasses.dataclass
class Linear:
    weight: torch.Tensor  # what the layer computes with (float32)
    quantized: bool  # a comfy_quant entry applied; False = plain cast of the stored weight, scales ignored
    format: str | None = None
    full_precision: bool = False
    input_scale: torch.Tensor | None = None


def load_file(path) -> tuple[dict, dict]:
    """comfy/utils.py load_torch_file(..., return_metadata=True)."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def convert_old_quants(state_dict: dict, model_prefix: str = "", metadata: dict | None = None) -> tuple[dict, dict]:
    """comfy/utils.py convert_old_quants: scaled_fp8 files -> per-layer entries; header entries -> tensors."""
    metadata = metadata or {}
    quant_metadata = None
    if "_quantization_metadata" not in metadata:
        marker = f"{model_prefix}scaled_fp8"
        if marker in state_dict:
            full_precision = state_dict[marker].numel() == 2  # its dtype is never consulted: every layer is e4m3fn
            out, layers = {}, {}
            for k in list(state_dict):
                if k == marker:
                    continue
                if not k.startswith(model_prefix):
                    out[k] = state_dict[k]
                    continue
                w, k_out = state_dict.pop(k), k
                if k_out.endswith(".scale_weight"):
                    layer = k_out[: -len(".scale_weight")]
                    k_out = f"{layer}.weight_scale"
                    layers[layer] = {"format": "float8_e4m3fn"} | ({"full_precision_matrix_mult": True} if full_precision else {})
                if k_out.endswith(".scale_input"):
                    k_out = k_out[: -len(".scale_input")] + ".input_scale"
                    if w.item() == 1.0:
                        continue
                out[k_out] = w
            state_dict, quant_metadata = out, {"layers": layers}
    else:
        quant_metadata = json.loads(metadata["_quantization_metadata"])
    if quant_metadata is not None:
        for name, entry in quant_metadata["layers"].items():  # names verbatim: no prefix handling
            state_dict[f"{name}.comfy_quant"] = torch.tensor(list(json.dumps(entry).encode("utf-8")), dtype=torch.uint8)
    return state_dict, metadata


def unet_prefix_from_state_dict(state_dict: dict) -> str:
    """comfy/model_detection.py: the prefix more than 5 keys share, else "model."."""
    candidates = [MMDIT, "model.model.", "net."]
    counts = {c: sum(1 for k in state_dict if k.startswith(c)) for c in candidates}
    top = max(counts, key=counts.get)
    return top if counts[top] > 5 else "model."


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """comfy/utils.py state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_linear(state_dict: dict, prefix: str) -> Linear:
    """comfy/ops.py _load_quantized_module for one Linear (``prefix`` ends with "."); pops its keys."""
    weight = state_dict.pop(prefix + "weight")
    conf = state_dict.pop(prefix + "comfy_quant", None)
    if conf is None:
        return Linear(weight.to(torch.float32), quantized=False)  # weight.to(compute_dtype): scales left unused
    conf = json.loads(conf.numpy().tobytes())
    fmt = conf.get("format")
    if fmt is None:
        raise ValueError(f"Unknown quantization format for layer {prefix.rstrip('.')}")
    storage = QUANT_ALGOS[fmt]  # KeyError for a format ComfyUI does not know: the load fails
    scale = state_dict.pop(prefix + "weight_scale", None)
    qdata = weight.to(dtype=storage)
    assert scale is not None and scale.numel() == 1, "comfy_kitchen's FP8 layout: Scale must be a scalar tensor"
    dequantized = qdata.to(torch.float32) * scale.to(torch.float32)
    return Linear(dequantized, True, fmt, bool(conf.get("full_precision_matrix_mult", False)),
                  state_dict.pop(prefix + "input_scale", None))


def linears(state_dict: dict, prefix: str) -> dict[str, Linear]:
    """Every Linear of a model part under ``prefix`` (its keys stripped, as load_model_weights does)."""
    names = [k for k, v in state_dict.items() if k.startswith(prefix) and k.endswith(".weight") and v.dim() == 2]
    return {k[len(prefix): -len("weight")].rstrip("."): load_linear(state_dict, k[: -len("weight")]) for k in names}


def checkpoint_loader(path) -> dict[str, dict[str, Linear]]:
    """comfy/sd.py load_state_dict_guess_config: models/checkpoints/ (CheckpointLoaderSimple)."""
    sd, metadata = load_file(path)
    prefix = unet_prefix_from_state_dict(sd)
    sd, metadata = convert_old_quants(sd, prefix, metadata)
    if f"{prefix}joint_blocks.0.context_block.attn.qkv.weight" not in sd:
        # model_config_from_unet found nothing: "trying to load it as a diffusion model only", without the metadata
        return {"transformer": _diffusion_model(sd, None, convert_first=True)}
    parts = {"transformer": linears(sd, prefix)}
    for marker in [k for k in sd if k.endswith(".scaled_fp8")]:  # text encoders: each scaled_fp8 marker's prefix
        sd, _ = convert_old_quants(sd, marker[: -len("scaled_fp8")], {})
    if any(k.startswith(T5) for k in sd):
        parts["text_encoder_3"] = linears(sd, T5)
    return parts


def _diffusion_model(sd: dict, metadata: dict | None, convert_first: bool) -> dict[str, Linear]:
    if convert_first:
        sd, metadata = convert_old_quants(sd, "", metadata)
    temp = strip_prefix(sd, unet_prefix_from_state_dict(sd))
    if temp:
        sd = temp
        if convert_first:
            sd, metadata = convert_old_quants(sd, "", metadata)
    if not convert_first:
        sd, metadata = convert_old_quants(sd, "", metadata)
    return linears(sd, "")


def diffusion_model_loader(path, convert_first: bool = True) -> dict[str, dict[str, Linear]]:
    """comfy/sd.py load_diffusion_model_state_dict: models/diffusion_models/ (UNETLoader).

    ``convert_first``: the current source converts old quants, strips the prefix, converts again;
    earlier releases stripped the prefix, then converted once (there a header naming its layers with
    ``model.diffusion_model.`` names nothing left in the stripped dict)."""
    sd, metadata = load_file(path)
    return {"transformer": _diffusion_model(sd, metadata, convert_first)}


def clip_loader(path) -> dict[str, dict[str, Linear]]:
    """comfy/sd.py load_clip: models/text_encoders/ (CLIPLoader, TripleCLIPLoader)."""
    sd, metadata = load_file(path)
    sd, metadata = convert_old_quants(sd, "", metadata)
    return {"text_encoder_3": linears(sd, "")}
