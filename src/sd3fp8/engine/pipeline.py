"""The engine object: load an SD3/SD3.5 model offline, apply a precision policy, generate images.

Generation runs through diffusers' StableDiffusion3Pipeline; our part is loading, the policy,
reproducible noise and reporting. Load once, call many times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sd3fp8.engine.requests import check_prompt, check_seed
from sd3fp8.errors import ConfigError
from sd3fp8.fp8.calibration import Calibration, apply_calibration
from sd3fp8.fp8.linear import ClipCounter, resolve_backend
from sd3fp8.fp8.swap import fp8_layers as fp8_layers_of
from sd3fp8.io import schemas
from sd3fp8.io.components import FileSource
from sd3fp8.io.folders import check_model_folder  # noqa: F401  (re-exported: the CLI imports it from here)
from sd3fp8.policy import COMPONENTS, Policy, Precision
from sd3fp8.runtime import RuntimeConfig, resolve_compute_dtype, resolve_device

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

log = logging.getLogger(__name__)

MAX_SIDE = 4096  # pixels; SD3.5 is trained up to ~1.5 MP, beyond this is a typo, not a request
MAX_BATCH = 64
MAX_STEPS = 1000
RECIPE_FILE = "sd3fp8.json"  # optional per-model defaults (steps, cfg, size) beside model_index.json


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
        data.update(schemas.recipe(recipe_file)["defaults"])
    return Recipe(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(Recipe)}})


# Model-card recipes by architecture (Large and Large Turbo share shapes: Turbo users pass --steps 4 --cfg 0).
VARIANT_RECIPES = {"SD3 Medium": {"steps": 28, "cfg": 7.0}, "SD3.5 Medium": {"steps": 40, "cfg": 4.5},
                   "SD3.5 Large / Large Turbo": {"steps": 28, "cfg": 3.5}}


def variant_recipe(variant: str, default_side: int) -> Recipe:
    return Recipe(**VARIANT_RECIPES.get(variant, {}), width=default_side, height=default_side)


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

    def __init__(self, pipe, policy: Policy, runtime: RuntimeConfig, model_path: Path, compute_dtype, device, fp8_layers, recipe,
                 sources=None, stage_loader: Callable | None = None, calibration=None, clip_counter=None):
        self.pipe, self.policy, self.runtime = pipe, policy, runtime
        self.model_path, self.compute_dtype, self.device = model_path, compute_dtype, device
        self.fp8_layers = fp8_layers  # component -> names of its FP8Linear modules
        self.recipe = recipe
        self.sources = sources  # where each component came from (sources.ModelSources)
        self.stage_loader = stage_loader  # offload=stages: component name -> (module, fp8 names)
        self.calibration = calibration  # calibration.Calibration applied to the transformer, if any
        self.clip_counter = clip_counter  # linear.ClipCounter when runtime.watch_clipping

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, policy: Policy | None = None, runtime: RuntimeConfig | None = None,
        transformer_file: str | Path | None = None, *, checkpoint: str | None = None,
        extra_files: tuple[str | Path, ...] = (), tokenizers: str | Path | None = None,
        calibration: str | Path | None = None,
    ) -> SD3FP8Pipeline:
        """Load a model (default: the bundled one) and store its components as ``policy`` says.

        ``path``: a diffusers folder, a single-file checkpoint (original layout, any precision,
        all-in-one or MMDiT only) or a ComfyUI tree (``checkpoint`` picks the file when it has several).
        ``extra_files``: text-encoder / VAE files or folders for a single-file checkpoint.
        ``tokenizers``: a diffusers SD3.5 download or a ComfyUI root (single files carry none).
        ``transformer_file``: take the MMDiT from this file; the model supplies everything else.
        ``calibration``: a calibration file (`sd3fp8 calibrate`): its static input scales go to the
        transformer's FP8 layers (used by scaled-mm); ``runtime.watch_clipping`` counts clipped calls.
        """
        from diffusers import StableDiffusion3Pipeline

        from sd3fp8.io.loading import LoadSettings, effective_policy, load_component, load_scheduler, load_tokenizers
        from sd3fp8.io.preflight import check_before_loading
        from sd3fp8.io.sources import resolve_sources

        policy = policy or Policy()
        runtime = runtime or RuntimeConfig()
        device = resolve_device(runtime.device)
        compute_dtype = resolve_compute_dtype(runtime.dtype, device, policy.transformer)
        if runtime.offload == "model" and device.type == "cpu":
            raise ConfigError("--offload model needs a GPU (it moves components between CPU and GPU); this run is on the CPU: use --offload none or stages")
        resolve_backend(runtime.backend, device, runtime.force_fp8)  # fail early on a bad request
        cal = Calibration.load(calibration) if calibration is not None else None  # ... or a bad calibration file
        sources = resolve_sources(path, policy, checkpoint, tuple(Path(p) for p in extra_files), Path(tokenizers) if tokenizers else None)
        if sources.folder is not None:
            check_model_folder(sources.folder)
        if transformer_file is not None:
            sources = dataclasses.replace(sources, files={**sources.files, "transformer": FileSource(Path(transformer_file))})
        policy = effective_policy(policy, sources)
        check_before_loading(sources, policy, device, compute_dtype, runtime.offload)  # fit and memory, from configs
        settings = LoadSettings(device, compute_dtype, runtime.backend, runtime.force_fp8, runtime.activation)
        with_t5 = policy.text_encoder_3 is not Precision.OFF
        tokenizer_set = load_tokenizers(sources, with_t5)
        staged = ("transformer",) + TEXT_ENCODERS if runtime.offload == "stages" else ()

        clip_counter = ClipCounter() if runtime.watch_clipping else None

        def load(name):
            module, names = load_component(name, sources, policy, settings, tokenizer_set)
            if name == "transformer" and cal is not None:
                uncovered = apply_calibration(module, cal, sources.label)
                if uncovered:
                    log.warning("calibration has no statistics for %d FP8 layers (dynamic scales there): %s", len(uncovered), uncovered[:5])
            if name == "transformer" and clip_counter is not None:
                for layer_name, layer in fp8_layers_of(module).items():
                    layer.clip_watch = (clip_counter, layer_name)
            return module, names

        resident = {}
        fp8_layers = {}
        for name in COMPONENTS:
            if name in staged or (name == "text_encoder_3" and not with_t5):
                resident[name] = None
                continue
            resident[name], fp8_layers[name] = load(name)
        pipe = StableDiffusion3Pipeline(scheduler=load_scheduler(sources), **resident, tokenizer=tokenizer_set["tokenizer"],
                                        tokenizer_2=tokenizer_set["tokenizer_2"], tokenizer_3=tokenizer_set.get("tokenizer_3"))
        pipe.set_progress_bar_config(disable=True)  # we report steps through our own callback
        if runtime.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        model_path = sources.folder or Path(sources.label)
        sample_size = sources.mmdit.mmdit_config["sample_size"] if sources.mmdit else None
        if sample_size is None:
            sample_size = (pipe.transformer.config.sample_size if pipe.transformer is not None
                           else schemas.transformer_config(sources.folder / "transformer" / "config.json")["sample_size"])
        side = sample_size * pipe.vae_scale_factor
        recipe = read_recipe(sources.folder, side) if sources.folder else variant_recipe(sources.mmdit.variant, side)
        return cls(pipe, policy, runtime, model_path, compute_dtype, device, fp8_layers, recipe, sources,
                   load if staged else None, cal, clip_counter)

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
        return self._run(prompt, negative_prompt, steps, cfg, seed, width, height, batch, callback, "pil")

    def latents(self, prompt: str, *, seed: int = 0, steps: int | None = None, cfg: float | None = None) -> torch.Tensor:
        """The final latents (before the VAE) of one image: what calibration and sensitivity compare."""
        return self._run(prompt, None, steps, cfg, seed, None, None, 1, None, "latent").images[0]

    def _run(self, prompt, negative_prompt, steps, cfg, seed, width, height, batch, callback, output_type) -> GenerationResult:
        steps = self.recipe.steps if steps is None else steps
        cfg = self.recipe.cfg if cfg is None else cfg
        width = self.recipe.width if width is None else width
        height = self.recipe.height if height is None else height
        validate_request(steps, cfg, width, height, batch)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        check_seed(seed, batch)
        for text in prompts:
            check_prompt(text)
        check_prompt(negative_prompt, "negative prompt")
        seeds = [seed + i for _ in prompts for i in range(batch)]
        latents = self.initial_noise(seeds, width, height)

        def on_step_end(pipe, i, t, kwargs):
            if callback is not None:
                callback({"step": i + 1, "total": steps, "timestep": float(t)})
            return kwargs

        start = time.perf_counter()
        text = {"prompt": [p for p in prompts for _ in range(batch)],
                "negative_prompt": None if negative_prompt is None else [negative_prompt] * len(seeds)}
        with torch.inference_mode():
            if self.stage_loader is not None:
                text = self.encode_in_stage(text, cfg > 1)
            with self.stage("transformer"):
                out = self.pipe(
                    **text, num_inference_steps=steps, guidance_scale=cfg, width=width, height=height,
                    latents=latents, callback_on_step_end=on_step_end, output_type=output_type,
                    max_sequence_length=self.recipe.max_sequence_length,
                )
        seconds = time.perf_counter() - start
        params = [
            self.parameters(p, negative_prompt, s, steps, cfg, width, height)
            for p, s in zip([p for p in prompts for _ in range(batch)], seeds)
        ]
        return GenerationResult(out.images, params, seconds)

    @contextlib.contextmanager
    def stage(self, *names: str):
        """With offload=stages: load ``names`` for the duration of the block, then free them."""
        if self.stage_loader is None:
            yield
            return
        for name in names:
            if name != "text_encoder_3" or self.policy.text_encoder_3 is not Precision.OFF:
                setattr(self.pipe, name, self.stage_loader(name)[0])
        try:
            yield
        finally:
            for name in names:
                setattr(self.pipe, name, None)
            gc.collect()

    def encode_in_stage(self, text: dict, guidance: bool) -> dict:
        """Prompt embeddings computed with the text encoders loaded only for this."""
        with self.stage(*TEXT_ENCODERS):
            embeds = self.pipe.encode_prompt(
                prompt=text["prompt"], prompt_2=None, prompt_3=None, negative_prompt=text["negative_prompt"],
                do_classifier_free_guidance=guidance, device=self.device,
                max_sequence_length=self.recipe.max_sequence_length,
            )
        keys = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return {k: v for k, v in zip(keys, embeds) if v is not None}

    def initial_noise(self, seeds: list[int], width: int, height: int) -> torch.Tensor:
        """Gaussian latents drawn on the CPU in float32 from each seed: identical across devices and precisions."""
        channels = self.pipe.vae.config.latent_channels  # the VAE stays loaded in every offload mode
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
        if self.pipe.transformer is None:  # offload=stages: loaded only while denoising
            fp8 = self.policy.transformer.is_fp8
            return resolve_backend(self.runtime.backend, self.device, self.runtime.force_fp8).value if fp8 else "none"
        backends = sorted({m.backend.value for m in fp8_layers_of(self.pipe.transformer).values()})
        return "+".join(backends) if backends else "none"
