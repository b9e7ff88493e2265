"""The configurations `sd3fp8 eval` and `sd3fp8 bench` compare: one registry, one parser, one loader.

A configuration is a change to the base policy, a change to the runtime, and optionally a route:
another library's way of storing the transformer's linears in FP8 (evalkit/routes.py), applied to
the loaded transformer over the same layers our policy makes FP8. Names: ``fp8``, ``fp8-tensor``, ...
(sd3fp8's own configurations), ``fp8-static-keepP`` (static scales, P % of the parameters kept
16-bit by sensitivity), the routes' names, and ``NAME@fp32`` / ``@bf16`` / ``@fp16`` for the compute
dtype. The old bench spellings (``sd3fp8``, ``sd3fp8-scaled-mm``, ``sd3fp8-static``, ``plain-cast``)
are read as their new names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sd3fp8.errors import ConfigError

if TYPE_CHECKING:
    from sd3fp8.engine.modelspec import ModelSpec
    from sd3fp8.engine.pipeline import SD3FP8Pipeline
    from sd3fp8.policy import Policy

# name -> (policy changes, runtime changes, route, what it is)
REGISTRY: dict[str, tuple[dict, dict, str | None, str]] = {
    "bf16": ({"transformer": "bf16"}, {}, None, "16-bit baseline"),
    "fp16": ({"transformer": "fp16"}, {}, None, "16-bit (half) baseline"),
    "fp32": ({"transformer": "fp32"}, {}, None, "32-bit baseline"),
    "fp8": ({}, {}, None, "sd3fp8's default: E4M3 per-channel weights (auto backend)"),
    "fp8-tensor": ({"granularity": "tensor"}, {}, None, "per-tensor weight scales"),
    "fp8-e5m2": ({"transformer": "fp8-e5m2"}, {}, None, "E5M2 weights"),
    "fp8-t5": ({"text_encoder_3": "fp8"}, {}, None, "T5-XXL in FP8 too"),
    "no-t5": ({"text_encoder_3": "off"}, {}, None, "T5-XXL dropped (CLIP only)"),
    "fp8-scaled-mm": ({}, {"force_fp8": True}, None, "W8A8 FP8 GEMM, dynamic per-tensor activation scales"),
    "fp8-scaled-mm-row": ({}, {"force_fp8": True, "activation": "row"}, None, "W8A8, dynamic per-row activation scales"),
    "fp8-static": ({}, {"force_fp8": True}, None, "W8A8 with calibrated static input scales (needs --calibration)"),
    # torch.compile'd transformers (the first step compiles: bench's warm-up image excludes it)
    "bf16-compile": ({"transformer": "bf16"}, {"compile": True}, None, "16-bit baseline, torch.compile'd"),
    "fp8-compile": ({}, {"compile": True}, None, "sd3fp8's default, torch.compile'd (fused activation quantization)"),
    "fp8-static-compile": ({}, {"force_fp8": True, "compile": True}, None, "W8A8 static scales, torch.compile'd (needs --calibration)"),
    "fp8-cast": ({"transformer": "auto"}, {}, "plain-cast", "plain FP8 cast without scales, upcast per layer (naive fp8 files)"),
    "diffusers-layerwise": ({"transformer": "auto"}, {}, "layerwise", "diffusers layerwise casting (FP8 storage)"),
    "quanto-qfloat8": ({"transformer": "auto"}, {}, "quanto", "optimum-quanto qfloat8 weights"),
    "torchao-float8-wo": ({"transformer": "auto"}, {}, "torchao-wo", "torchao float8 weight-only"),
    "torchao-float8-dq": ({"transformer": "auto"}, {}, "torchao-dq", "torchao float8 dynamic activation (CUDA CC >= 8.9)"),
}
ALIASES = {"sd3fp8": "fp8", "sd3fp8-scaled-mm": "fp8-scaled-mm", "sd3fp8-static": "fp8-static", "plain-cast": "fp8-cast",
           "sd3fp8-compile": "fp8-compile", "sd3fp8-static-compile": "fp8-static-compile"}
CALIBRATED = ("fp8-static", "fp8-static-compile")  # static input scales from the calibration file
OTHER_ROUTES = ("fp8-cast", "diffusers-layerwise", "quanto-qfloat8", "torchao-float8-wo", "torchao-float8-dq")
KEEP = re.compile(r"fp8-static-keep(\d+(?:\.\d+)?)")  # fp8-static-keep2 = static + 2 % kept 16-bit
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One configuration under test."""

    name: str  # as given, with an old spelling replaced by its registry name
    policy: dict  # changes to the base policy
    runtime: dict  # RuntimeConfig fields
    route: str | None = None  # another library's FP8 route (evalkit/routes.py)
    calibrated: bool = False  # static input scales from the calibration file
    keep_budget: float | None = None  # selective precision: % of parameters kept 16-bit by sensitivity

    @property
    def needs_calibration(self) -> bool:
        return self.calibrated or self.keep_budget is not None

    @property
    def transformer_only(self) -> bool:
        """Whether it changes the transformer alone (what a synthetic bench can run)."""
        return not any(k.startswith("text_encoder") for k in self.policy) and not self.needs_calibration


def describe_choices() -> str:
    """The accepted names, for --help."""
    return ", ".join(REGISTRY) + ", fp8-static-keepP (P % kept 16-bit); NAME@fp32, @bf16 or @fp16 sets the compute dtype"


def parse_configuration(spec: str) -> Configuration:
    """``name`` or ``name@dtype``; an unknown name or dtype is a ConfigError naming the choices."""
    name, _, dtype = spec.strip().partition("@")
    name = ALIASES.get(name, name)
    keep = KEEP.fullmatch(name)
    if name not in REGISTRY and not keep:
        raise ConfigError(f"unknown configuration {name!r}: expected one of {describe_choices()}")
    policy, runtime, route, _ = REGISTRY["fp8-static" if keep else name]
    if dtype:
        if dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"unknown compute dtype {dtype!r} in {spec.strip()!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
        runtime = {**runtime, "dtype": dtype}
    return Configuration(name + (f"@{dtype}" if dtype else ""), dict(policy), dict(runtime), route,
                         calibrated=bool(keep) or name in CALIBRATED, keep_budget=float(keep[1]) if keep else None)


def parse_configurations(specs: str | Iterable[str], reference: str | None = None) -> list[Configuration]:
    """Comma-separated names (or a list): the reference first, each configuration once."""
    items = [s for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    configs = [parse_configuration(s) for s in ([reference] if reference else []) + items]
    out: list[Configuration] = []
    for config in configs:
        if config.name not in {c.name for c in out}:
            out.append(config)
    return out


def check_configurations(configs: list[Configuration], calibration: str | Path | None, synthetic: bool = False) -> None:
    """Everything a run needs, checked before the first model loads: a calibration file where a
    configuration needs one, with a sensitivity ranking where it keeps layers by budget."""
    if synthetic:
        bad = [c.name for c in configs if not c.transformer_only]
        if bad:
            raise ConfigError(f"a synthetic transformer has no text encoders and nothing to calibrate on: {', '.join(bad)} cannot run")
        return
    needing = [c for c in configs if c.needs_calibration]
    if not needing:
        return
    if calibration is None:
        verb = "needs" if len(needing) == 1 else "need"
        raise ConfigError(f"{', '.join(c.name for c in needing)} {verb} a calibration file: --calibration FILE (from `sd3fp8 calibrate`)")
    from sd3fp8.fp8.calibration import Calibration
    from sd3fp8.policy import budget_policy

    cal = Calibration.load(calibration)
    for c in needing:
        if c.keep_budget is not None:
            budget_policy(_base(None), cal.sensitivity, cal.transformer_params, c.keep_budget)  # raises without a ranking


def _base(policy: Policy | None) -> Policy:
    from sd3fp8.policy import Policy

    return policy if policy is not None else Policy()


def configured_policy(config: Configuration, base: Policy | None, calibration: str | Path | None = None) -> Policy:
    """The base policy with the configuration's changes (and its budgeted exclusions)."""
    policy = _base(base).replace(**config.policy)
    if config.keep_budget is not None:
        from sd3fp8.fp8.calibration import Calibration
        from sd3fp8.policy import budget_policy

        if calibration is None:
            raise ConfigError(f"{config.name} needs a calibration file")
        cal = Calibration.load(calibration)
        policy, _ = budget_policy(policy, cal.sensitivity, cal.transformer_params, config.keep_budget)
    return policy


def route_layers(base: Policy | None):
    """The layers a route stores in FP8: the ones the base policy makes FP8 (the same for every route)."""
    base = _base(base)
    return base.replace(transformer="fp8-e4m3" if not base.transformer.is_fp8 else base.transformer).layer_filter("transformer")


def load_configuration(model: ModelSpec, config: Configuration, base: Policy | None = None,
                       calibration: str | Path | None = None) -> SD3FP8Pipeline:
    """The engine a configuration runs: loaded under its policy and runtime, its route applied."""
    from sd3fp8.evalkit.routes import apply_route
    from sd3fp8.runtime import RuntimeConfig

    if config.needs_calibration and calibration is None:
        raise ConfigError(f"{config.name} needs a calibration file: --calibration FILE (from `sd3fp8 calibrate`)")
    engine = model.load(configured_policy(config, base, calibration), RuntimeConfig(**config.runtime),
                        calibration=calibration if config.calibrated else None)
    if config.route is not None:
        apply_route(config.route, resident_transformer(engine), route_layers(base), engine.compute_dtype)
    return engine


def resident_transformer(engine: SD3FP8Pipeline):
    """The engine's transformer, which measurements need loaded (no staged offload)."""
    transformer = engine.component("transformer")
    if transformer is None:
        raise ConfigError("measuring a configuration needs its transformer resident (no --offload stages)")
    return transformer
