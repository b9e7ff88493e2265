"""The engine object: load an SD3/SD3.5 model offline, apply a precision policy, generate images.

Generation runs through diffusers' StableDiffusion3Pipeline; our part is loading, the policy,
reproducible noise and reporting. Load once, call many times.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .errors import ConfigError, ModelLoadError
from .linear import ActivationScaling, Backend, resolve_backend
from .policy import COMPONENTS, Policy, Precision
from .swap import quantize_linears

log = logging.getLogger(__name__)

MAX_SIDE = 4096  # pixels; SD3.5 is trained up to ~1.5 MP, beyond this is a typo, not a request
MAX_BATCH = 64
MAX_STEPS = 1000
RECIPE_FILE = "sd3fp8.json"  # optional per-model defaults (steps, cfg, size) beside model_index.json


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the model runs (as opposed to how it is stored: that is the Policy)."""

    device: str = "auto"  # auto = cuda if present, else cpu
    dtype: str = "auto"  # compute dtype: auto, bf16, fp16, fp32
    backend: Backend = Backend.AUTO
    force_fp8: bool = False  # run scaled-mm even without FP8 tensor cores (slow on CPU; for testing)
    activation: ActivationScaling = ActivationScaling.TENSOR
    offload: str = "none"  # none | model (diffusers' model CPU offload; needs an accelerator)

    def __post_init__(self):
        object.__setattr__(self, "backend", Backend.parse(self.backend))
        object.__setattr__(self, "activation", ActivationScaling.parse(self.activation))
        if self.offload not in ("none", "model"):
            raise ConfigError(f"unknown offload mode {self.offload!r}: expected 'none' or 'model'")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"unknown compute dtype {self.dtype!r}: expected auto, bf16, fp16 or fp32")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matmul instructions (AVX512-BF16 or AMX).

    Without them bf16 GEMMs are emulated: 6x slower than fp32 on this machine (AMD EPYC, AVX2).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_compute_dtype(name: str, device: torch.device, transformer: Precision = Precision.FP8_E4M3) -> torch.dtype:
    """The dtype activations flow in.

    A 16/32-bit transformer runs in its own dtype (that is what a "bf16 baseline" means). With
    FP8 weights: bf16 by default, fp32 on CPUs that would emulate bf16.
    """
    if transformer.is_fp8 or transformer is Precision.AUTO:
        if name != "auto":
            return DTYPES[name]
        if device.type == "cpu" and not cpu_has_native_bf16():
            return torch.float32
        return torch.bfloat16
    own = transformer.storage_dtype(torch.float32)
    if name != "auto" and DTYPES[name] != own:
        raise ConfigError(f"precision {transformer.value} runs the transformer in {transformer.value}; --dtype {name} contradicts it")
    return own


def check_model_folder(path: Path) -> dict:
    """Validate a diffusers SD3 folder and return its model_index.json."""
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json)")
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{index} is not valid JSON: {e}") from None
    if data.get("_class_name") != "StableDiffusion3Pipeline":
        raise ModelLoadError(f"{path} holds a {data.get('_class_name')!r}, not a StableDiffusion3Pipeline")
    missing = [c for c in ("transformer", "vae", "scheduler") if not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{path} lacks component folder(s): {', '.join(missing)}")
    return data


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Generation defaults for a model (from its sd3fp8.json, else SD3.5's usual ones)."""

    steps: int = 28
    cfg: float = 4.5
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = 256  # T5 tokens


def read_recipe(path: Path, default_side: int) -> Recipe:
    data = {"width": default_side, "height": default_side}
    recipe_file = path / RECIPE_FILE
    if recipe_file.is_file():
        data.update(json.loads(recipe_file.read_text()).get("defaults", {}))
    return Recipe(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(Recipe)}})


@dataclasses.dataclass
class GenerationResult:
    images: list  # PIL images
    parameters: list[dict]  # one dict per image: everything needed to reproduce it
    seconds: float


def validate_request(steps: int, cfg: float, width: int, height: int, batch: int) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    if not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise ConfigError(f"batch must be an integer in 1..{MAX_BATCH}, got {batch!r}")
    if not (cfg == cfg) or cfg < 0 or cfg > 100:  # cfg == cfg rejects NaN
        raise ConfigError(f"cfg must be in 0..100, got {cfg!r}")
    for name, side in (("width", width), ("height", height)):
        if not isinstance(side, int) or side < 16 or side % 16 or side > MAX_SIDE:
            raise ConfigError(f"{name} must be a multiple of 16 in 16..{MAX_SIDE}, got {side!r}")


class SD3FP8Pipeline:
    """An SD3/SD3.5 pipeline whose components are stored as a Policy says.

    >>> pipe = SD3FP8Pipeline.from_pretrained("path/to/sd3.5-medium")  # doctest: +SKIP
    >>> result = pipe("a red circle", seed=1)                          # doctest: +SKIP
    >>> result.images[0].save("out.png")                               # doctest: +SKIP
    """

    def __init__(self, pipe, policy: Policy, runtime: RuntimeConfig, model_path: Path, compute_dtype, device, fp8_layers, recipe):
        self.pipe, self.policy, self.runtime = pipe, policy, runtime
        self.model_path, self.compute_dtype, self.device = model_path, compute_dtype, device
        self.fp8_layers = fp8_layers  # component -> names of its FP8Linear modules
        self.recipe = recipe

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, policy: Policy | None = None, runtime: RuntimeConfig | None = None,
        transformer_file: str | Path | None = None,
    ) -> SD3FP8Pipeline:
        """Load a diffusers-format SD3 folder (default: the bundled model) and apply ``policy``.

        ``transformer_file``: take the MMDiT from an original-layout single file instead (16-bit,
        plain FP8, ComfyUI scaled FP8 or sd3fp8 format); the folder supplies everything else.
        """
        from diffusers import StableDiffusion3Pipeline

        from .models import default_model_path

        policy = policy or Policy()
        runtime = runtime or RuntimeConfig()
        path = Path(path) if path is not None else default_model_path()
        check_model_folder(path)
        device = resolve_device(runtime.device)
        compute_dtype = resolve_compute_dtype(runtime.dtype, device, policy.transformer)
        if runtime.offload == "model" and device.type == "cpu":
            raise ConfigError("--offload model needs a GPU (it moves components between CPU and GPU); this run is on the CPU: use --offload none")
        backend = resolve_backend(runtime.backend, device, runtime.force_fp8)  # fail early on a bad request

        dtypes = {c: policy.precision(c).storage_dtype(compute_dtype) for c in COMPONENTS}
        extra = {}
        if policy.text_encoder_3 is Precision.OFF:
            extra = {"text_encoder_3": None, "tokenizer_3": None}
        fp8_layers = {}
        if transformer_file is not None:
            from .singlefile import load_mmdit

            extra["transformer"], fp8_layers["transformer"], detection = load_mmdit(
                transformer_file, policy, dtypes["transformer"], device, runtime.backend, runtime.force_fp8, runtime.activation
            )
            log.info("transformer from %s: %s", transformer_file, detection.describe())
        try:
            with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older ones know only it
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = StableDiffusion3Pipeline.from_pretrained(
                    path, local_files_only=True, torch_dtype={**dtypes, "default": compute_dtype}, **extra
                )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelLoadError(f"cannot load {path}: {e}") from None
        pipe.set_progress_bar_config(disable=True)  # we report steps through our own callback

        for component in COMPONENTS:
            module = getattr(pipe, component, None)
            precision = policy.precision(component)
            if module is None or not precision.is_fp8 or component in fp8_layers:
                continue
            fp8_layers[component] = quantize_linears(
                module, policy.layer_filter(component), precision.fp8_format, policy.granularity,
                # text encoders run once per prompt: weight-only is cheaper than quantizing activations
                backend if component == "transformer" else Backend.WEIGHT_ONLY,
                device=device, force_fp8=runtime.force_fp8 and component == "transformer", activation=runtime.activation,
            )
            log.info("%s: %d linears stored in %s", component, len(fp8_layers[component]), precision.value)
        if runtime.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        default_side = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        return cls(pipe, policy, runtime, path, compute_dtype, device, fp8_layers, read_recipe(path, default_side))

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | None = None,
        *,
        steps: int | None = None,
        cfg: float | None = None,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        callback: Callable[[dict], None] | None = None,
    ) -> GenerationResult:
        """Generate ``batch`` images per prompt. Image i of a batch uses seed ``seed + i``, so any
        image can be regenerated alone. ``callback`` receives {"step", "total", "timestep"} after
        every denoising step."""
        steps = self.recipe.steps if steps is None else steps
        cfg = self.recipe.cfg if cfg is None else cfg
        width = self.recipe.width if width is None else width
        height = self.recipe.height if height is None else height
        validate_request(steps, cfg, width, height, batch)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = [seed + i for _ in prompts for i in range(batch)]
        latents = self.initial_noise(seeds, width, height)

        def on_step_end(pipe, i, t, kwargs):
            if callback is not None:
                callback({"step": i + 1, "total": steps, "timestep": float(t)})
            return kwargs

        start = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(
                prompt=[p for p in prompts for _ in range(batch)],
                negative_prompt=None if negative_prompt is None else [negative_prompt] * len(seeds),
                num_inference_steps=steps, guidance_scale=cfg, width=width, height=height,
                latents=latents, callback_on_step_end=on_step_end, output_type="pil",
                max_sequence_length=self.recipe.max_sequence_length,
            )
        seconds = time.perf_counter() - start
        params = [
            self.parameters(p, negative_prompt, s, steps, cfg, width, height)
            for p, s in zip([p for p in prompts for _ in range(batch)], seeds)
        ]
        return GenerationResult(out.images, params, seconds)

    def initial_noise(self, seeds: list[int], width: int, height: int) -> torch.Tensor:
        """Gaussian latents drawn on the CPU in float32 from each seed: identical across devices and precisions."""
        channels = self.pipe.transformer.config.in_channels
        f = self.pipe.vae_scale_factor
        noise = [
            torch.randn((1, channels, height // f, width // f), generator=torch.Generator("cpu").manual_seed(s))
            for s in seeds
        ]
        return torch.cat(noise).to(self.device, self.compute_dtype)

    def parameters(self, prompt, negative, seed, steps, cfg, width, height) -> dict:
        return {
            "prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps, "cfg": cfg,
            "width": width, "height": height, "precision": self.policy.transformer.value,
            "t5": self.policy.text_encoder_3.value, "granularity": self.policy.granularity.value,
            "backend": self.transformer_backend(), "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "device": str(self.device), "model": str(self.model_path),
            "policy": self.policy.to_dict(),
        }

    def transformer_backend(self) -> str:
        """The backend the transformer's FP8 layers run (or "none" when it is not FP8)."""
        from .swap import fp8_layers

        backends = sorted({m.backend.value for m in fp8_layers(self.pipe.transformer).values()})
        return "+".join(backends) if backends else "none"
