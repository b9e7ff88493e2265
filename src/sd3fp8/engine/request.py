"""What one generation asks for (GenerationRequest), validated in one place, and the model's
defaults (Recipe) that fill what a request leaves open."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from sd3fp8.errors import ConfigError
from sd3fp8.sampling.noise import check_seed

MAX_SIDE = 4096  # pixels; SD3.5 is trained up to ~1.5 MP, beyond this is a typo, not a request
MAX_BATCH = 64
MAX_STEPS = 1000
MAX_CFG = 100.0
MAX_SEED = 2**64 - 1  # ComfyUI's range: 0 .. 2^64-1
MAX_PROMPT_CHARS = 100_000  # tokenizers truncate at a few hundred tokens; beyond this is a mistake
RECIPE_FILE = "sd3fp8.json"  # optional per-model defaults (steps, cfg, size) beside model_index.json


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Generation defaults for a model (from its sd3fp8.json, else SD3.5's usual ones)."""

    steps: int = 28
    cfg: float = 4.5
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = 256  # T5 tokens


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One generation: prompts x ``batch`` images. ``None`` fields take the model's recipe.

    Noise follows ComfyUI: one generator seeded with ``seed`` per prompt, image i of the batch is
    its (batch_index + i)-th draw; so image i is regenerated alone with batch=1, batch_index=i.
    ``sampler``/``scheduler`` take ComfyUI's names or A1111's ("Euler a", "DPM++ 2M", "Karras");
    ``shift`` None = the model's; ``init_image`` (a PIL image) with ``denoise`` < 1 is img2img.
    """

    prompt: str | tuple[str, ...]
    negative_prompt: str | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int = 0
    width: int | None = None
    height: int | None = None
    batch: int = 1
    sampler: str = "euler"
    scheduler: str = "normal"
    shift: float | None = None
    denoise: float = 1.0
    init_image: Any = None
    batch_index: int = 0
    text_mode: str = "diffusers"  # or "comfy": see engine/text.py

    def __post_init__(self):
        from sd3fp8.sampling.aliases import parse_sampler, parse_scheduler

        object.__setattr__(self, "sampler", parse_sampler(self.sampler))
        object.__setattr__(self, "scheduler", parse_scheduler(self.scheduler))
        from sd3fp8.engine.text import TextMode

        check_sampling_numbers(self.shift, self.denoise, self.batch_index, self.batch)
        object.__setattr__(self, "text_mode", TextMode.parse(self.text_mode))
        if self.init_image is not None and not hasattr(self.init_image, "convert"):
            raise ConfigError(f"init image must be a PIL image, got {type(self.init_image).__name__}")
        prompts = (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError("prompt must be a string or a non-empty list of strings")
        for text in prompts:
            check_prompt(text)
        check_prompt(self.negative_prompt, "negative prompt")
        object.__setattr__(self, "prompt", prompts[0] if len(prompts) == 1 and isinstance(self.prompt, str) else prompts)
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ConfigError(f"negative prompt must be a string, got {type(self.negative_prompt).__name__}")
        check_request_numbers(self.steps, self.cfg, self.width, self.height, self.batch, self.seed)

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else self.prompt

    def image_prompts(self) -> list[str]:
        """One prompt per image: each prompt repeated ``batch`` times."""
        return [p for p in self.prompts for _ in range(self.batch)]

    def batch_indices(self) -> list[int]:
        """Each image's draw from its prompt's noise generator."""
        return [self.batch_index + i for _ in self.prompts for i in range(self.batch)]

    def resolved(self, recipe: Recipe) -> GenerationRequest:
        """This request with every open field filled from ``recipe``."""
        filled = {f: getattr(recipe, f) for f in ("steps", "cfg", "width", "height") if getattr(self, f) is None}
        return dataclasses.replace(self, **filled) if filled else self


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_request_numbers(steps, cfg, width, height, batch, seed=0) -> None:
    """Range checks for a request's numbers; ``None`` means "the model's default" and passes."""
    if steps is not None and (not _is_int(steps) or not 1 <= steps <= MAX_STEPS):
        raise ConfigError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    if not _is_int(batch) or not 1 <= batch <= MAX_BATCH:
        raise ConfigError(f"batch must be an integer in 1..{MAX_BATCH}, got {batch!r}")
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg)
                            or not 0 <= cfg <= MAX_CFG):
        raise ConfigError(f"cfg must be a number in 0..{MAX_CFG:g}, got {cfg!r}")
    for name, side in (("width", width), ("height", height)):
        if side is not None and (not _is_int(side) or side < 16 or side % 16 or side > MAX_SIDE):
            raise ConfigError(f"{name} must be a multiple of 16 in 16..{MAX_SIDE}, got {side!r}")
    check_seed(seed)


def check_sampling_numbers(shift, denoise, batch_index, batch) -> None:
    if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift)
                              or not 0 < shift <= 100):
        raise ConfigError(f"shift must be a number in (0, 100], got {shift!r}")
    if isinstance(denoise, bool) or not isinstance(denoise, (int, float)) or not 0 <= denoise <= 1:
        raise ConfigError(f"denoise must be a number in 0..1, got {denoise!r}")
    if not _is_int(batch_index) or not 0 <= batch_index < 4096:
        raise ConfigError(f"batch index must be an integer in 0..4095, got {batch_index!r}")


def read_recipe(path: Path, default_side: int) -> Recipe:
    """The folder's generation defaults (its sd3fp8.json ``defaults``, checked field by field by
    io.schemas: an unknown default is an error, an unknown section a warning), the rest from SD3.5's
    usual ones."""
    from sd3fp8.io import schemas

    data: dict[str, Any] = {"width": default_side, "height": default_side}
    recipe_file = path / RECIPE_FILE
    if recipe_file.is_file():
        data.update(schemas.recipe(recipe_file)["defaults"])
    recipe = Recipe(**data)
    try:  # the rules a request's numbers follow (sides multiple of 16, ...), beyond the schema's ranges
        check_request_numbers(recipe.steps, recipe.cfg, recipe.width, recipe.height, 1)
    except ConfigError as e:
        raise ConfigError(f"{recipe_file}: {e}") from None
    return recipe


# Model-card recipes by architecture (Large and Large Turbo share shapes: Turbo users pass --steps 4 --cfg 1,
# which skips the negative prompt as ComfyUI does).
VARIANT_RECIPES = {"SD3 Medium": {"steps": 28, "cfg": 7.0}, "SD3.5 Medium": {"steps": 40, "cfg": 4.5},
                   "SD3.5 Large / Large Turbo": {"steps": 28, "cfg": 3.5}}


def variant_recipe(variant: str, default_side: int) -> Recipe:
    return Recipe(**VARIANT_RECIPES.get(variant, {}), width=default_side, height=default_side)


# Prompts must be text: the command line turns bytes that are not UTF-8 into lone surrogates
# (U+DC80..U+DCFF), which tokenizers crash on.
def check_prompt(text, what: str = "prompt") -> None:
    if text is None and what != "prompt":
        return
    if not isinstance(text, str):
        raise ConfigError(f"the {what} must be text, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise ConfigError(f"the {what} is {len(text)} characters long (at most {MAX_PROMPT_CHARS})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # only surrogates (U+D800..U+DFFF) have no UTF-8
        code = ord(text[e.start])
        hint = " (a byte that is not UTF-8 on the command line?)" if code >= 0xDC80 else ""
        raise ConfigError(f"the {what} holds the invalid code point U+{code:04X} at position {e.start}{hint}") from None
