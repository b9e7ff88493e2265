"""SD3 text conditioning as ComfyUI does it (CLIPTextEncode on an SD3 CLIP): prompt weights and the
token windows of CLIP-L, CLIP-G and T5-XXL.

ComfyUI's rules are cited as file:function of comfyanonymous/ComfyUI (the v0.8.0-era sources). The
encoders themselves are transformers' modules: the same math as comfy/clip_model.py and
comfy/text_encoders/t5.py, not necessarily the same float rounding (ComfyUI runs its own copies).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum

from ..errors import ConfigError

ENCODER_KEYS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL
TOKENIZER_KEYS = ("tokenizer", "tokenizer_2", "tokenizer_3")

Window = list[tuple[int, float]]  # one encoder input: (token id, weight) pairs


class TextMode(str, Enum):
    """How a prompt becomes conditioning."""

    COMFY = "comfy"  # CLIP windows of 77 (chunked, never truncated), T5 >= 77 tokens, prompt weights
    DIFFUSERS = "diffusers"  # CLIP truncated at 77, T5 padded/truncated to max_sequence_length


@dataclass(frozen=True)
class TextLayout:
    """Sizes of SD3's text conditioning. The defaults are SD3's, which ComfyUI hard-codes; `layout_of`
    takes what it can from the encoders present, so tiny test models work through the same code."""

    clip_window: int = 77  # sd1_clip.py SDTokenizer(max_length=77) = CLIP's position table
    t5_min_length: int = 77  # text_encoders/sd3_clip.py T5XXLTokenizer(min_length=77)
    clip_l_width: int = 768  # sd3_clip.py SD3ClipModel.encode_token_weights: zeros for an absent CLIP-L
    clip_g_width: int = 1280  # ... and for an absent CLIP-G
    context_width: int = 4096  # the CLIP part is zero-padded to this width (T5-XXL's d_model)

    def __post_init__(self):
        for f in fields(self):
            if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1:
                raise ConfigError(f"TextLayout.{f.name} must be a positive int, got {getattr(self, f.name)!r}")
        if self.clip_window < 9:  # a 7-token group plus start and end must fit, or packing never ends
            raise ConfigError(f"TextLayout.clip_window must be >= 9, got {self.clip_window}")
        if self.clip_l_width + self.clip_g_width > self.context_width:
            raise ConfigError(f"CLIP widths {self.clip_l_width} + {self.clip_g_width} exceed the context width "
                              f"{self.context_width}")


def layout_of(encoders: Mapping[str, object], base: TextLayout = TextLayout()) -> TextLayout:
    """``base`` with the window and widths of the encoders present (absent ones keep base's)."""
    clip_l, clip_g, t5 = (encoders.get(key) for key in ENCODER_KEYS)
    changes = {}
    windows = {e.config.max_position_embeddings for e in (clip_l, clip_g) if e is not None}
    if len(windows) > 1:
        raise ConfigError(f"CLIP-L and CLIP-G have different context lengths {sorted(windows)}")
    if windows:
        changes["clip_window"] = windows.pop()
    if clip_l is not None:
        changes["clip_l_width"] = clip_l.config.hidden_size
    if clip_g is not None:
        changes["clip_g_width"] = clip_g.config.hidden_size
    if t5 is not None:
        changes["context_width"] = t5.config.d_model
    return replace(base, **changes)


# ---- prompt weights: comfy/sd1_clip.py escape_important, token_weights, parse_parentheses ----------

_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))  # sd1_clip.py escape_important, in this order


def prompt_weights(text: str) -> list[tuple[str, float]]:
    """ComfyUI's prompt-weight syntax as (text segment, weight) pairs: "(x)" multiplies the weight by
    1.1 per level, "(x:1.3)" sets it to 1.3 (a number after the last colon; otherwise the colon stays
    text), "\\(" and "\\)" are literal parentheses. Unbalanced parentheses stay text."""
    for raw, code in _ESCAPES:
        text = text.replace(raw, code)
    out = []
    for segment, weight in _weighted(text, 1.0):
        for raw, code in _ESCAPES:  # sd1_clip.py unescape_important, per segment
            segment = segment.replace(code, raw[1])
        out.append((segment, weight))
    return out


def _weighted(text: str, weight: float) -> list[tuple[str, float]]:
    # sd1_clip.py token_weights: recursive; float() as the number parser ("1e1", " 1.5 ", "inf" pass)
    out = []
    for part in _split_parentheses(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner, inner_weight = part[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight, inner = float(inner[colon + 1:]), inner[:colon]
                except ValueError:
                    pass
            out += _weighted(inner, inner_weight)
        else:
            out.append((part, weight))
    return out


def _split_parentheses(text: str) -> list[str]:
    # sd1_clip.py parse_parentheses: top-level plain runs and "(...)" groups. A stray ")" takes the
    # depth below zero, and parentheses after it stay in the plain run, as there.
    parts, current, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if current:
                    parts.append(current)
                current = ""
            current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            current += ch
            if depth == 0:
                parts.append(current)
                current = ""
        else:
            current += ch
    if current:
        parts.append(current)
    return parts


# ---- tokens: comfy/sd1_clip.py SDTokenizer ---------------------------------------------------------


@dataclass(frozen=True)
class TokenRules:
    """One SDTokenizer's settings (sd1_clip.py SDTokenizer.__init__)."""

    start: int | None  # None: no start token (T5)
    end: int
    pad: int
    max_length: int  # window length; longer prompts continue in further windows
    pad_to_max_length: bool
    min_length: int = 0


def clip_rules(tokenizer, window: int, pad_with_end: bool) -> TokenRules:
    """CLIP: start and end read off ``tokenizer("")`` (SDTokenizer.__init__); pad = end for CLIP-L
    (pad_with_end=True), 0 for CLIP-G (sdxl_clip.py SDXLClipGTokenizer: pad_with_end=False)."""
    start, end = tokenizer("")["input_ids"][:2]
    return TokenRules(start, end, end if pad_with_end else 0, window, pad_to_max_length=True)


def t5_rules(tokenizer, min_length: int) -> TokenRules:
    """T5-XXL (sd3_clip.py T5XXLTokenizer): no start token, pad 0, no windows (max_length=99999999),
    padded to at least ``min_length`` and never truncated."""
    end = tokenizer("")["input_ids"][0]
    return TokenRules(None, end, 0, 99_999_999, pad_to_max_length=False, min_length=min_length)


_EMBEDDING = re.compile(r"(?:^|[ \n])embedding:")  # sd1_clip.py SDTokenizer.embedding_identifier


def tokenize_weighted(text: str, tokenizer, rules: TokenRules) -> list[Window]:
    """Windows of (token, weight) for one encoder (sd1_clip.py SDTokenizer.tokenize_with_weights)."""
    first = 0 if rules.start is None else 1
    groups = []
    for segment, weight in prompt_weights(text):
        if _EMBEDDING.search(segment):
            raise ConfigError(f"prompt segment {segment!r} names a textual-inversion embedding "
                              "('embedding:NAME'), which is not supported")
        # each weighted segment tokenized whole, the tokenizer's own start/end tokens stripped
        ids = tokenizer(segment, verbose=False)["input_ids"][first:-1]
        groups.append([(token, weight) for token in ids])
    return _pack(groups, rules)


def _pack(groups: list[Window], rules: TokenRules) -> list[Window]:
    # SDTokenizer.tokenize_with_weights, "reshape token array to CLIP input size": a window is start +
    # tokens + end (+ pad). A group of >= 8 tokens (max_word_length) is split across windows; a
    # shorter one that does not fit moves whole to the next window, this one ended and padded.
    head = [] if rules.start is None else [(rules.start, 1.0)]
    end, pad = (rules.end, 1.0), (rules.pad, 1.0)
    room = rules.max_length - 1  # the end token always takes a place
    windows = [list(head)]
    for group in groups:
        splittable = len(group) >= 8
        while group:
            window = windows[-1]
            if len(window) + len(group) <= room:
                window.extend(group)
                break
            free = room - len(window)
            if splittable:
                window.extend(group[:free])
                group = group[free:]
                window.append(end)
            else:
                window.append(end)
                if rules.pad_to_max_length:
                    window.extend([pad] * free)
            windows.append(list(head))
    last = windows[-1]
    last.append(end)
    target = max(rules.max_length if rules.pad_to_max_length else 0, rules.min_length)
    last.extend([pad] * (target - len(last)))
    return windows


def token_rules(key: str, tokenizer, layout: TextLayout) -> TokenRules:
    """The tokenizer settings ComfyUI uses for encoder ``key`` (sd3_clip.py SD3Tokenizer)."""
    if key == "text_encoder":
        return clip_rules(tokenizer, layout.clip_window, pad_with_end=True)
    if key == "text_encoder_2":
        return clip_rules(tokenizer, layout.clip_window, pad_with_end=False)
    return t5_rules(tokenizer, layout.t5_min_length)


def comfy_tokens(prompt: str, tokenizers: Mapping[str, object], encoders: Mapping[str, object],
                 layout: TextLayout) -> dict[str, tuple[TokenRules, list[Window]]]:
    """(rules, windows) of every encoder present, by encoder key (sd3_clip.py SD3Tokenizer)."""
    out = {}
    for key, tok_key in zip(ENCODER_KEYS, TOKENIZER_KEYS):
        if encoders.get(key) is None:
            continue
        tokenizer = tokenizers.get(tok_key)
        if tokenizer is None:
            raise ConfigError(f"{key} is present but {tok_key} is missing")
        rules = token_rules(key, tokenizer, layout)
        out[key] = rules, tokenize_weighted(prompt, tokenizer, rules)
    return out
