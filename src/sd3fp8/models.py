"""Where the default model comes from.

Until a trained miniature model is bundled, the default is the untrained tiny SD3 from
:mod:`sd3fp8.tiny`, written once (offline, deterministically) into the user's cache folder.
"""

from __future__ import annotations

from pathlib import Path

from .tiny import TinySpec, write_tiny_model

DEFAULT_MODEL_NAME = "tiny-sd3-v1"


def cache_dir() -> Path:
    return Path.home() / ".cache" / "sd3fp8"


def default_model_path(root: Path | None = None) -> Path:
    """Path of the default model, writing it first if this machine does not have it yet."""
    path = (root or cache_dir()) / DEFAULT_MODEL_NAME
    if not (path / "model_index.json").is_file():
        try:
            write_tiny_model(path, TinySpec())
        except FileExistsError:  # another process wrote it meanwhile
            pass
    return path
