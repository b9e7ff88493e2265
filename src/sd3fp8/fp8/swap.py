"""The one module swap: nn.Linear -> FP8Linear for the modules a name filter selects."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from sd3fp8.fp8.linear import ActivationScaling, Backend, FP8Linear
from sd3fp8.fp8.numerics import FP8Format, Granularity


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` (dotted, e.g. ``blocks.0.attn.to_q``) of ``root`` is;
    returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def quantize_linears(
    model: nn.Module,
    should_quantize: Callable[[str], bool],
    fmt: FP8Format = FP8Format.E4M3,
    granularity: Granularity = Granularity.CHANNEL,
    backend: Backend | str = Backend.AUTO,
    *,
    device: torch.device | str | None = None,
    force_fp8: bool = False,
    activation: ActivationScaling | str = ActivationScaling.TENSOR,
) -> list[str]:
    """Replace, in place, every nn.Linear whose qualified name passes ``should_quantize``.

    Each old weight is released as soon as its FP8 copy exists, so peak memory is the model
    plus one layer. Returns the names of the swapped modules, in model order.
    """
    targets = [name for name, m in model.named_modules() if type(m) is nn.Linear and should_quantize(name)]
    for name in targets:
        linear = cast(nn.Linear, model.get_submodule(name))  # selected above: exactly nn.Linear
        fp8 = FP8Linear.from_linear(
            linear, fmt, granularity, backend, activation=activation, force_fp8=force_fp8, device=device, name=name
        )
        replace_module(model, name, fp8)
    return targets


def fp8_layers(model: nn.Module) -> dict[str, FP8Linear]:
    """All FP8Linear modules of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
