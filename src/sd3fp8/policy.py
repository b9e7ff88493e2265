"""Precision policy: which component and which transformer layer is stored in what precision.

A policy is plain data (a frozen dataclass) that prints as a table, round-trips through JSON or
TOML, and is overridden field by field from the CLI. It compiles to a name filter for the swap.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
from collections.abc import Callable
from pathlib import Path

import torch

from sd3fp8.enums import ChoiceEnum
from sd3fp8.errors import ConfigError
from sd3fp8.fp8.numerics import FP8Format, Granularity


class Precision(ChoiceEnum, what="precision", aliases={"fp8": "fp8-e4m3", "e4m3": "fp8-e4m3", "e5m2": "fp8-e5m2", "bfloat16": "bf16",
                                                       "float16": "fp16", "float32": "fp32", "none": "off"}):
    FP8_E4M3 = "fp8-e4m3"
    FP8_E5M2 = "fp8-e5m2"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    AUTO = "auto"  # the pipeline's compute dtype
    OFF = "off"  # component not loaded (T5 only)

    @property
    def is_fp8(self) -> bool:
        return self in (Precision.FP8_E4M3, Precision.FP8_E5M2)

    @property
    def fp8_format(self) -> FP8Format:
        return FP8Format.E4M3 if self is Precision.FP8_E4M3 else FP8Format.E5M2

    def storage_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        """dtype of the component's non-FP8 tensors."""
        return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16, Precision.FP32: torch.float32}.get(self, compute_dtype)


COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
COMPONENT_LABELS = {
    "transformer": "MMDiT",
    "text_encoder": "CLIP-L",
    "text_encoder_2": "CLIP-G",
    "text_encoder_3": "T5-XXL",
    "vae": "VAE",
}

# NVIDIA's SD3 FP8 recipe and the DiT PTQ papers keep the embedders and the final layer in 16 bit.
DEFAULT_TRANSFORMER_EXCLUDE = ("pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out")
# transformers' T5 casts hidden states to `wo.weight.dtype` before `wo` (kept fp32 against fp16
# overflow): an FP8 `wo` would turn activations into FP8, so it stays in high precision.
DEFAULT_ENCODER_EXCLUDE = ("*.wo",)


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """True if a pattern (fnmatch) matches ``name`` or one of its ancestors ("a.b" for "a.b.c")."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def _tuple_of_str(value, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"policy field {field!r} must be a list of name patterns, got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Storage precision per component, and which transformer linears go FP8.

    ``include``/``exclude`` are fnmatch patterns over module names inside the transformer
    (e.g. ``transformer_blocks.*.ff.*``); a pattern also matches every module below the one it
    names. A linear is FP8 when the transformer is FP8, it matches ``include`` and not ``exclude``.
    """

    transformer: Precision = Precision.FP8_E4M3
    text_encoder: Precision = Precision.AUTO
    text_encoder_2: Precision = Precision.AUTO
    text_encoder_3: Precision = Precision.AUTO
    vae: Precision = Precision.AUTO
    granularity: Granularity = Granularity.CHANNEL
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_TRANSFORMER_EXCLUDE
    encoder_exclude: tuple[str, ...] = DEFAULT_ENCODER_EXCLUDE

    def __post_init__(self):
        for name in COMPONENTS:
            object.__setattr__(self, name, Precision.parse(getattr(self, name)))
        object.__setattr__(self, "granularity", Granularity.parse(self.granularity))
        for name in ("include", "exclude", "encoder_exclude"):
            object.__setattr__(self, name, _tuple_of_str(getattr(self, name), name))
        for name in COMPONENTS:
            if getattr(self, name) is Precision.OFF and name != "text_encoder_3":
                raise ConfigError(f"only text_encoder_3 (T5) can be 'off', not {name}")
        if self.vae.is_fp8:
            raise ConfigError("vae cannot be FP8: it is convolutional and drives final image quality; use bf16/fp16/fp32")

    def precision(self, component: str) -> Precision:
        if component not in COMPONENTS:
            raise ConfigError(f"unknown component {component!r}: expected one of {', '.join(COMPONENTS)}")
        return getattr(self, component)

    def layer_filter(self, component: str) -> Callable[[str], bool]:
        """Predicate over module names: should this Linear of ``component`` be FP8?"""
        if not self.precision(component).is_fp8:
            return lambda name: False
        if component == "transformer":
            return lambda name: matches(name, self.include) and not matches(name, self.exclude)
        return lambda name: not matches(name, self.encoder_exclude)

    def replace(self, **changes) -> Policy:
        """A copy with some fields changed (values parsed and validated as at construction)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown policy field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "policy") -> Policy:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a policy must be a mapping of fields, got {type(data).__name__}")
        return cls().replace(**data) if data else cls()

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy from a .json or .toml file; unknown fields and wrong types are errors."""
        from sd3fp8.io import schemas
        from sd3fp8.io.safe_read import parse_json, parse_toml, read_text

        path = Path(path)
        text = read_text(path, "policy", ConfigError)
        source = f"policy file {path}"
        data = parse_toml(text, source, ConfigError) if path.suffix == ".toml" else parse_json(text, source, ConfigError)
        fields = schemas.policy(data, source)
        try:
            return cls.from_dict(fields, str(path))
        except ConfigError as e:
            raise ConfigError(f"policy file {path}: {e}") from None

    def save(self, path: str | Path) -> None:
        from sd3fp8.io.atomic import atomic_write

        with atomic_write(path, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")

    def __str__(self) -> str:
        lines = ["component       precision"]
        for name in COMPONENTS:
            lines.append(f"{name:<15} {getattr(self, name).value:<9} ({COMPONENT_LABELS[name]})")
        lines.append(f"granularity     {self.granularity.value}")
        lines.append(f"fp8 include     {', '.join(self.include)}")
        lines.append(f"fp8 exclude     {', '.join(self.exclude)}")
        lines.append(f"encoder exclude {', '.join(self.encoder_exclude)}")
        return "\n".join(lines)


def budget_policy(policy: Policy, ranking: list[dict] | tuple, transformer_params: int, budget_percent: float) -> tuple[Policy, list[str]]:
    """Keep the most sensitive layers in 16 bit while their parameters fit in ``budget_percent`` % of
    the transformer's parameters (on top of the policy's own exclusions). Returns (policy, kept layers)."""
    if not 0 <= budget_percent <= 100:
        raise ConfigError(f"--keep-budget must be a percentage in 0..100, got {budget_percent}")
    if not ranking:
        raise ConfigError("this calibration has no sensitivity ranking: run `sd3fp8 calibrate --sensitivity`")
    allowance = transformer_params * budget_percent / 100
    kept, used = [], 0
    for row in ranking:
        if used + row["params"] <= allowance:
            kept.append(row["name"])
            used += row["params"]
    return policy.replace(exclude=policy.exclude + tuple(kept)), kept
