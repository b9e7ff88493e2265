"""Diffusers model folders checked before any library reads them.

diffusers and transformers unpickle ``*.bin`` weights when no safetensors file is found, and read
JSON with Python's parser (RecursionError on deep nesting, tracebacks on wrong types). So each
component folder is checked here first: pickled weights are never read (a folder holding only
pickles is refused; pickles beside safetensors files, as older downloads ship them, are ignored and
logged), safetensors headers valid, every JSON and text file within the safe reader's limits. The
loaders are then asked for safetensors only (``use_safetensors=True``), so they never open a pickle.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sd3fp8.errors import ModelLoadError
from sd3fp8.io import schemas
from sd3fp8.io.checkpoint import read_header
from sd3fp8.io.oserrors import os_errors
from sd3fp8.io.safe_read import read_json, read_text

# torch.save / pickle formats under the names libraries give them
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHTED = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_SUFFIXES = (".txt",)
log = logging.getLogger(__name__)
RECIPE_FILE = "sd3fp8.json"  # engine.pipeline.RECIPE_FILE (the engine imports this module)


def check_model_folder(path: Path) -> dict:
    """Validate a diffusers SD3 folder and return its model_index.json."""
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json)")
    data = schemas.model_index(index)
    if (path / RECIPE_FILE).is_file():
        schemas.recipe(path / RECIPE_FILE)  # read again after loading: refused now, not after the load
    missing = [c for c in ("transformer", "vae", "scheduler") if not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{path} lacks component folder(s): {', '.join(missing)}")
    return data


def check_component_folder(folder: Path) -> None:
    """Refuse pickled weights, invalid safetensors and unreadable JSON/text in one component folder."""
    if not folder.is_dir():
        raise ModelLoadError(f"{folder.parent} has no {folder.name}/ folder")
    with os_errors(folder, "read", ModelLoadError):
        files = sorted(p for p in folder.iterdir() if p.is_file())
    pickles = [p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    weights = [p for p in files if p.suffix == ".safetensors"]
    if pickles and not weights:
        raise ModelLoadError(f"{folder} holds only pickled weights ({', '.join(pickles)}): pickles can run code when loaded "
                             "and are never loaded here; convert them to .safetensors")
    if pickles:
        log.info("%s: ignoring pickled files %s (only .safetensors are read)", folder, ", ".join(pickles))
    if folder.name in WEIGHTED and not weights:
        raise ModelLoadError(f"{folder} holds no .safetensors weights")
    for p in weights:
        read_header(p)  # lying headers, duplicate names, shapes beyond int64: before a library maps them
    for p in files:
        if p.suffix == ".json":
            read_json(p, "tokenizer" if folder.name.startswith("tokenizer") else "config")
        elif p.suffix in TEXT_SUFFIXES:
            read_text(p, "tokenizer")
