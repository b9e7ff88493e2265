"""What to load: the model options every model-loading command takes, as one value.

Plain strings (JSON-serialisable: `sd3fp8 bench` hands it to its worker processes); no torch import.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from sd3fp8.engine.request import RECIPE_FILE

if TYPE_CHECKING:
    from sd3fp8.engine.pipeline import SD3FP8Pipeline
    from sd3fp8.policy import Policy
    from sd3fp8.runtime import RuntimeConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model as `--model`, `--checkpoint`, `--transformer`, `--text-encoders`, `--vae` and
    `--tokenizers` name it (see SD3FP8Pipeline.from_pretrained)."""

    path: str | None = None  # diffusers folder, single file or ComfyUI tree; None: the bundled model
    checkpoint: str | None = None  # which checkpoint of a ComfyUI tree
    transformer: str | None = None  # take the MMDiT from this single file
    extra_files: tuple[str, ...] = ()  # text-encoder / VAE files or folders for a single file
    tokenizers: str | None = None

    def __post_init__(self):
        for name in ("path", "transformer", "tokenizers"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else str(value))
        object.__setattr__(self, "extra_files", tuple(str(p) for p in self.extra_files))

    def load(self, policy: Policy | None = None, runtime: RuntimeConfig | None = None,
             calibration: str | Path | None = None) -> SD3FP8Pipeline:
        from sd3fp8.engine.pipeline import SD3FP8Pipeline

        return SD3FP8Pipeline.from_pretrained(self.path, policy, runtime, self.transformer, checkpoint=self.checkpoint,
                                              extra_files=self.extra_files, tokenizers=self.tokenizers, calibration=calibration)

    def check(self, policy: Policy | None = None) -> None:
        """Find every component's source as loading would (file headers only, no weights): a wrong
        path, file or option fails here, before anything expensive."""
        from sd3fp8.engine.pipeline import check_model_folder
        from sd3fp8.io.sources import resolve_sources
        from sd3fp8.policy import Policy

        sources = resolve_sources(None if self.path is None else Path(self.path), policy or Policy(), self.checkpoint,
                                  tuple(Path(p) for p in self.extra_files), Path(self.tokenizers) if self.tokenizers else None)
        if sources.folder is not None:
            check_model_folder(sources.folder)
        if self.transformer is not None and not Path(self.transformer).is_file():
            from sd3fp8.errors import ModelLoadError

            raise ModelLoadError(f"--transformer {self.transformer} is not a file")

    def resolved_path(self) -> Path:
        """The model's path (the bundled model's when none is given)."""
        if self.path is not None:
            return Path(self.path)
        from sd3fp8.miniature.bundled import default_model_path

        return default_model_path()

    def world(self) -> str | None:
        """The picture world a miniature model was trained on (its sd3fp8.json says), else None."""
        return model_world(self.resolved_path())


def model_world(path: Path) -> str | None:
    from sd3fp8.io import schemas

    recipe = Path(path) / RECIPE_FILE
    return schemas.recipe(recipe)["world"] if recipe.is_file() else None
