"""What the loader nodes offer and load: SD3-family files of a ComfyUI models tree (recognised by
content; others logged as unusable), checkpoints given by path, the bundled miniature model; and
the MODEL / CLIP / VAE handles the engine backend hands the workflow.

A checkpoint loads as one engine (`SD3FP8Pipeline.from_pretrained`); its three handles are views
of it (staged offload included). UNETLoader, the CLIP loaders and VAELoader load single components
through `sd3fp8.io` (the engine's own loaders, under the same precision policy).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ContextManager

import torch

from sd3fp8.errors import ConfigError, ModelLoadError, SD3FP8Error
from sd3fp8.policy import Policy, Precision
from sd3fp8.runtime import RuntimeConfig
from sd3fp8.sampling import SD3_LATENT, LatentFormat
from sd3fp8.server.inventory import ModelTree
from sd3fp8.workflow.paths import PathEscape
from sd3fp8.workflow.types import NodeError

log = logging.getLogger(__name__)

BUNDLED_NAME = "mini-sd3"  # the bundled miniature model, as a checkpoint name (its folder's name)
SD3_SHIFT = 3.0  # ComfyUI's model_sampling shift for SD3 / SD3.5 files (they carry no scheduler config)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
KIND_COMPONENTS = {"clip-l": "text_encoder", "clip-g": "text_encoder_2", "t5-xxl": "text_encoder_3"}
# what each loader folder takes, by detection kind (sd3fp8.io.detection)
FOLDER_KINDS = {"checkpoints": ("mmdit-original",), "diffusion_models": ("mmdit-original",),
                "text_encoders": ("clip-l", "clip-g", "t5-xxl"), "vae": ("vae",)}


def node_error(e: Exception) -> NodeError:
    """A loading failure as the node error clients see (the message only)."""
    return e if isinstance(e, NodeError) else NodeError(str(e))


# -- handles ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ModelHandle:
    """MODEL: an MMDiT ready to denoise, and what sampling needs to know about it."""

    name: str
    transformer: Callable[[], ContextManager[torch.nn.Module]]  # the module for the block (staged or resident)
    compute_dtype: torch.dtype
    device: torch.device
    config: dict  # the MMDiT's diffusers config (widths, patch size, position table)
    shift: float = SD3_SHIFT
    latent_format: LatentFormat = SD3_LATENT
    latent_channels: int = 16
    engine: Any = None  # the SD3FP8Pipeline when loaded from a checkpoint

    @property
    def context_width(self) -> int:
        return self.config["joint_attention_dim"]

    @property
    def pooled_width(self) -> int:
        return self.config["pooled_projection_dim"]


@dataclass(eq=False)
class TextHandle:
    """CLIP: tokenizers and text encoders (CLIP-L, CLIP-G, T5-XXL; any may be None)."""

    name: str
    open: Callable[[], ContextManager[tuple[dict, dict, Any]]]  # (tokenizers, encoders, TextLayout) for the block
    device: torch.device
    dtype: torch.dtype


@dataclass(eq=False)
class VaeHandle:
    """VAE: the autoencoder (VAE-space latents in and out)."""

    name: str
    vae: torch.nn.Module


def engine_handles(engine, name: str) -> tuple[ModelHandle, TextHandle, VaeHandle]:
    """The three handles of a checkpoint's engine."""

    @contextlib.contextmanager
    def transformer() -> Iterator[torch.nn.Module]:
        with engine.stage("transformer") as staged:
            yield staged["transformer"] if "transformer" in staged else engine.component("transformer")

    model = ModelHandle(name, transformer, engine.compute_dtype, engine.device, transformer_config(engine),
                        shift=engine.flow_sampling().shift, latent_format=engine.latent_format,
                        latent_channels=engine.latent_channels, engine=engine)
    clip = TextHandle(name, engine.text_encoders, engine.device, engine.compute_dtype)
    return model, clip, VaeHandle(name, engine.component("vae"))


def transformer_config(engine) -> dict:
    """The MMDiT's config, whether it is resident or staged."""
    module = engine.component("transformer")
    if module is not None:
        return dict(module.config)
    if engine.sources.mmdit is not None:
        return dict(engine.sources.mmdit.mmdit_config)
    return json.loads((engine.sources.folder / "transformer" / "config.json").read_text())


# -- the catalog ----------------------------------------------------------------------------------------


class Catalog:
    """The files each loader node offers. Inventory methods are safe from any thread."""

    def __init__(self, models: Path | None = None, checkpoints: Sequence[Path] = (), bundled: bool | None = None):
        self.tree = ModelTree(models, recognise=self._recognise) if models is not None else None
        self.named: dict[str, Path] = {Path(p).name: Path(p) for p in checkpoints}
        if bundled is None:  # the bundled model fills an otherwise empty list
            bundled = models is None and not checkpoints
        if bundled:
            from sd3fp8.miniature.bundled import default_model_path

            self.named.setdefault(BUNDLED_NAME, default_model_path())
        self._detections: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def files(self, folder: str) -> list[str]:
        names = list(self.named) if folder == "checkpoints" else []
        if self.tree is not None:
            names += [n for n in self.tree.files(folder) if n not in names]
        return names

    def path(self, folder: str, name: str) -> Path:
        if folder == "checkpoints" and name in self.named:
            return self.named[name]
        if self.tree is None or name not in self.tree.files(folder):
            raise NodeError(f"{name!r} is not a usable file in {folder}/ (the list comes from /object_info)")
        try:
            return self.tree.path(folder, name)
        except (FileNotFoundError, PathEscape) as e:
            raise NodeError(str(e)) from e

    @property
    def comfy_root(self) -> Path | None:
        """The ComfyUI root above the models tree (where ComfyUI keeps its tokenizers), if any."""
        return self.tree.root.parent if self.tree is not None else None

    def detection(self, path: Path):
        """The file's Detection (cached by path, size and mtime); raises ModelLoadError."""
        from sd3fp8.io.checkpoint import read_header
        from sd3fp8.io.detection import detect

        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            found = self._detections.get(key)
        if found is None:
            try:
                found = detect(read_header(path))
            except ModelLoadError as e:
                found = str(e).removeprefix(f"{path}: ")
            with self._lock:
                self._detections[key] = found
        if isinstance(found, str):
            raise ModelLoadError(f"{path}: {found}")
        return found

    def _recognise(self, folder: str, path: Path) -> str | None:
        try:
            detection = self.detection(path)
        except (ModelLoadError, OSError) as e:
            return str(e).removeprefix(f"{path}: ")
        if detection.kind not in FOLDER_KINDS[folder]:
            return f"holds {detection.describe()}"
        return None


# -- loading ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadOptions:
    """The policy and runtime a load runs under (part of its cache key)."""

    policy: Policy = field(default_factory=Policy)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def key(self) -> str:
        return repr((self.policy, self.runtime))

    def settings(self):
        from sd3fp8.fp8.linear import resolve_backend
        from sd3fp8.io.loading import LoadSettings
        from sd3fp8.runtime import resolve_compute_dtype, resolve_device

        device = resolve_device(self.runtime.device)
        dtype = resolve_compute_dtype(self.runtime.dtype, device, self.policy.transformer)
        resolve_backend(self.runtime.backend, device, self.runtime.force_fp8)  # a bad backend fails here
        if self.runtime.offload == "model" and device.type == "cpu":
            raise ConfigError("offload model needs a GPU (it moves components between CPU and GPU): use none or stages")
        return LoadSettings(device, dtype, self.runtime.backend, self.runtime.force_fp8, self.runtime.activation)


WEIGHT_DTYPE_FORMATS = {"fp8_e4m3fn": ("fp8-e4m3", "weight-only"), "fp8_e4m3fn_fast": ("fp8-e4m3", "auto"),
                        "fp8_e5m2": ("fp8-e5m2", "weight-only")}


def for_weight_dtype(base: LoadOptions, weight_dtype: str) -> LoadOptions:
    """UNETLoader's weight_dtype on our policy: "default" keeps the server's; fp8_e4m3fn / fp8_e5m2
    store FP8 and compute in the compute dtype (ComfyUI's weight casts = our weight-only backend);
    fp8_e4m3fn_fast multiplies in FP8 where the GPU can (auto: scaled-mm on FP8 tensor cores)."""
    if weight_dtype == "default":
        return base
    if weight_dtype not in WEIGHT_DTYPE_FORMATS:
        raise NodeError(f"unknown weight_dtype {weight_dtype!r}")
    fmt, backend = WEIGHT_DTYPE_FORMATS[weight_dtype]
    return LoadOptions(base.policy.replace(transformer=fmt), replace(base.runtime, backend=backend))


def load_engine(path: Path, precision: LoadOptions, tokenizers: Path | None):
    """A checkpoint (a diffusers folder or a single file) as an engine."""
    from sd3fp8.engine.pipeline import SD3FP8Pipeline

    options = {} if path.is_dir() else {"tokenizers": tokenizers}
    try:
        return SD3FP8Pipeline.from_pretrained(path, precision.policy, precision.runtime, **options)
    except SD3FP8Error as e:
        raise node_error(e) from e


def load_transformer(path: Path, name: str, precision: LoadOptions, detection) -> ModelHandle:
    """UNETLoader: the MMDiT of one file, stored as the policy says."""
    from sd3fp8.io.components import FileSource
    from sd3fp8.io.loading import load_component
    from sd3fp8.io.sources import ModelSources

    settings = precision.settings()
    sources = ModelSources(files={"transformer": FileSource(path)}, mmdit=detection, label=str(path))
    try:
        module, _ = load_component("transformer", sources, precision.policy, settings, {})
    except SD3FP8Error as e:
        raise node_error(e) from e
    return ModelHandle(name, lambda: contextlib.nullcontext(module), settings.compute_dtype, settings.device, dict(module.config))


def load_text_encoders(files: dict[str, Path], name: str, precision: LoadOptions, tokenizer_search: list[Path]) -> TextHandle:
    """The CLIP loaders: encoders by component (text_encoder, _2, _3) and the tokenizers found."""
    from sd3fp8.engine.text import layout_of
    from sd3fp8.io.components import FileSource
    from sd3fp8.io.loading import effective_policy, load_component, load_tokenizers
    from sd3fp8.io.sources import ModelSources, find_tokenizers

    if precision.policy.text_encoder_3 is Precision.OFF:
        files = {k: v for k, v in files.items() if k != "text_encoder_3"}
    settings = precision.settings()
    try:
        found = find_tokenizers(tokenizer_search, need_t5="text_encoder_3" in files)
        sources = ModelSources(files={k: FileSource(p) for k, p in files.items()}, tokenizers=found, label=name)
        policy = effective_policy(precision.policy, sources)
        tokenizers = load_tokenizers(sources, with_t5="text_encoder_3" in files)
        encoders = {k: load_component(k, sources, policy, settings, tokenizers)[0] if k in files else None for k in TEXT_ENCODERS}
    except SD3FP8Error as e:
        raise node_error(e) from e
    layout = layout_of(encoders)
    return TextHandle(name, lambda: contextlib.nullcontext((tokenizers, encoders, layout)), settings.device, settings.compute_dtype)


def load_vae(path: Path, name: str, precision: LoadOptions) -> VaeHandle:
    """VAELoader: an SD3 VAE file (standalone or under first_stage_model.)."""
    from sd3fp8.io.checkpoint import read_header
    from sd3fp8.io.components import FileSource
    from sd3fp8.io.detection import COMPONENT_PREFIXES
    from sd3fp8.io.loading import load_component
    from sd3fp8.io.sources import ModelSources

    prefix = COMPONENT_PREFIXES["vae"]
    try:
        prefix = prefix if any(k.startswith(prefix) for k in read_header(path).tensors) else ""
        sources = ModelSources(files={"vae": FileSource(path, prefix)}, label=str(path))
        module, _ = load_component("vae", sources, precision.policy, precision.settings(), {})
    except SD3FP8Error as e:
        raise node_error(e) from e
    return VaeHandle(name, module)
