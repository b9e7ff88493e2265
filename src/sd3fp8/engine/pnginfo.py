"""PNGs that carry their generation parameters, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from sd3fp8.errors import SD3FP8Error
from sd3fp8.io.atomic import atomic_write
from sd3fp8.io.safe_read import parse_json

PARAMETERS_KEY = "sd3fp8"  # full JSON, read back by read_parameters
A1111_KEY = "parameters"  # the human-readable line many image browsers show


def a1111_text(params: dict) -> str:
    text = params["prompt"]
    if params.get("negative_prompt"):
        text += f"\nNegative prompt: {params['negative_prompt']}"
    text += (
        f"\nSteps: {params['steps']}, Sampler: {params.get('sampler', 'euler')}, Schedule type: {params.get('scheduler', 'normal')}, "
        f"CFG scale: {params['cfg']}, Seed: {params['seed']}, "
        f"Size: {params['width']}x{params['height']}, Model: {Path(str(params['model'])).name}, "
        f"Precision: {params['precision']}, Backend: {params['backend']}"
    )
    if params.get("batch_index"):
        text += f", Batch index: {params['batch_index']}"
    if params.get("denoise", 1.0) < 1:
        text += f", Denoising strength: {params['denoise']}"
    return text


def save_png(image: Image.Image, path: str | Path, params: dict) -> Path:
    """Write ``image`` with ``params`` in PNG text chunks; the file appears complete or not at all."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(params, sort_keys=True))
    info.add_text(A1111_KEY, a1111_text(params))
    with atomic_write(path) as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def read_parameters(path: str | Path) -> dict:
    """The generation parameters stored in a PNG written by :func:`save_png`."""
    with Image.open(path) as image:
        text = image.text.get(PARAMETERS_KEY) if hasattr(image, "text") else None
    if text is None:
        raise SD3FP8Error(f"{path} carries no sd3fp8 generation parameters")
    return parse_json(text, f"{path}: sd3fp8 parameters", SD3FP8Error)
