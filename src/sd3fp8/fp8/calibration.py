"""Calibration files and statistics: per-layer, per-step activation ranges and the static FP8 input
scales derived from them (the runs that record them are in ``sd3fp8.engine.calibrate``).

Static scales default to the global max / 448 (NVIDIA's recipe); ``percentile`` uses the largest
per-step percentile instead. A calibration file is JSON; it names the model it was made for (a fingerprint of the
transformer's layer shapes and its never-quantized patch embedder) and is refused elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from sd3fp8.errors import ConfigError
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.fp8.numerics import FP8Format
from sd3fp8.io.atomic import atomic_write

FORMAT = "sd3fp8-calibration"
VERSION = 1
PERCENTILES = (99.0, 99.9, 99.99)
SAMPLE_LIMIT = 2**20  # elements per call that the percentiles look at (evenly strided)
ACTIVATION_MAX = FP8Format.E4M3.max


class CalibrationError(ConfigError):
    pass


def fingerprint(linears: list[tuple[str, int, int]], patch_weight: torch.Tensor) -> str:
    """Identity of a transformer that survives FP8 storage: every linear's name and shape, plus the
    patch embedder's weights (a convolution, never quantized) rounded to bf16."""
    h = hashlib.sha256()
    for name, fan_in, fan_out in linears:
        h.update(f"{name}:{fan_in}x{fan_out};".encode())
    h.update(patch_weight.detach().flatten()[:4096].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(transformer: nn.Module) -> str:
    linears = [(n, m.in_features, m.out_features) for n, m in transformer.named_modules() if isinstance(m, (nn.Linear, FP8Linear))]
    return fingerprint(linears, transformer.get_parameter("pos_embed.proj.weight"))


def file_fingerprint(files, config: dict, prefix: str) -> str:
    """The fingerprint of the MMDiT in an original-layout file (``files``: checkpoint.LazyTensors)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    modules = model.named_modules()  # type: ignore[attr-defined]  # ModelMixin is an nn.Module; diffusers' annotations lose it
    linears = [(n, m.in_features, m.out_features) for n, m in modules if isinstance(m, nn.Linear)]
    return fingerprint(linears, files.get(prefix + "x_embedder.proj.weight"))


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A calibration file's content: per-layer, per-step statistics and the scales derived from them."""

    fingerprint: str
    model: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    cfg: float
    size: tuple[int, int]
    timesteps: tuple[float, ...]
    stats: dict  # layer -> {"amax": [per step], "p99": [...], "p99.9": [...], "p99.99": [...]}
    method: str = "max"  # max | percentile
    percentile: float | None = None
    sensitivity: tuple = ()  # ranked [{"name", "error", "params"}], most sensitive first
    transformer_params: int = 0  # what --keep-budget percentages are of

    def __post_init__(self):
        if self.method not in ("max", "percentile"):
            raise CalibrationError(f"unknown calibration method {self.method!r}: expected max or percentile")
        if self.method == "percentile" and not (isinstance(self.percentile, (int, float)) and f"p{self.percentile:g}" in _percentile_keys()):
            raise CalibrationError(f"percentile must be one of {', '.join(f'{p:g}' for p in PERCENTILES)}, got {self.percentile}")

    def input_scales(self) -> dict[str, float]:
        """Static per-tensor scales: the range to cover / 448 (E4M3's largest value)."""
        key = "amax" if self.method == "max" else f"p{self.percentile:g}"
        return {name: max(max(s[key]), 1e-12) / ACTIVATION_MAX for name, s in self.stats.items()}

    def with_method(self, method: str, percentile: float | None = None) -> Calibration:
        return dataclasses.replace(self, method=method, percentile=percentile)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["sensitivity"] = list(self.sensitivity)
        return {"format": FORMAT, "version": VERSION, **data, "input_scales": self.input_scales()}

    def save(self, path: str | Path) -> Path:
        from sd3fp8.io import schemas

        data = self.to_dict()
        # what we write must load back: the same checks as load (NaN statistics are refused here)
        schemas.calibration(json.loads(json.dumps(data)), f"calibration for {path}", CalibrationError)
        return write_json_atomic(Path(path), data)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration file; every value is checked (NaN, negative ranges, wrong types refused)."""
        from sd3fp8.io import schemas
        from sd3fp8.io.safe_read import read_json

        path = Path(path)
        return cls(**schemas.calibration(read_json(path, "calibration", CalibrationError), f"calibration file {path}", CalibrationError))

    def check_model(self, transformer: nn.Module, source: str = "this model") -> None:
        self.check_fingerprint(model_fingerprint(transformer), source)

    def check_fingerprint(self, found: str, source: str) -> None:
        if found != self.fingerprint:
            raise CalibrationError(f"calibration made for model {self.model} (fingerprint {self.fingerprint}) does not "
                                   f"match {source} (fingerprint {found}): calibrate this model with `sd3fp8 calibrate`")


def _percentile_keys() -> list[str]:
    return [f"p{p:g}" for p in PERCENTILES]


def write_json_atomic(path: Path, data: dict) -> Path:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return path


def activation_stats_tensor(x: torch.Tensor) -> torch.Tensor:
    """[amax, p99, p99.9, p99.99] of |x| on x's device (percentiles on at most SAMPLE_LIMIT evenly
    strided elements). The quantiles' q tensor lives on x's device too: torch.quantile refuses a
    CPU q for a CUDA input, which made `sd3fp8 calibrate` fail on GPUs."""
    flat = x.detach().reshape(-1).abs().float()
    if flat.numel() == 0:
        return torch.zeros(1 + len(PERCENTILES), device=x.device)
    sample = flat[:: max(1, flat.numel() // SAMPLE_LIMIT)]
    qs = torch.quantile(sample, torch.tensor([p / 100 for p in PERCENTILES], device=sample.device))
    return torch.cat([flat.max().reshape(1), qs])


def activation_stats(x: torch.Tensor) -> dict[str, float]:
    """amax and percentiles of |x|: one device-to-host copy for all four."""
    return dict(zip(["amax", *_percentile_keys()], activation_stats_tensor(x).tolist()))


class StatsRecorder:
    """Forward pre-hooks on every Linear of a module: per-step maxima of activation statistics."""

    def __init__(self, module: nn.Module):
        self.step = 0
        self.stats: dict[str, dict[str, list[float]]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name))
                         for name, m in module.named_modules() if isinstance(m, (nn.Linear, FP8Linear))]

    def _hook(self, name: str):
        def hook(module, args):
            layer = self.stats.setdefault(name, {})
            for key, value in activation_stats(args[0]).items():
                series = layer.setdefault(key, [])
                while len(series) <= self.step:
                    series.append(0.0)
                series[self.step] = max(series[self.step], value)
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def apply_calibration(transformer: nn.Module, calibration: Calibration, source: str = "this model") -> list[str]:
    """Set static input scales on the transformer's FP8 layers; returns layers left dynamic (no statistics)."""
    calibration.check_model(transformer, source)
    scales = calibration.input_scales()
    uncovered = []
    for name, m in transformer.named_modules():
        if isinstance(m, FP8Linear):
            if name in scales:
                m.set_input_scale(scales[name])
            else:
                uncovered.append(name)
    return uncovered
