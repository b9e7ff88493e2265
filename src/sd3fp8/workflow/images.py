"""Image files the ComfyUI way: SaveImage's `{prefix}_{counter:05}_.png` naming and PNG chunks,
LoadImage's RGB + mask tensors, the input folder's image list."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from sd3fp8.io.atomic import atomic_write
from sd3fp8.workflow.paths import PathEscape, confined, split_annotation
from sd3fp8.workflow.types import NodeError, check_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PARAMETERS_KEY = "sd3fp8"  # our own chunk, as the CLI's PNGs carry it


def expand_prefix(prefix: str, width: int, height: int, now: time.struct_time | None = None) -> str:
    """ComfyUI's server-side prefix tokens: %width%, %height%, %year% ... %second%."""
    if "%" not in prefix:
        return prefix
    now = now or time.localtime()
    tokens = {"%width%": str(width), "%height%": str(height), "%year%": str(now.tm_year), "%month%": f"{now.tm_mon:02}",
              "%day%": f"{now.tm_mday:02}", "%hour%": f"{now.tm_hour:02}", "%minute%": f"{now.tm_min:02}",
              "%second%": f"{now.tm_sec:02}"}
    for token, value in tokens.items():
        prefix = prefix.replace(token, value)
    return prefix


def save_target(root: Path, prefix: str, width: int, height: int) -> tuple[Path, str, int, str]:
    """(folder, file stem, first counter, subfolder) for `prefix` under `root`: the counter is one
    past the highest `{stem}_NNNNN_` already there (ComfyUI's get_save_image_path)."""
    prefix = os.path.normpath(expand_prefix(prefix, width, height).replace("\\", "/"))
    subfolder, stem = os.path.split(prefix)
    if not stem or stem in (".", ".."):
        raise NodeError(f"filename_prefix {prefix!r} names no file")
    try:
        folder = confined(root, subfolder) if subfolder else Path(root).resolve()
    except PathEscape as e:
        raise NodeError("Saving image outside the output folder is not allowed.") from e
    pattern = re.compile(re.escape(stem) + r"_(\d+)_")
    counters = [int(m.group(1)) for name in (os.listdir(folder) if folder.is_dir() else []) if (m := pattern.match(name))]
    return folder, stem, max(counters, default=0) + 1, subfolder.replace(os.sep, "/")


def to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE [H, W, 3] in [0, 1] -> an 8-bit RGB picture (ComfyUI's rounding: clip(255 x))."""
    pixels = np.clip(255.0 * image.detach().to("cpu", torch.float32).numpy(), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., :3], mode="RGB")


def png_info(prompt: dict | None, extra_pnginfo: dict | None, parameters: dict | None) -> PngImagePlugin.PngInfo:
    """The tEXt chunks ComfyUI writes (`prompt`, each extra_pnginfo key: `workflow`) plus ours."""
    info = PngImagePlugin.PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    if parameters:
        info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
    return info


def save_images(images: torch.Tensor, root: Path, prefix: str, kind: str, *, info: PngImagePlugin.PngInfo,
                compress_level: int = 4) -> list[dict]:
    """Write each image of the batch as `{stem}_{counter:05}_.png` (atomically); return the UI
    entries `{"filename", "subfolder", "type"}` ComfyUI reports."""
    images = check_image(images)
    folder, stem, counter, subfolder = save_target(root, prefix, images.shape[2], images.shape[1])
    results = []
    for i, image in enumerate(images):
        name = f"{stem.replace('%batch_num%', str(i))}_{counter:05}_.png"
        with atomic_write(folder / name) as f:
            to_pil(image).save(f, format="PNG", pnginfo=info, compress_level=compress_level)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return results


def resolve_image(folders, name: str) -> Path:
    """The file an annotated LoadImage name (`x.png`, `sub/x.png`, `x.png [output]`) refers to."""
    name, kind = split_annotation(name)
    return confined(folders.by_type(kind), name)


def load_image(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(IMAGE [1, H, W, 3], MASK [1, H, W]) like ComfyUI's LoadImage: EXIF orientation applied,
    mask = 1 - alpha (zeros 64x64 when the picture has no alpha), first frame only."""
    try:
        with Image.open(path) as opened:
            picture = ImageOps.exif_transpose(opened)
            if picture.mode == "I":
                picture = picture.point(lambda v: v * (1 / 255))
            rgb = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
            if "A" in picture.getbands():
                alpha = np.asarray(picture.getchannel("A"), dtype=np.float32) / 255.0
                mask = 1.0 - torch.from_numpy(alpha)
            else:
                mask = torch.zeros((64, 64), dtype=torch.float32)
    except (OSError, UnidentifiedImageError) as e:
        raise NodeError(f"cannot read image {path.name}: {e}") from e
    return torch.from_numpy(rgb)[None], mask[None]


def list_images(folder: Path) -> list[str]:
    """Image files directly in `folder`, sorted (LoadImage's combo list)."""
    if not folder.is_dir():
        return []
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
