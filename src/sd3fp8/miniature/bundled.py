"""Where the default model comes from: the miniature SD3 bundled with the package.

It was trained on the shape world by ``python -m sd3fp8.miniature.training`` (see docs/miniature.md) and
lives in ``sd3fp8/assets/mini-sd3`` in the diffusers folder layout.
"""

from __future__ import annotations

from pathlib import Path

from sd3fp8.errors import ModelLoadError

BUNDLED_MODEL = Path(__file__).parent / "assets" / "mini-sd3"


def default_model_path() -> Path:
    """Path of the default (bundled) model."""
    if not (BUNDLED_MODEL / "model_index.json").is_file():
        raise ModelLoadError(
            f"the bundled model is missing from {BUNDLED_MODEL}: reinstall sd3fp8, or pass --model PATH"
        )
    return BUNDLED_MODEL
