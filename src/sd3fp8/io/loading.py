"""Load one pipeline component from its source (a diffusers folder or a file), stored as the policy says."""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch

from sd3fp8.errors import ModelLoadError
from sd3fp8.fp8.linear import ActivationScaling, Backend
from sd3fp8.fp8.numerics import is_fp8
from sd3fp8.fp8.swap import quantize_linears
from sd3fp8.io.checkpoint import read_header
from sd3fp8.io.components import load_clip, load_folder_t5, load_t5, load_vae
from sd3fp8.io.folders import check_component_folder
from sd3fp8.io.singlefile import FP8Scheme, load_folder_mmdit, load_mmdit
from sd3fp8.io.sources import ModelSources
from sd3fp8.policy import Policy, Precision

log = logging.getLogger(__name__)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclasses.dataclass(frozen=True)
class LoadSettings:
    device: torch.device
    compute_dtype: torch.dtype
    backend: Backend = Backend.WEIGHT_ONLY  # the transformer's, resolved (engine.loader resolves it once)
    force_fp8: bool = False
    activation: ActivationScaling = ActivationScaling.TENSOR
    # where modules are put after loading, when not where they run (offload=model: the CPU; diffusers'
    # offload hooks then move one component at a time to ``device``)
    place: torch.device | None = None


def effective_policy(policy: Policy, sources: ModelSources) -> Policy:
    """``auto`` text encoders read from FP8 files stay FP8 (as stored) instead of being expanded to
    16/32 bit: a user who downloaded ``t5xxl_fp8_e4m3fn*.safetensors`` chose that memory."""
    changes = {}
    for name in TEXT_ENCODERS:
        source = sources.files.get(name)
        if source is not None and policy.precision(name) is Precision.AUTO and _holds_fp8(source):
            changes[name] = Precision.FP8_E4M3
            log.info("%s: %s is FP8; kept FP8 (set its precision to override)", name, source.path)
    return policy.replace(**changes) if changes else policy


def _holds_fp8(source) -> bool:
    """Whether the component's own tensors (not its file neighbours') are FP8."""
    tensors = read_header(source.path).tensors
    return any(is_fp8(t.dtype) for k, t in tensors.items() if k.startswith(source.prefix))


def _quiet_from_pretrained(load, *args, **kwargs):
    with warnings.catch_warnings():  # newer libraries renamed torch_dtype; older ones know only it
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        try:
            return load(*args, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:  # library errors, in one line
            raise ModelLoadError(f"cannot load {args[0]}: {' '.join(str(e).split())}") from None


def _from_folder(name: str, sources: ModelSources, dtype: torch.dtype):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    folder = sources.folder / name
    check_component_folder(folder)  # no pickles, valid headers and JSON: before the library reads anything
    safe = {"torch_dtype": dtype, "local_files_only": True, "use_safetensors": True}
    if name in ("transformer", "vae"):
        cls = SD3Transformer2DModel if name == "transformer" else AutoencoderKL
        return _quiet_from_pretrained(cls.from_pretrained, sources.folder, subfolder=name, **safe)
    cls = T5EncoderModel if name == "text_encoder_3" else CLIPTextModelWithProjection
    return _quiet_from_pretrained(cls.from_pretrained, folder, **safe)


def load_component(name: str, sources: ModelSources, policy: Policy, settings: LoadSettings, tokenizers: dict):
    """(module on the device, names of its FP8 linears) for one component."""
    dtype = policy.precision(name).storage_dtype(settings.compute_dtype)
    scheme = FP8Scheme.from_policy(policy, name, settings.backend, settings.activation)
    source = sources.files.get(name)
    if source is None and name in ("transformer", "text_encoder_3") and scheme is not None:  # streamed into FP8
        check_component_folder(sources.folder / name)
        load = load_folder_mmdit if name == "transformer" else load_folder_t5
        module, names = load(sources.folder / name, scheme, dtype)
    elif source is None:
        module = _from_folder(name, sources, dtype)
        names = []
        if scheme is not None:
            names = quantize_linears(module, scheme.keep, scheme.fmt, scheme.granularity, scheme.backend, device=settings.device,
                                     force_fp8=settings.force_fp8 and name == "transformer", activation=scheme.activation)
    elif name == "transformer":
        module, names, detection = load_mmdit(source.path, policy, dtype, settings.device, settings.backend,
                                              settings.force_fp8, settings.activation)
    elif name == "vae":
        module, names = load_vae(source, dtype), []
    elif name == "text_encoder_3":
        module, names = load_t5(source, dtype, scheme)
    else:
        kind = "clip-l" if name == "text_encoder" else "clip-g"
        module, names = load_clip(source, kind, tokenizers[name.replace("text_encoder", "tokenizer")].eos_token_id, dtype, scheme)
    log.info("%s from %s: %d FP8 linears", name, source or sources.folder, len(names))
    return module.to(settings.place or settings.device).eval(), names


def load_tokenizers(sources: ModelSources, with_t5: bool) -> dict:
    """CLIP-L, CLIP-G (padded with "!" as OpenCLIP bigG is) and T5 tokenizers."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    folders = dict(sources.tokenizers)
    if sources.folder is not None:
        folders = {n: sources.folder / n for n in ("tokenizer", "tokenizer_2", "tokenizer_3")} | folders
    out = {}
    for name in ("tokenizer", "tokenizer_2") + (("tokenizer_3",) if with_t5 else ()):
        folder = folders[name]
        check_component_folder(folder)
        if name == "tokenizer_3":
            out[name] = _quiet_from_pretrained(T5TokenizerFast.from_pretrained, folder, local_files_only=True)
            continue
        # A diffusers tokenizer_2 folder already says pad "!"; ComfyUI's shared CLIP folder does not.
        extra = {"pad_token": "!"} if name == "tokenizer_2" and sources.folder is None else {}
        tok = _quiet_from_pretrained(CLIPTokenizer.from_pretrained, folder, local_files_only=True, **extra)
        if tok.model_max_length > 1000:  # some exported CLIP tokenizers say "unlimited"; CLIP has 77 positions
            tok.model_max_length = 77
        out[name] = tok
    return out


def load_scheduler(sources: ModelSources):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if sources.folder is not None:
        check_component_folder(sources.folder / "scheduler")
        return _quiet_from_pretrained(FlowMatchEulerDiscreteScheduler.from_pretrained, sources.folder, subfolder="scheduler")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3 / SD3.5's scheduler


def load_transformer(path, policy: Policy | None = None, device: str | None = None, dtype: str | None = None,
                     backend: str = "auto") -> torch.nn.Module:
    """The SD3/SD3.5 MMDiT alone (an ``SD3Transformer2DModel``), stored as ``policy`` says (default:
    FP8 E4M3 linears, per-channel scales), for users who build their own pipelines; like diffusers'
    ``from_single_file``. ``path``: an original-layout single file (16-bit, FP8 or ComfyUI's
    formats), a diffusers ``transformer/`` folder (one file or shards), or a diffusers pipeline
    folder. 16-bit weights are quantized as they are read: the 16-bit model is never in memory.
    ``device``/``dtype``: as ``RuntimeConfig`` takes them (default ``auto``)."""
    from pathlib import Path

    from sd3fp8.fp8.linear import resolve_backend
    from sd3fp8.runtime import resolve_compute_dtype, resolve_device

    policy = policy or Policy()
    run_on = resolve_device(device or "auto")
    storage = policy.transformer.storage_dtype(resolve_compute_dtype(dtype or "auto", run_on, policy.transformer))
    resolved = resolve_backend(backend, run_on)
    path = Path(path)
    if path.is_file():
        module, _, _ = load_mmdit(path, policy, storage, run_on, resolved)
        return module.to(run_on).eval()
    folder = path / "transformer" if (path / "model_index.json").is_file() else path
    check_component_folder(folder)
    scheme = FP8Scheme.from_policy(policy, "transformer", resolved, ActivationScaling.TENSOR)
    if scheme is not None:
        module, _ = load_folder_mmdit(folder, scheme, storage)
    else:
        from diffusers import SD3Transformer2DModel

        module = _quiet_from_pretrained(SD3Transformer2DModel.from_pretrained, folder, torch_dtype=storage, local_files_only=True,
                                        use_safetensors=True)
    return module.to(run_on).eval()
