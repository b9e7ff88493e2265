"""Where each component of a model comes from, for every way users keep SD3.5 on disk.

``resolve_sources`` turns what ``--model`` points at into a :class:`ModelSources`:
- a diffusers folder (``model_index.json``): every component from its subfolder;
- a single ``.safetensors`` file: the MMDiT, plus the VAE / text encoders it holds (an all-in-one
  file), plus separate files given with ``--text-encoders`` / ``--vae``; when the file sits inside a
  ComfyUI tree, that tree's ``text_encoders/`` (``clip/``) and ``vae/`` fill the gaps;
- a ComfyUI root or its ``models/`` folder: the SD3 checkpoint in ``checkpoints/``,
  ``diffusion_models/`` or ``unet/`` (``--checkpoint`` picks one when there are several).
Files are recognised by their contents (never their names); only headers are read here.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from sd3fp8.errors import ConfigError, ModelLoadError
from sd3fp8.io.checkpoint import read_header
from sd3fp8.io.components import FileSource
from sd3fp8.io.detection import COMPONENT_PREFIXES, Detection, detect
from sd3fp8.io.layouts import MMDIT_PREFIX
from sd3fp8.policy import Policy, Precision

log = logging.getLogger(__name__)

KIND_COMPONENT = {"clip-l": "text_encoder", "clip-g": "text_encoder_2", "t5-xxl": "text_encoder_3", "vae": "vae"}
COMFY_CHECKPOINT_DIRS = ("checkpoints", "diffusion_models", "unet")
COMFY_ENCODER_DIRS = ("text_encoders", "clip")
COMFY_VAE_DIRS = ("vae",)
# Tokenizer folders: diffusers' layout of an SD3.5 repo, and ComfyUI's own source tree.
TOKENIZER_LAYOUTS = {
    "diffusers": {"tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2", "tokenizer_3": "tokenizer_3"},
    "ComfyUI": {"tokenizer": "comfy/sd1_tokenizer", "tokenizer_2": "comfy/sd1_tokenizer",
                "tokenizer_3": "comfy/text_encoders/t5_tokenizer"},
}
TOKENIZER_FILES = {"tokenizer": ("vocab.json",), "tokenizer_2": ("vocab.json",), "tokenizer_3": ("tokenizer.json", "spiece.model")}


@dataclasses.dataclass(frozen=True)
class ModelSources:
    """Either a diffusers ``folder``, or one file source per component plus tokenizer folders."""

    folder: Path | None = None
    files: dict[str, FileSource] = dataclasses.field(default_factory=dict)  # component -> source
    tokenizers: dict[str, Path] = dataclasses.field(default_factory=dict)  # tokenizer name -> folder
    mmdit: Detection | None = None
    label: str = ""  # what the user pointed at

    def describe(self) -> list[str]:
        if self.folder is not None:
            return [f"diffusers folder {self.folder}"]
        return [f"{c}: {s}" for c, s in self.files.items()] + [f"{t}: {p}" for t, p in self.tokenizers.items()]


def comfy_models_dir(path: Path) -> Path | None:
    """The ``models/`` folder of a ComfyUI tree given its root, the folder itself, or None."""
    for candidate in (path / "models", path):
        if candidate.is_dir() and any((candidate / d).is_dir() for d in COMFY_CHECKPOINT_DIRS):
            return candidate
    return None


def _safetensors(folders: list[Path]) -> list[Path]:
    return sorted(p for d in folders if d.is_dir() for p in d.rglob("*.safetensors"))


def _detect_quietly(path: Path, skipped: dict[Path, str]) -> Detection | None:
    """Detection of a file found by scanning a folder: files we cannot use are skipped, not fatal,
    and remembered in ``skipped`` so a "not found" error can name them (a truncated T5 file)."""
    try:
        return detect(read_header(path))
    except ModelLoadError as e:
        log.info("skipping %s: %s", path, e)
        skipped[path] = str(e).removeprefix(f"{path}: ")
        return None


def _skipped_note(skipped: dict[Path, str]) -> str:
    return "".join(f"; skipped {p.name}: {why}" for p, why in sorted(skipped.items()))


def _pick_checkpoint(models: Path, name: str | None, skipped: dict[Path, str]) -> Path:
    candidates = [p for p in _safetensors([models / d for d in COMFY_CHECKPOINT_DIRS])
                  if (d := _detect_quietly(p, skipped)) is not None and d.kind == "mmdit-original"]
    if name is not None:
        chosen = [p for p in candidates if name in (p.name, p.stem, str(p.relative_to(models)))]
        if not chosen:
            raise ModelLoadError(f"--checkpoint {name!r}: no SD3 checkpoint of that name under {models} "
                                 f"(found: {', '.join(p.name for p in candidates) or 'none'})")
        return chosen[0]
    if not candidates:
        raise ModelLoadError(f"no SD3/SD3.5 checkpoint under {models}/{{{','.join(COMFY_CHECKPOINT_DIRS)}}}{_skipped_note(skipped)}")
    if len(candidates) > 1:
        raise ModelLoadError(f"{len(candidates)} SD3 checkpoints under {models}: pick one with --checkpoint NAME "
                             f"({', '.join(p.name for p in candidates)})")
    return candidates[0]


def _fp8_rank(detection: Detection, want_fp8: bool) -> int:
    """Preference among several files of one text encoder: FP8 files when the policy wants FP8."""
    scaled = ("sd3fp8", "comfy-scaled", "comfy-quant", "plain-cast")  # scaled files lose less than plain casts
    order = scaled + ("none",) if want_fp8 else ("none",) + scaled
    return order.index(detection.fp8)


def _standalone_sources(paths: list[Path], policy: Policy, skipped: dict[Path, str] | None = None) -> dict[str, FileSource]:
    """Text-encoder / VAE files by component. Without ``skipped`` (user-given files) every file must be
    recognised; with it (a folder scan) unusable files are skipped and noted there."""
    explicit = skipped is None
    found: dict[str, list[tuple[Detection, Path]]] = {}
    for path in paths:
        detection = detect(read_header(path)) if explicit else _detect_quietly(path, skipped)
        if detection is None:
            continue
        component = KIND_COMPONENT.get(detection.kind)
        if component is None:
            if explicit:
                raise ModelLoadError(f"{path}: holds {detection.describe()}, not a text encoder or VAE")
            continue
        found.setdefault(component, []).append((detection, path))
    chosen = {}
    for component, options in found.items():
        want_fp8 = policy.precision(component).is_fp8
        options.sort(key=lambda o: (_fp8_rank(o[0], want_fp8), o[1].name))
        if len(options) > 1:
            log.info("%s: using %s (also found %s)", component, options[0][1], ", ".join(str(p) for _, p in options[1:]))
        path = options[0][1]
        chosen[component] = FileSource(path, COMPONENT_PREFIXES["vae"] if component == "vae" and _has_vae_prefix(path) else "")
    return chosen


def _has_vae_prefix(path: Path) -> bool:
    return any(k.startswith(COMPONENT_PREFIXES["vae"]) for k in read_header(path).tensors)


def _expand(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        if p.is_dir():
            out += _safetensors([p])
        elif p.is_file():
            out.append(p)
        else:
            raise ModelLoadError(f"{p} does not exist")
    return out


def find_tokenizers(search: list[Path], need_t5: bool) -> dict[str, Path]:
    """Tokenizer folders from the first place in ``search`` that has them (diffusers or ComfyUI layout)."""
    needed = ["tokenizer", "tokenizer_2"] + (["tokenizer_3"] if need_t5 else [])
    found: dict[str, Path] = {}
    for root in search:
        for layout in TOKENIZER_LAYOUTS.values():
            for name in needed:
                folder = root / layout[name]
                if name not in found and any((folder / f).is_file() for f in TOKENIZER_FILES[name]):
                    found[name] = folder
    missing = [n for n in needed if n not in found]
    if missing:
        looked = ", ".join(str(p) for p in search) or "nowhere (no --tokenizers given, not inside a ComfyUI tree)"
        raise ModelLoadError(
            f"no tokenizer files for {', '.join(missing)} (single-file checkpoints carry none). Looked in: {looked}. "
            "Pass --tokenizers DIR: either a diffusers SD3.5 download (tokenizer/ and tokenizer_2/ with vocab.json + "
            "merges.txt, tokenizer_3/ with tokenizer.json or spiece.model) or a ComfyUI root (comfy/sd1_tokenizer, "
            "comfy/text_encoders/t5_tokenizer)"
        )
    return found


def resolve_sources(model: Path | None, policy: Policy, checkpoint: str | None = None,
                    extra: tuple[Path, ...] = (), tokenizers: Path | None = None) -> ModelSources:
    """Where every component of ``model`` comes from (see the module docstring)."""
    from sd3fp8.miniature.bundled import default_model_path

    skipped: dict[Path, str] = {}
    if model is None:
        model = default_model_path()
    model = Path(model)
    if not model.exists():
        raise ModelLoadError(f"model path {model} does not exist")
    if model.is_dir() and (model / "model_index.json").is_file():
        if checkpoint or extra or tokenizers:
            raise ConfigError(f"{model} is a diffusers folder: --checkpoint, --text-encoders/--vae and --tokenizers apply to single files and ComfyUI trees")
        return ModelSources(folder=model, label=str(model))
    comfy_models = None
    if model.is_dir():
        models = comfy_models_dir(model)
        if models is None:
            raise ModelLoadError(f"{model} is neither a diffusers folder (model_index.json) nor a ComfyUI tree "
                                 f"(models/{{{','.join(COMFY_CHECKPOINT_DIRS)}}})")
        comfy_models = models
        model = _pick_checkpoint(models, checkpoint, skipped)
    elif checkpoint:
        raise ConfigError("--checkpoint picks a file inside a ComfyUI tree; --model already names a file")
    elif model.parent.parent.name == "models" and model.parent.name in COMFY_CHECKPOINT_DIRS:
        comfy_models = model.parent.parent  # a file inside ComfyUI/models/<dir>/
    header = read_header(model)
    detection = detect(header)
    if detection.kind != "mmdit-original":
        raise ModelLoadError(f"{model}: holds {detection.describe()}; --model takes an SD3 checkpoint (MMDiT)")

    files = {"transformer": FileSource(model, MMDIT_PREFIX if any(k.startswith(MMDIT_PREFIX) for k in header.tensors) else "")}
    for component in detection.components:
        if component != "transformer":
            files[component] = FileSource(model, COMPONENT_PREFIXES[component])
    given = _standalone_sources(_expand(list(extra)), policy)
    files.update(given)  # explicit files win over the checkpoint's own
    if comfy_models is not None:
        tree = _standalone_sources(_safetensors([comfy_models / d for d in COMFY_ENCODER_DIRS + COMFY_VAE_DIRS]), policy, skipped)
        for component, source in tree.items():
            files.setdefault(component, source)
    if policy.text_encoder_3 is Precision.OFF:
        files.pop("text_encoder_3", None)
    needed = ("vae", "text_encoder", "text_encoder_2") + (("text_encoder_3",) if policy.text_encoder_3 is not Precision.OFF else ())
    missing = [c for c in needed if c not in files]
    if missing:
        names = {"vae": "VAE", "text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL"}
        raise ModelLoadError(f"{model}: no {', '.join(names[m] for m in missing)} found (not in the file"
                             f"{', not in the ComfyUI tree' if comfy_models else ''}): pass the files with --text-encoders / --vae"
                             + (" (or run without T5: --t5 off)" if "text_encoder_3" in missing else "") + _skipped_note(skipped))
    search = [p for p in (tokenizers, comfy_models.parent if comfy_models else None) if p is not None]
    found = find_tokenizers(search, need_t5="text_encoder_3" in files)
    return ModelSources(files=files, tokenizers=found, mmdit=detection, label=str(model))
