"""Other ways to store a transformer's linears in FP8, for comparison (`eval`, `bench`): a plain
cast, diffusers' layerwise casting, optimum-quanto, torchao. The engine never imports this."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from sd3fp8.errors import ConfigError
from sd3fp8.fp8.numerics import FP8Format
from sd3fp8.fp8.swap import replace_module

EXTRA_HINT = "pip install 'sd3fp8[bench]'"
ROUTES = ("plain-cast", "layerwise", "quanto", "torchao-wo", "torchao-dq")


class PlainCastLinear(nn.Module):
    """An FP8 weight cast without a scale (saturating at the format's max) and upcast on every
    call: how naive fp8 files run, and how ComfyUI runs unscaled ones without its fast path."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        limit = FP8Format.E4M3.max
        self.weight = nn.Parameter(linear.weight.detach().clamp(-limit, limit).to(torch.float8_e4m3fn), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def apply_route(route: str, transformer: nn.Module, keep: Callable[[str], bool], compute_dtype: torch.dtype) -> None:
    """Turn the linears ``keep`` selects into the route's FP8 form (the same layers for every route)."""
    names = [n for n, m in transformer.named_modules() if type(m) is nn.Linear and keep(n)]
    if route == "plain-cast":
        for name in names:
            replace_module(transformer, name, PlainCastLinear(cast(nn.Linear, transformer.get_submodule(name))))
    elif route == "layerwise":
        _layerwise(transformer, names, compute_dtype)
    elif route == "quanto":
        try:
            from optimum.quanto import freeze, qfloat8, quantize
        except ImportError:
            raise ConfigError(f"optimum-quanto is not installed ({EXTRA_HINT})") from None
        quantize(transformer, weights=qfloat8, include=names)
        freeze(transformer)
    elif route in ("torchao-wo", "torchao-dq"):
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, quantize_
        except ImportError:
            raise ConfigError(f"torchao is not installed ({EXTRA_HINT})") from None
        config = Float8WeightOnlyConfig() if route == "torchao-wo" else Float8DynamicActivationFloat8WeightConfig()
        wanted = set(names)
        quantize_(transformer, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in wanted)
    else:
        raise ConfigError(f"unknown route {route!r}: expected one of {', '.join(ROUTES)}")


def _layerwise(transformer: nn.Module, names: list[str], compute_dtype: torch.dtype) -> None:
    from diffusers.hooks import apply_layerwise_casting

    skip = tuple(sorted({n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)} - set(names)))
    # ModelMixin.enable_layerwise_casting always adds SD3's own skip list ("pos_embed", "norm"),
    # which keeps the adaLN linears (a third of the weights) in 16 bit; diffusers' lower-level
    # hook takes exactly our layer set (it casts Linear and Conv layers only)
    apply_layerwise_casting(transformer, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                            skip_modules_pattern=tuple(f"^{n}$" for n in skip) + ("^pos_embed",))
