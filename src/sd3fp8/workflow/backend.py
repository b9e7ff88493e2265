"""The seam between workflow nodes and the engine: what a node may ask of it, nothing more.

Nodes never import the engine; they call a :class:`Backend`. The engine-backed implementation
(loading through ``sd3fp8.io``, sampling through ``sd3fp8.sampling``) plugs in here; the tests use
a small deterministic fake. Handles returned by the loaders are opaque to the workflow layer: it
wraps them in :class:`~sd3fp8.workflow.types.Model`, ``Clip`` and ``Vae`` and hands them back.
The inventory methods (model_files, sampler_names, scheduler_names) may be called from any thread
(request handlers render /object_info and validate prompts); everything else only from the
executor's worker thread, one call at a time.

Two optional methods (inventory, any thread), looked up with getattr: ``input_limits(class_type)``
-> {input name: {"min", "max", "multiple_of"}}, limits beyond the nodes' /object_info ranges checked
at validation (the engine's size, steps and batch limits); ``preferred_size(ckpt_name)`` -> (w, h)
or None, the size a checkpoint generates at when a template's cannot work (the miniature model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from sd3fp8.workflow.types import Conditioning, InterruptFlag, Latent, Model

# The ComfyUI model folders whose files fill the loader nodes' combo lists.
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae")

# ComfyUI's UNETLoader weight_dtype options; the backend maps them to its precision policy.
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")

# step: 1-based count of finished steps; total: steps in this run; x0: the denoised prediction
# [B, 16, h, w] in the model's latent space (after process_in), for previews, or None.
# May raise Interrupted: that is how a run stops within one step.
StepCallback = Callable[[int, int, "torch.Tensor | None"], None]


@dataclass(frozen=True)
class TextPrompts:
    """What CLIPTextEncode / CLIPTextEncodeSD3 ask to encode: one text per encoder.

    ``empty_padding`` is CLIPTextEncodeSD3's "empty_prompt" (pad with the empty prompt's tokens,
    ComfyUI's default for CLIPTextEncode) vs "none"."""

    clip_l: str
    clip_g: str
    t5xxl: str
    empty_padding: bool = True

    @classmethod
    def single(cls, text: str) -> TextPrompts:
        return cls(clip_l=text, clip_g=text, t5xxl=text)


@dataclass(frozen=True, eq=False)
class SampleRequest:
    """One KSampler run, ComfyUI's ``common_ksampler`` arguments (nodes.py v0.8.0).

    KSampler: add_noise=True, start_step=None, last_step=None, force_full_denoise=False.
    KSamplerAdvanced: add_noise = add_noise == "enable", start_step = start_at_step,
    last_step = end_at_step, force_full_denoise = return_with_leftover_noise != "enable",
    denoise=1.0. The latent's samples may be EmptyLatentImage's 4 channels of zeros: widen them.
    """

    model: Model
    positive: Conditioning
    negative: Conditioning
    latent: Latent
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float = 1.0
    add_noise: bool = True
    start_step: int | None = None
    last_step: int | None = None
    force_full_denoise: bool = False


@runtime_checkable
class Backend(Protocol):
    """Everything the SD3.5 node set needs from an engine."""

    def model_files(self, folder: str) -> list[str]:
        """Loadable files in ``folder`` (one of MODEL_FOLDERS), names as the loaders take them."""
        ...

    def sampler_names(self) -> list[str]:
        """KSampler ``sampler_name`` options, ComfyUI's names, in ComfyUI's order."""
        ...

    def scheduler_names(self) -> list[str]:
        """KSampler ``scheduler`` options, ComfyUI's names, in ComfyUI's order."""
        ...

    def load_checkpoint(self, ckpt_name: str) -> tuple[Any, Any, Any]:
        """CheckpointLoaderSimple: (model, clip, vae) handles from one all-in-one file.
        Loading the same file again should reuse what is loaded."""
        ...

    def load_diffusion_model(self, unet_name: str, weight_dtype: str) -> Any:
        """UNETLoader: the MMDiT alone; ``weight_dtype`` is one of WEIGHT_DTYPES."""
        ...

    def load_text_encoders(self, clip_names: Sequence[str], clip_type: str, device: str) -> Any:
        """CLIPLoader / DualCLIPLoader / TripleCLIPLoader: encoders recognised by content.
        ``clip_type`` is ComfyUI's type ("sd3" for SD3.5), ``device`` "default" or "cpu"."""
        ...

    def load_vae(self, vae_name: str) -> Any:
        """VAELoader."""
        ...

    def encode_text(self, clip: Any, prompts: TextPrompts) -> Conditioning:
        """One conditioning entry (context [1, T, 4096], pooled [1, 2048]) for the prompts."""
        ...

    def sample(self, request: SampleRequest, callback: StepCallback, interrupt: InterruptFlag) -> torch.Tensor:
        """Denoise ``request.latent``; returns samples [B, 16, h, w] in the VAE latent space,
        float32. Calls ``callback`` after every step and stops (raising Interrupted) within one
        step once ``interrupt`` is set."""
        ...

    def vae_decode(self, vae: Any, samples: torch.Tensor) -> torch.Tensor:
        """VAEDecode: latent samples [B, 16, h, w] -> IMAGE [B, 8h, 8w, 3] in [0, 1]."""
        ...

    def vae_encode(self, vae: Any, pixels: torch.Tensor) -> torch.Tensor:
        """VAEEncode: IMAGE [B, H, W, 3] in [0, 1] -> latent samples [B, 16, H/8, W/8]."""
        ...

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """POST /free: drop loaded models and/or cached memory."""
        ...
