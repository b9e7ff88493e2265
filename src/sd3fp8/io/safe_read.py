"""The one safe way to read text and JSON from users' files: bounded size, strict UTF-8, bounded
nesting and number sizes, no duplicate keys, no NaN, no lone surrogates; every failure is one
typed error naming the file and the problem (never RecursionError, ValueError or a traceback).

Python's own parser would accept most of what is refused here (NaN, duplicate keys, lone
surrogates) or fail with an untyped error (RecursionError on deep nesting, ValueError on integers
of thousands of digits). Every loader of a JSON or text file goes through this module.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path

from sd3fp8.errors import ModelLoadError, SD3FP8Error
from sd3fp8.io.oserrors import os_errors

MAX_DEPTH = 64  # our files nest 4 deep; Python's parser recurses (RecursionError near 1000 levels)
MAX_INT_DIGITS = 40  # 2**64 has 20 digits; Python refuses to convert beyond 4300 with ValueError
KiB, MiB = 2**10, 2**20
LIMITS = {  # bytes; what is beyond is a mistake or an attack, not a file of that kind
    "policy": 1 * MiB, "config": 4 * MiB, "recipe": 1 * MiB, "model index": 1 * MiB, "prompts": 16 * MiB,
    "calibration": 256 * MiB, "tokenizer": 64 * MiB, "metadata": 100 * MiB,
}

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # a JSON string, unrolled (linear time)
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
# an escaped high surrogate not followed by a low one, or a low one not preceded by a high one
_LONE_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|"
                             r"(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")
ErrorType = type[SD3FP8Error]


class _Refused(ValueError):
    """Raised from inside the JSON parser's hooks; turned into the caller's error type."""


def read_bytes(path: str | Path, what: str, error: ErrorType = ModelLoadError, limit: int | None = None) -> bytes:
    """At most ``limit`` bytes of ``path`` (default: the limit for ``what``); more is an error."""
    path = Path(path)
    limit = LIMITS.get(what, 4 * MiB) if limit is None else limit
    with os_errors(path, f"read {what} file", error):
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} file {path} is larger than {limit // KiB} KiB: not a {what} file")
    return data


def decode(data: bytes, source: str, error: ErrorType = ModelLoadError) -> str:
    """Strict UTF-8 (a leading byte-order mark is allowed and dropped)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{source} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    return text.removeprefix("\ufeff")


def read_text(path: str | Path, what: str, error: ErrorType = ModelLoadError, limit: int | None = None) -> str:
    return decode(read_bytes(path, what, error, limit), f"{what} file {path}", error)


def read_json(path: str | Path, what: str, error: ErrorType = ModelLoadError, limit: int | None = None):
    return parse_json(read_text(path, what, error, limit), f"{what} file {path}", error)


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:30]} is out of range")
    return value


def _constant(name: str):
    raise _Refused(f"{name} is not a JSON number")


def _object(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key!r}")
        out[key] = value
    return out


def nesting_depth(text: str) -> int:
    """How deep brackets outside strings nest, in linear time and without recursion (strings
    removed by a regular expression, the rest counted with a running sum)."""
    data = text.encode("utf-8", "surrogatepass")
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return MAX_DEPTH  # cannot be deeper: skip the scan (small files)
    import numpy as np

    step = np.zeros(256, dtype=np.int8)
    step[list(b"[{")], step[list(b"]}")] = 1, -1
    brackets = np.frombuffer(_STRING.sub(b"", data).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    return int(np.cumsum(step[brackets], dtype=np.int64).max(initial=0))


def _check_strings(value, source: str, error: ErrorType) -> None:
    """Refuse lone surrogates ("\\ud800"): valid JSON escapes, but not text (no UTF-8 exists for them).
    Iterative: the value is at most MAX_DEPTH deep, but a walk need not rely on that."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise error(f"{source}: a string holds the invalid code point U+{ord(item[e.start]):04X} "
                            "(a lone surrogate)") from None


def parse_json(data: str | bytes, source: str, error: ErrorType = ModelLoadError):
    """Parse JSON text from ``source`` (named in errors) within this module's limits."""
    text = decode(data, source, error) if isinstance(data, (bytes, bytearray)) else data
    if nesting_depth(text) > MAX_DEPTH:
        raise error(f"{source}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant, object_pairs_hook=_object)
    except _Refused as e:
        raise error(f"{source}: {e}") from None
    except json.JSONDecodeError as e:
        raise error(f"{source} is not valid JSON ({e})") from None
    except RecursionError:  # not reached after the depth check; kept as the last line of defence
        raise error(f"{source}: JSON nested deeper than {MAX_DEPTH} levels") from None
    if _LONE_SURROGATE.search(text):
        _check_strings(value, source, error)
    return value


def parse_toml(text: str, source: str, error: ErrorType = ModelLoadError) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{source} is not valid TOML ({e})") from None
    except RecursionError:
        raise error(f"{source}: TOML nested too deeply") from None
    except ValueError as e:  # integers beyond Python's digit limit
        raise error(f"{source}: {str(e).splitlines()[0]}") from None
