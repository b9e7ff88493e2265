"""The engine object: load an SD3/SD3.5 model offline under a precision policy, and generate.

Generation is three steps the engine owns: ``encode`` (prompts -> Conditioning), ``denoise``
(a sampler function driving a model wrapper, k-diffusion style, float32 latent state) and
``decode`` (latents -> images), on diffusers' and transformers' model classes. Load once, call
many times; one thread generates at a time, others may read the engine's state meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from sd3fp8.engine.denoise import SAMPLERS, Conditioning, diffusers_sigmas, flow_denoiser
from sd3fp8.engine.request import RECIPE_FILE, GenerationRequest, Recipe
from sd3fp8.errors import ModelLoadError
from sd3fp8.fp8.linear import resolve_backend
from sd3fp8.fp8.swap import fp8_layers as fp8_layers_of
from sd3fp8.policy import COMPONENTS, Policy, Precision
from sd3fp8.runtime import RuntimeConfig

__all__ = ["RECIPE_FILE", "GenerationRequest", "GenerationResult", "Recipe", "RuntimeConfig", "SD3FP8Pipeline",
           "check_model_folder"]

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

log = logging.getLogger(__name__)
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



@dataclasses.dataclass
class GenerationResult:
    images: list  # PIL images, or float32 latents [C, h, w] for output="latent"
    parameters: list[dict]  # one dict per image: everything needed to reproduce it
    seconds: float


class SD3FP8Pipeline:
    """An SD3/SD3.5 pipeline whose components are stored as a Policy says.

    >>> pipe = SD3FP8Pipeline.from_pretrained("path/to/sd3.5-medium")  # doctest: +SKIP
    >>> result = pipe("a red circle", seed=1)                          # doctest: +SKIP
    >>> result.images[0].save("out.png")                               # doctest: +SKIP
    """

    def __init__(self, pipe, policy: Policy, runtime: RuntimeConfig, model_path: Path, compute_dtype, device, fp8_layers, recipe,
                 sources=None, stage_loader: Callable | None = None, calibration=None, clip_counter=None):
        # diffusers' StableDiffusion3Pipeline holds the resident components, tokenizers and scheduler
        # config; generation does not go through its __call__ but through encode/denoise/decode.
        self._pipe = pipe
        self.policy, self.runtime = policy, runtime
        self.model_path, self.compute_dtype, self.device = model_path, compute_dtype, device
        self.fp8_layers = fp8_layers  # component -> names of its FP8Linear modules
        self.recipe = recipe
        self.sources = sources  # where each component came from (sources.ModelSources)
        self.stage_loader = stage_loader  # offload=stages: component name -> (module, fp8 names)
        self.calibration = calibration  # calibration.Calibration applied to the transformer, if any
        self.clip_counter = clip_counter  # linear.ClipCounter when runtime.watch_clipping
        self._lock = threading.Lock()  # one generation at a time

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
        from sd3fp8.engine.loader import load_engine_parts

        return cls(**load_engine_parts(path, policy or Policy(), runtime or RuntimeConfig(), transformer_file, checkpoint,
                                       extra_files, tokenizers, calibration))

    # ---- what callers may read -------------------------------------------------------------

    def component(self, name: str) -> nn.Module | None:
        """A resident component (transformer, text_encoder, text_encoder_2, text_encoder_3, vae), or
        None when it is off or loaded only while it runs (offload=stages). For inspection and
        measurement; generation never needs it."""
        if name not in COMPONENTS:
            raise KeyError(f"unknown component {name!r}: expected one of {', '.join(COMPONENTS)}")
        return getattr(self._pipe, name, None)

    def is_staged(self, name: str) -> bool:
        """Whether ``name`` is loaded only while it runs (offload=stages)."""
        return self.stage_loader is not None and self.component(name) is None and name in self.sources.files

    @property
    def latent_channels(self) -> int:
        return self._pipe.vae.config.latent_channels  # the VAE stays loaded in every offload mode

    @property
    def vae_scale_factor(self) -> int:
        return self._pipe.vae_scale_factor

    # ---- generation ------------------------------------------------------------------------

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
        request = GenerationRequest(prompt if isinstance(prompt, str) else tuple(prompt), negative_prompt, steps, cfg,
                                    seed, width, height, batch)
        return self.generate(request, callback)

    def latents(self, prompt: str, *, seed: int = 0, steps: int | None = None, cfg: float | None = None) -> torch.Tensor:
        """The final latents (before the VAE) of one image: what calibration and sensitivity compare."""
        return self.generate(GenerationRequest(prompt, None, steps, cfg, seed), output="latent").images[0]

    def generate(self, request: GenerationRequest, callback: Callable[[dict], None] | None = None,
                 output: str = "pil") -> GenerationResult:
        """encode -> denoise -> decode for ``request`` (open fields filled from the model's recipe)."""
        request = request.resolved(self.recipe)
        with self._lock, torch.inference_mode():
            start = time.perf_counter()
            conditioning = self.encode(request.image_prompts(), request.negative_prompt, request.cfg > 1)
            noise = self.initial_noise(request.seeds(), request.width, request.height)
            latents = self.denoise(request, conditioning, noise, callback)
            images = list(latents) if output == "latent" else self.decode(latents)
            seconds = time.perf_counter() - start
        params = [self.parameters(p, request.negative_prompt, s, request.steps, request.cfg, request.width, request.height)
                  for p, s in zip(request.image_prompts(), request.seeds())]
        return GenerationResult(images, params, seconds)

    def encode(self, prompts: list[str], negative_prompt: str | None, guidance: bool) -> Conditioning:
        """Text conditioning for one image per prompt (diffusers' encoding: CLIP-L/G truncated at 77
        tokens, T5 padded/truncated to the recipe's max_sequence_length)."""
        negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
        with self.stage(*TEXT_ENCODERS) as modules:
            encoder = self._pipe if not modules else self._staged_text_pipeline(modules)
            embeds = encoder.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=negatives,
                do_classifier_free_guidance=guidance, device=self.device,
                max_sequence_length=self.recipe.max_sequence_length,
            )
        context, negative_context, pooled, negative_pooled = embeds
        return Conditioning(context, pooled, negative_context if guidance else None, negative_pooled if guidance else None)

    def denoise(self, request: GenerationRequest, conditioning: Conditioning, noise: torch.Tensor,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Float32 latents after ``request.steps`` sampler steps from ``noise`` (txt2img)."""
        request = request.resolved(self.recipe)
        sigmas = diffusers_sigmas(self._pipe.scheduler, request.steps).to(self.device)
        x = noise.to(self.device, torch.float32) * sigmas[0]

        def on_step(info):
            if callback is not None:
                callback({"step": info["i"] + 1, "total": request.steps, "timestep": float(info["sigma"]) * 1000})

        with self.stage("transformer") as modules:
            transformer = modules["transformer"] if "transformer" in modules else self._pipe.transformer
            model = flow_denoiser(transformer, conditioning, request.cfg, self.compute_dtype)
            return SAMPLERS["euler"](model, x, sigmas, callback=on_step)

    def decode(self, latents: torch.Tensor) -> list:
        """PIL images from float32 latents [B, C, h, w]."""
        vae = self._pipe.vae
        z = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return self._pipe.image_processor.postprocess(image, output_type="pil")

    # ---- staged components -----------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, *names: str) -> Iterator[dict[str, nn.Module]]:
        """With offload=stages: ``names`` loaded for the duration of the block, as a dict (the
        engine's own state is not touched, so other threads may read it meanwhile); else {}."""
        if self.stage_loader is None:
            yield {}
            return
        modules = {}
        try:
            for name in names:
                if name != "text_encoder_3" or self.policy.text_encoder_3 is not Precision.OFF:
                    modules[name] = self.stage_loader(name)[0]
            yield modules
        finally:
            modules.clear()
            gc.collect()

    def _staged_text_pipeline(self, modules: dict[str, nn.Module]):
        """A short-lived diffusers pipeline around staged text encoders, for its encode_prompt."""
        from diffusers import StableDiffusion3Pipeline

        p = self._pipe
        return StableDiffusion3Pipeline(scheduler=p.scheduler, vae=None, transformer=None, tokenizer=p.tokenizer,
                                        tokenizer_2=p.tokenizer_2, tokenizer_3=p.tokenizer_3,
                                        text_encoder=modules.get("text_encoder"), text_encoder_2=modules.get("text_encoder_2"),
                                        text_encoder_3=modules.get("text_encoder_3"))

    # ---- noise and reporting ---------------------------------------------------------------

    def initial_noise(self, seeds: list[int], width: int, height: int) -> torch.Tensor:
        """Gaussian latents drawn on the CPU in float32 from each seed: identical across devices and precisions."""
        f = self.vae_scale_factor
        noise = [
            torch.randn((1, self.latent_channels, height // f, width // f), generator=torch.Generator("cpu").manual_seed(s))
            for s in seeds
        ]
        return torch.cat(noise)

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
        transformer = self.component("transformer")
        if transformer is None:  # offload=stages: loaded only while denoising
            fp8 = self.policy.transformer.is_fp8
            return resolve_backend(self.runtime.backend, self.device, self.runtime.force_fp8).value if fp8 else "none"
        backends = sorted({m.backend.value for m in fp8_layers_of(transformer).values()})
        return "+".join(backends) if backends else "none"

    def clipping_report(self) -> list[dict] | None:
        """Layers whose live activations exceeded their calibrated range (with watch_clipping), worst first."""
        return None if self.clip_counter is None else self.clip_counter.report()
