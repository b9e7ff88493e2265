"""Checks of a generation request's free-form values: seeds and prompts.

Seeds are unsigned 64-bit, as ComfyUI and torch's generators take them (0 .. 2^64-1); image i of a
batch uses seed + i, which must stay in range too. Prompts must be text: the command line turns
bytes that are not UTF-8 into lone surrogates (U+DC80..U+DCFF), which tokenizers crash on.
"""

from __future__ import annotations

from sd3fp8.errors import ConfigError

MAX_SEED = 2**64 - 1
MAX_PROMPT_CHARS = 100_000  # tokenizers truncate at a few hundred tokens; beyond this is a mistake


def check_seed(seed, batch: int = 1) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0 or seed + max(batch, 1) - 1 > MAX_SEED:
        last = f" (image {batch - 1} of the batch uses seed + {batch - 1})" if isinstance(seed, int) and batch > 1 and seed >= 0 else ""
        raise ConfigError(f"seed must be an integer in 0..{MAX_SEED} (ComfyUI's range), got {seed!r}{last}")


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
