"""The workflow Backend on sd3fp8's engine: what `sd3fp8 serve` runs.

Loaded models are kept (the ``keep`` most recently used per kind: checkpoint, diffusion model, text
encoders, VAE) and reused when a prompt asks for the same files (path, size, mtime) under the same
precision; the executor's cache keeps unchanged nodes' outputs on top of that, so a reseeded prompt
neither loads nor encodes again. Inventory methods may be called from any thread, the rest only
from the worker thread.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sd3fp8.engine.request import MAX_BATCH, MAX_SIDE, MAX_STEPS
from sd3fp8.errors import ConfigError, SD3FP8Error
from sd3fp8.io.safe_read import read_json
from sd3fp8.sampling import SAMPLER_NAMES, SCHEDULER_NAMES
from sd3fp8.server import engine_ops
from sd3fp8.server.engine_models import (
    BUNDLED_NAME,
    KIND_COMPONENTS,
    Catalog,
    LoadOptions,
    engine_handles,
    for_weight_dtype,
    load_engine,
    load_text_encoders,
    load_transformer,
    load_vae,
    node_error,
)
from sd3fp8.workflow.backend import SampleRequest, StepCallback, TextPrompts
from sd3fp8.workflow.types import InterruptFlag, NodeError

log = logging.getLogger(__name__)

_SIDE = {"min": 16, "max": MAX_SIDE, "multiple_of": 16}  # SD3 works on 2x2 patches of 8-pixel latent cells
_EMPTY_LATENT = {"width": _SIDE, "height": _SIDE, "batch_size": {"max": MAX_BATCH}}
# The engine's request limits (engine/request.py) on the nodes' inputs, checked when a prompt is
# validated; ComfyUI's own /object_info ranges stay as they are (clients compare them).
INPUT_LIMITS = {"EmptySD3LatentImage": _EMPTY_LATENT, "EmptyLatentImage": _EMPTY_LATENT,
                "KSampler": {"steps": {"max": MAX_STEPS}}, "KSamplerAdvanced": {"steps": {"max": MAX_STEPS}}}


class LoadedModels:
    """Loaded models by key, the ``keep`` most recently used per kind."""

    def __init__(self, keep: int = 1):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.keep = keep
        self.kinds: dict[str, OrderedDict] = {}
        self.loads: Counter = Counter()  # kind -> loads done

    def get(self, kind: str, key: tuple, load: Callable[[], object]):
        entries = self.kinds.setdefault(kind, OrderedDict())
        if key in entries:
            entries.move_to_end(key)
            return entries[key]
        while len(entries) >= self.keep:  # make room first: two large models may not fit together
            entries.popitem(last=False)
            release_memory()
        start = time.perf_counter()
        value = entries[key] = load()
        self.loads[kind] += 1
        log.info("loaded %s %s in %.1f s", kind, key[0], time.perf_counter() - start)
        return value

    def clear(self) -> None:
        self.kinds.clear()
        release_memory()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def file_identity(path: Path) -> tuple:
    """What a cached model was loaded from: the path and, so an edited file reloads, its size and mtime."""
    path = Path(path).resolve()
    stat = (path / "model_index.json" if path.is_dir() else path).stat()
    return str(path), stat.st_size, stat.st_mtime_ns


class EngineBackend:
    """sd3fp8's engine behind the workflow nodes (see workflow/backend.py for the contract)."""

    def __init__(self, catalog: Catalog | None = None, options: LoadOptions | None = None, tokenizers: Path | None = None,
                 keep: int = 1):
        self.catalog = catalog or Catalog()
        self.options = options or LoadOptions()
        self.tokenizers = tokenizers  # tokenizer files for single-file models (a diffusers download or ComfyUI root)
        self.models = LoadedModels(keep)
        self.calls: Counter = Counter()  # work done, by method (encode_text, sample, ...)

    # -- inventory (any thread) ---------------------------------------------------------------------

    def model_files(self, folder: str) -> list[str]:
        return self.catalog.files(folder)

    def sampler_names(self) -> list[str]:
        return list(SAMPLER_NAMES)

    def scheduler_names(self) -> list[str]:
        return list(SCHEDULER_NAMES)

    def input_limits(self, class_type: str) -> dict:
        """Limits beyond /object_info's for a node's inputs: name -> {"min", "max", "multiple_of"}."""
        return INPUT_LIMITS.get(class_type, {})

    def preferred_size(self, ckpt_name: str) -> tuple[int, int] | None:
        """The size a checkpoint generates at when a template's cannot work (the miniature model's
        position table holds 128 pixels a side): the bundled model's recipe size, else None."""
        if ckpt_name != BUNDLED_NAME or BUNDLED_NAME not in self.catalog.named:
            return None
        from sd3fp8.engine.request import read_recipe

        recipe = read_recipe(self.catalog.named[BUNDLED_NAME], 64)
        return recipe.width, recipe.height

    def model_defaults(self, ckpt_name: str) -> dict:
        """A checkpoint's generation defaults without loading it (the OpenAI and A1111 routes fill
        omitted fields with them): a diffusers folder's sd3fp8.json, else SD3.5's usual ones."""
        from sd3fp8.engine.request import Recipe, read_recipe

        recipe = Recipe()
        try:
            path = self.catalog.path("checkpoints", ckpt_name)
        except NodeError:  # an unknown name: the job reports it when it runs
            path = None
        if path is not None and (path / "model_index.json").is_file():
            try:
                side = _default_side(path)
                recipe = read_recipe(path, side)
            except SD3FP8Error as e:
                log.warning("cannot read the defaults of %s: %s", path, e)
        return {"steps": recipe.steps, "cfg": recipe.cfg, "width": recipe.width, "height": recipe.height}

    # -- loaders ---------------------------------------------------------------------------------------

    def _search(self) -> list[Path]:
        return [p for p in (self.tokenizers, self.catalog.comfy_root) if p is not None]

    def load_checkpoint(self, ckpt_name: str):
        path = self.catalog.path("checkpoints", ckpt_name)
        key = (ckpt_name, file_identity(path), self.options.key())
        tokenizers = self.tokenizers or self.catalog.comfy_root
        return self.models.get("checkpoint", key, lambda: engine_handles(load_engine(path, self.options, tokenizers), ckpt_name))

    def load_diffusion_model(self, unet_name: str, weight_dtype: str):
        path = self.catalog.path("diffusion_models", unet_name)
        options = for_weight_dtype(self.options, weight_dtype)
        key = (unet_name, file_identity(path), options.key())
        return self.models.get("diffusion_model", key, lambda: load_transformer(path, unet_name, options, self._detect(path)))

    def load_text_encoders(self, clip_names: Sequence[str], clip_type: str, device: str):
        if clip_type != "sd3":
            raise NodeError(f"CLIP type {clip_type!r} is not supported: sd3fp8 runs SD3/SD3.5 text encoders (type 'sd3')")
        files: dict[str, Path] = {}
        for name in clip_names:
            path = self.catalog.path("text_encoders", name)
            component = KIND_COMPONENTS.get(self._detect(path).kind)
            if component is None or component in files:
                raise NodeError(f"{name}: {'not a text encoder' if component is None else 'a second file for the same encoder'} "
                                "(SD3 takes one CLIP-L, one CLIP-G and one T5-XXL)")
            files[component] = path
        options = self.options if device != "cpu" else LoadOptions(self.options.policy, _on_cpu(self.options.runtime))
        key = (" + ".join(clip_names), tuple(sorted((k, file_identity(p)) for k, p in files.items())), options.key())
        return self.models.get("text_encoders", key,
                               lambda: load_text_encoders(files, " + ".join(clip_names), options, self._search()))

    def load_vae(self, vae_name: str):
        path = self.catalog.path("vae", vae_name)
        key = (vae_name, file_identity(path), self.options.key())
        return self.models.get("vae", key, lambda: load_vae(path, vae_name, self.options))

    def _detect(self, path: Path):
        try:
            return self.catalog.detection(path)
        except Exception as e:  # noqa: BLE001 - unreadable or foreign files are a node error
            raise node_error(e) from e

    # -- work ------------------------------------------------------------------------------------------

    def encode_text(self, clip, prompts: TextPrompts):
        self.calls["encode_text"] += 1
        return engine_ops.encode_text(clip, prompts)

    def sample(self, request: SampleRequest, callback: StepCallback, interrupt: InterruptFlag) -> torch.Tensor:
        self.calls["sample"] += 1
        return engine_ops.run_ksampler(request, callback, interrupt)

    def vae_decode(self, vae, samples: torch.Tensor) -> torch.Tensor:
        self.calls["vae_decode"] += 1
        return engine_ops.vae_decode(vae, samples)

    def vae_encode(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        self.calls["vae_encode"] += 1
        return engine_ops.vae_encode(vae, pixels)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        if unload_models:
            self.models.clear()
        elif free_memory:
            release_memory()


def _on_cpu(runtime):
    from dataclasses import replace

    return replace(runtime, device="cpu", offload="none")


def _default_side(folder: Path) -> int:
    """The side a diffusers folder's transformer was made for (its sample size x the VAE's factor)."""
    from sd3fp8.io import schemas

    transformer = schemas.transformer_config(folder / "transformer" / "config.json")
    vae = read_json(folder / "vae" / "config.json", "config", ConfigError)
    blocks = vae.get("block_out_channels") if isinstance(vae, dict) else None
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 8:
        raise ConfigError(f"{folder / 'vae' / 'config.json'}: field 'block_out_channels' must be a list of 1..8 widths")
    return transformer["sample_size"] * 2 ** (len(blocks) - 1)
