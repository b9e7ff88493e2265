"""A ComfyUI models tree (`--models DIR`): which files each loader node may offer.

ComfyUI's folders and their legacy names: checkpoints/, diffusion_models/ or unet/, text_encoders/
or clip/, vae/. Names are paths relative to their folder (`sub/x.safetensors`), as ComfyUI lists
them. Only safetensors files: nothing here is ever unpickled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from sd3fp8.workflow.backend import MODEL_FOLDERS
from sd3fp8.workflow.paths import confined

log = logging.getLogger(__name__)
FOLDER_NAMES = {"checkpoints": ("checkpoints",), "diffusion_models": ("diffusion_models", "unet"),
                "text_encoders": ("text_encoders", "clip"), "vae": ("vae",)}
SUFFIXES = (".safetensors", ".sft")

# (folder, path) -> None when usable, else the reason it is not (logged, left out of the lists)
Recognise = Callable[[str, Path], "str | None"]


class ModelTree:
    """The model files under a ComfyUI root or models folder, rescanned on every listing (cheap:
    names only), filtered by ``recognise``."""

    def __init__(self, root: Path, recognise: Recognise | None = None):
        root = Path(root)
        self.root = root / "models" if (root / "models").is_dir() else root
        self.recognise = recognise
        self._reported: set[Path] = set()

    def folders(self, folder: str) -> list[Path]:
        return [self.root / name for name in FOLDER_NAMES.get(folder, ()) if (self.root / name).is_dir()]

    def files(self, folder: str) -> list[str]:
        if folder not in MODEL_FOLDERS:
            return []
        names = set()
        for base in self.folders(folder):
            for path in base.rglob("*"):
                if not path.is_file() or path.suffix.lower() not in SUFFIXES:
                    continue
                reason = self.recognise(folder, path) if self.recognise else None
                if reason is not None:
                    if path not in self._reported:
                        log.warning("%s: unusable as %s: %s", path, folder, reason)
                        self._reported.add(path)
                    continue
                names.add(path.relative_to(base).as_posix())
        return sorted(names)

    def path(self, folder: str, name: str) -> Path:
        """The file a loader's ``name`` refers to (confined to the folder)."""
        for base in self.folders(folder):
            path = confined(base, name)  # PathEscape for names leading out
            if path.is_file():
                return path
        raise FileNotFoundError(f"{name} is not in {folder}/ under {self.root}")
