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
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from sd3fp8.engine.denoise import Conditioning, scheduler_shift, transformer_predictor
from sd3fp8.engine.fastpath import fp8_forms
from sd3fp8.engine.request import RECIPE_FILE, GenerationRequest, Recipe
from sd3fp8.engine.text import ENCODINGS, TextLayout, TextMode, layout_of
from sd3fp8.fp8.linear import Backend
from sd3fp8.fp8.swap import fp8_layers as fp8_layers_of
from sd3fp8.io.folders import check_model_folder
from sd3fp8.policy import COMPONENTS, Policy, Precision
from sd3fp8.runtime import RuntimeConfig
from sd3fp8.sampling import Cond, FlowSampling, LatentFormat, cfg_denoiser, initial_noise, sample, sigmas_for

__all__ = ["RECIPE_FILE", "GenerationRequest", "GenerationResult", "Recipe", "RuntimeConfig", "SD3FP8Pipeline",
           "check_model_folder"]

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

log = logging.getLogger(__name__)
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
                 sources=None, stage_loader: Callable | None = None, calibration=None, clip_counter=None,
                 context_width: int = 4096, backend: Backend | None = None):
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
        self.context_width = context_width  # the transformer's joint_attention_dim (4096 for SD3.x)
        self.backend = backend  # the transformer's FP8 backend as resolved at load (layers may fall back, see describe())
        self.forms_run: dict[str, int] = {}  # FP8 form -> layers, as of the last denoising run
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
        callback: Callable[[dict], None] | None = None,
        **options,
    ) -> GenerationResult:
        """Generate ``batch`` images per prompt; ``options`` are GenerationRequest's fields (steps,
        cfg, seed, width, height, batch, sampler, scheduler, shift, denoise, init_image,
        batch_index). ``callback`` receives {"step", "total", "timestep", "sigma", "denoised"} after
        every sampler step; raising from it stops the generation."""
        request = GenerationRequest(prompt if isinstance(prompt, str) else tuple(prompt), negative_prompt, **options)
        return self.generate(request, callback)

    def latents(self, prompt: str, *, seed: int = 0, steps: int | None = None, cfg: float | None = None) -> torch.Tensor:
        """The final latents (before the VAE) of one image: what calibration and sensitivity compare."""
        return self.generate(GenerationRequest(prompt, None, steps, cfg, seed), output="latent").images[0]

    def generate(self, request: GenerationRequest, callback: Callable[[dict], None] | None = None,
                 output: str = "pil") -> GenerationResult:
        """encode -> denoise -> decode for ``request`` (open fields filled from the model's recipe);
        each prompt's batch is one sampler run, as one ComfyUI workflow run is."""
        request = self.resolve(request)
        images, params = [], []
        with self._lock, torch.inference_mode():
            start = time.perf_counter()
            latent = None if request.init_image is None else self.encode_image(request.init_image, request.width, request.height)
            for prompt in request.prompts:
                conditioning = self.encode(prompt, request.negative_prompt, request.text_mode)
                latents = self.denoise(request, conditioning, self.initial_noise(request), latent, callback)
                images += list(latents) if output == "latent" else self.decode(latents)
                params += [self.parameters(request, prompt, i) for i in range(request.batch_index, request.batch_index + request.batch)]
            seconds = time.perf_counter() - start
        return GenerationResult(images, params, seconds)

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """Open fields filled from the recipe; an init image sets the size the recipe would."""
        if request.init_image is not None and request.width is None and request.height is None:
            from sd3fp8.engine.images import size_for

            request = dataclasses.replace(request, **dict(zip(("width", "height"), size_for(request.init_image))))
        return request.resolved(self.recipe)

    def encode(self, prompt: str, negative_prompt: str | None, mode: TextMode | str = TextMode.DIFFUSERS) -> Conditioning:
        """Conditioning of one prompt and its negative ("" unless given) in text ``mode``: ComfyUI's
        (CLIP windows of 77, never truncated; T5 >= 77 tokens; prompt weights) or diffusers' (CLIP
        truncated at 77 tokens, T5 padded/truncated to the recipe's max_sequence_length)."""
        mode = TextMode(mode)
        encode = ENCODINGS[mode]
        options = {"max_sequence_length": self.recipe.max_sequence_length} if mode is TextMode.DIFFUSERS else {}
        with self.text_encoders() as (tokenizers, encoders, layout):
            options["layout"] = layout
            positive = encode(prompt, tokenizers, encoders, self.device, self.compute_dtype, **options)
            negative = encode(negative_prompt or "", tokenizers, encoders, self.device, self.compute_dtype, **options)
        return Conditioning((Cond(*positive),), (Cond(*negative),))

    @contextlib.contextmanager
    def text_encoders(self) -> Iterator[tuple[dict, dict, TextLayout]]:
        """(tokenizers, encoders, layout) by engine/text.py's keys for the duration of the block (staged
        encoders loaded): what ``encode`` runs, for callers that tokenize themselves (a workflow's
        CLIPTextEncodeSD3 gives each encoder its own text)."""
        tokenizers = {k: getattr(self._pipe, k, None) for k in ("tokenizer", "tokenizer_2", "tokenizer_3")}
        with self.stage(*TEXT_ENCODERS) as staged:
            encoders = {k: staged[k] if k in staged else self.component(k) for k in TEXT_ENCODERS}
            # the context is as wide as the transformer takes (T5's width when T5 is loaded)
            yield tokenizers, encoders, dataclasses.replace(layout_of(encoders), context_width=self.context_width)

    def encode_image(self, image, width: int, height: int) -> torch.Tensor:
        """VAE latent (mean of the posterior, float32) of a PIL image resized to width x height."""
        from sd3fp8.engine.images import to_pixels

        vae = self.component("vae")
        pixels = to_pixels(image, width, height).to(self.device, vae.dtype)  # [1, 3, H, W] in [-1, 1]
        return vae.encode(pixels).latent_dist.mode().float()

    def denoise(self, request: GenerationRequest, conditioning: Conditioning, noise: torch.Tensor,
                latent: torch.Tensor | None = None, callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """VAE-space float32 latents after sampling from ``noise`` (and, for img2img, the VAE latent
        ``latent`` of the init image) along the request's schedule, as ComfyUI's KSampler does."""
        request = request.resolved(self.recipe)
        sampling = self.flow_sampling(request.shift)
        sigmas = sigmas_for(sampling, request.scheduler, request.steps, request.denoise, request.sampler)
        noise = noise.to(self.device, torch.float32)
        latent = torch.zeros_like(noise) if latent is None else latent.to(self.device, torch.float32).expand_as(noise)

        def on_step(info):
            if callback is not None:
                callback({"step": info["i"] + 1, "total": len(sigmas) - 1, "sigma": float(info["sigma"].flatten()[0]),
                          "timestep": float(sampling.timestep(info["sigma"].flatten()[0])), "denoised": info["denoised"]})

        with self.stage("transformer") as modules:
            transformer = modules["transformer"] if "transformer" in modules else self._pipe.transformer
            model = cfg_denoiser(transformer_predictor(transformer, self.compute_dtype), sampling,
                                 conditioning.positive, conditioning.negative, request.cfg)
            try:
                return sample(model, sampling, noise=noise, latent=latent, sigmas=sigmas.to(self.device), sampler=request.sampler,
                              seed=request.seed, callback=on_step, disable=True, latent_format=self.latent_format)
            finally:
                self.forms_run = fp8_forms(transformer)  # what ran, run-time fallbacks included

    def flow_sampling(self, shift: float | None = None) -> FlowSampling:
        """The model's sigma table (its scheduler's shift unless ``shift`` overrides it)."""
        return FlowSampling(shift=scheduler_shift(self._pipe.scheduler) if shift is None else shift)

    @property
    def latent_format(self) -> LatentFormat:
        config = self._pipe.vae.config
        return LatentFormat(scale_factor=config.scaling_factor, shift_factor=config.shift_factor or 0.0)

    def decode(self, latents: torch.Tensor) -> list:
        """PIL images from float32 VAE-space latents [B, C, h, w]."""
        vae = self._pipe.vae
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
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

    # ---- noise and reporting ---------------------------------------------------------------

    def initial_noise(self, request: GenerationRequest) -> torch.Tensor:
        """ComfyUI's noise for one prompt's batch, float32 on the CPU: one generator seeded with the
        seed, image i its (batch_index + i)-th draw. Identical across devices and precisions."""
        f = self.vae_scale_factor
        shape = (request.batch, self.latent_channels, request.height // f, request.width // f)
        indices = list(range(request.batch_index, request.batch_index + request.batch))
        return initial_noise(shape, request.seed, None if request.batch_index == 0 else indices)

    def parameters(self, request: GenerationRequest, prompt: str, batch_index: int) -> dict:
        """Everything needed to regenerate one image (batch=1 with this batch_index)."""
        return {
            "prompt": prompt, "negative_prompt": request.negative_prompt, "seed": request.seed, "batch_index": batch_index,
            "steps": request.steps, "cfg": request.cfg, "sampler": request.sampler, "scheduler": request.scheduler,
            "shift": request.shift if request.shift is not None else scheduler_shift(self._pipe.scheduler),
            "denoise": request.denoise, "text_mode": request.text_mode.value, "width": request.width, "height": request.height,
            "precision": self.policy.transformer.value, "t5": self.policy.text_encoder_3.value,
            "granularity": self.policy.granularity.value, "backend": self.transformer_backend(),
            "fp8_forms": self.forms_run or fp8_forms(self.component("transformer")), "compile": self.runtime.compile,
            "fast_accum": self.runtime.fast_accum,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."), "device": str(self.device),
            "model": str(self.model_path), "policy": self.policy.to_dict(),
        }

    def transformer_backend(self) -> str:
        """The backend the transformer's FP8 layers run (or "none" when it is not FP8)."""
        transformer = self.component("transformer")
        if transformer is None:  # offload=stages: loaded only while denoising
            fp8 = self.policy.transformer.is_fp8
            return self.backend.value if fp8 and self.backend is not None else "none"
        backends = sorted({m.backend.value for m in fp8_layers_of(transformer).values()})
        return "+".join(backends) if backends else "none"

    def clipping_report(self) -> list[dict] | None:
        """Layers whose live activations exceeded their calibrated range (with watch_clipping), worst first."""
        return None if self.clip_counter is None else self.clip_counter.report()
