"""Prompt sets: a prompts file, a model's held-out evaluation prompts, its calibration prompts."""

from __future__ import annotations

from pathlib import Path

from sd3fp8.engine.modelspec import model_world
from sd3fp8.errors import ConfigError

SHAPE_WORLD = "shapes-v1"
DATA = Path(__file__).parent / "prompts"


def read_prompts(path: Path) -> list[str]:
    from sd3fp8.engine.request import check_prompt
    from sd3fp8.io.safe_read import read_text

    lines = [line.strip() for line in read_text(path, "prompts", ConfigError).splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    for i, prompt in enumerate(prompts):
        check_prompt(prompt, f"prompt {i + 1} of {path}")
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no prompts")
    return prompts


def default_prompts(model_path: Path, count: int = 8) -> list[str]:
    """Held-out captions for a shape-world model, else the shipped SD3.5 prompt set."""
    if model_world(model_path) == SHAPE_WORLD:
        from sd3fp8.miniature.world import heldout_prompts

        return heldout_prompts(count)
    return read_prompts(DATA / "sd35.txt")[:count]


def calibration_prompts(model_path: Path, count: int = 32) -> list[str]:
    """Training-distribution captions for a shape-world model (never the held-out ones eval uses),
    else the shipped SD3.5 calibration set."""
    if model_world(model_path) == SHAPE_WORLD:
        from sd3fp8.miniature.world import calibration_prompts as world_prompts

        return world_prompts(count)
    return read_prompts(DATA / "calibration.txt")[:count]
