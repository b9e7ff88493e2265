"""Which tensors of a checkpoint may be written as FP8: those a loader dequantizes with their scale.

Loaders apply a ``weight_scale`` / ``scale_weight`` to linear layers only (``singlefile.materialize``);
an FP8 embedding or norm would be read back as its raw codes, silently wrong by the scale's factor.
``quantize`` checks every tensor it is about to write as FP8 against this, independently of the
policy logic that chose it: a wrong choice is an error, never a corrupt file.
"""

from __future__ import annotations

import functools

from torch import nn

from sd3fp8.io.detection import COMPONENT_PREFIXES, Detection
from sd3fp8.io.layouts import original_module_to_diffusers

T5_LINEAR_SUFFIXES = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")


@functools.lru_cache(maxsize=4)
def _mmdit_linears(config_items: tuple) -> frozenset[str]:
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**dict(config_items))
    return frozenset(n for n, m in model.named_modules() if type(m) is nn.Linear)


def loader_dequantizes(name: str, detection: Detection, mmdit_prefix: str) -> bool:
    """Whether a loader reads ``name`` (a weight) as FP8 with its scale applied."""
    if not name.endswith(".weight"):
        return False
    t5_prefix = COMPONENT_PREFIXES["text_encoder_3"] if detection.kind == "mmdit-original" else ""
    if detection.kind == "t5-xxl" or (t5_prefix and name.startswith(t5_prefix)):
        return name.endswith(T5_LINEAR_SUFFIXES)
    if detection.kind != "mmdit-original" or not name.startswith(mmdit_prefix) or \
            any(name.startswith(p) for p in COMPONENT_PREFIXES.values()):
        return False
    config = detection.mmdit_config
    try:
        targets = original_module_to_diffusers(name[len(mmdit_prefix):-len(".weight")], config["num_layers"])
    except KeyError:
        return False
    linears = _mmdit_linears(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items())))
    return all(target in linears for target, _ in targets)

