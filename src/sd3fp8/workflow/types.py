"""The values that flow along a workflow's links, one type per ComfyUI socket type.

MODEL, CLIP and VAE wrap whatever the engine backend loaded (opaque handles) with the names they
came from; CONDITIONING, LATENT, IMAGE and MASK are plain tensors in ComfyUI's conventions, so the
pure nodes (empty latents, conditioning ops, image load/save) need no backend at all.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from sd3fp8.errors import SD3FP8Error

LATENT_CHANNELS = 16  # SD3's VAE latent
LATENT_DOWNSCALE = 8  # pixels per latent cell on each side


class NodeError(SD3FP8Error):
    """A node could not do its work for a reason the user can act on (reported as execution_error)."""


class Interrupted(SD3FP8Error):
    """The running prompt was interrupted (POST /interrupt or shutdown)."""


class InterruptFlag:
    """Set from any thread, checked by the executor between nodes and by samplers between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Interrupted` if the flag is set."""
        if self._event.is_set():
            raise Interrupted("interrupted")


@dataclass(frozen=True, eq=False)
class Model:
    """MODEL: a loaded diffusion model. ``shift`` overrides the model's own flow shift
    (ModelSamplingSD3); None keeps the model's default (3.0 for SD3/SD3.5)."""

    handle: Any
    name: str
    weight_dtype: str = "default"
    shift: float | None = None


@dataclass(frozen=True, eq=False)
class Clip:
    """CLIP: the loaded text encoders (CLIP-L, CLIP-G, T5-XXL; any subset)."""

    handle: Any
    names: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Vae:
    """VAE: the loaded autoencoder."""

    handle: Any
    name: str


@dataclass(frozen=True, eq=False)
class CondEntry:
    """One CONDITIONING entry, ComfyUI's ``[context, {"pooled_output", "start_percent", ...}]``.

    The field names match ``sd3fp8.sampling.Cond``, so the engine backend hands entries to the
    sampling layer as they are."""

    context: torch.Tensor  # [1 or B, T, 4096] joint CLIP/T5 context
    pooled: torch.Tensor  # [1 or B, 2048] CLIP-L + CLIP-G pooled
    start_percent: float = 0.0
    end_percent: float = 1.0
    strength: float = 1.0

    def __post_init__(self):
        if self.context.ndim != 3 or self.pooled.ndim != 2:
            raise NodeError(f"conditioning needs context [B, T, D] and pooled [B, D], got {list(self.context.shape)} "
                            f"and {list(self.pooled.shape)}")
        if not (0.0 <= self.start_percent <= 1.0 and 0.0 <= self.end_percent <= 1.0):
            raise NodeError(f"conditioning start/end must be in [0, 1], got {self.start_percent}, {self.end_percent}")
        if not math.isfinite(self.strength):
            raise NodeError(f"conditioning strength must be finite, got {self.strength}")


Conditioning = tuple[CondEntry, ...]


@dataclass(frozen=True, eq=False)
class Latent:
    """LATENT: ComfyUI's ``{"samples": [B, C, h, w], "batch_index"?, "noise_mask"?}``.

    ``samples`` are in the VAE's latent space (before the model's scale/shift), float32."""

    samples: torch.Tensor
    batch_index: tuple[int, ...] | None = None
    noise_mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.samples.ndim != 4:
            raise NodeError(f"a latent is [B, C, h, w], got {list(self.samples.shape)}")


# IMAGE: torch.Tensor [B, H, W, 3] float32 in [0, 1] (ComfyUI's layout: channels last).
# MASK:  torch.Tensor [B, H, W] float32 in [0, 1], 1 = masked.


def check_image(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise NodeError(f"{what} must be an IMAGE tensor [B, H, W, 3], got {shape}")
    return images
