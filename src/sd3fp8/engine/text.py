"""SD3 text conditioning behind one seam, two ways: ComfyUI's (CLIPTextEncode on an SD3 CLIP) and
diffusers' (StableDiffusion3Pipeline.encode_prompt), each ``(prompt, tokenizers, encoders, device,
dtype) -> (context [1, T, 4096], pooled [1, 2048])``.

ComfyUI's rules are cited as file:function of comfyanonymous/ComfyUI (the v0.8.0-era sources). The
encoders themselves are transformers' modules: the same math as comfy/clip_model.py and
comfy/text_encoders/t5.py, not necessarily the same float rounding (ComfyUI runs its own copies).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from ..enums import ChoiceStrEnum
from ..errors import ConfigError

ENCODER_KEYS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL
TOKENIZER_KEYS = ("tokenizer", "tokenizer_2", "tokenizer_3")

Window = list[tuple[int, float]]  # one encoder input: (token id, weight) pairs


class TextMode(ChoiceStrEnum, what="text mode"):
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


# ---- encoding: comfy/sd1_clip.py ClipTokenWeightEncoder, SDClipModel; sd3_clip.py SD3ClipModel ----

Run = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # ids [N, L] -> (z f32, pooled)


def _clip_run(encoder, end: int, projected: bool) -> Run:
    # SDClipModel(layer="hidden", layer_idx=-2, layer_norm_hidden_state=False): the second-to-last
    # layer's output without the final layer norm, no padding mask (causal only). Pooled: the last
    # layer, final-layer-normed, at the first end token (clip_model.py CLIPTextModel_.forward), through
    # text_projection only for CLIP-G (sdxl_clip.py SDXLClipG: return_projected_pooled=True; sd3_clip.py
    # SD3ClipModel builds CLIP-L with return_projected_pooled=False).
    def run(ids):
        out = encoder(input_ids=ids, output_hidden_states=True)
        last = out.last_hidden_state
        first_end = (ids == end).int().argmax(dim=-1)
        pooled = last[torch.arange(ids.shape[0], device=last.device), first_end]
        if projected:
            pooled = encoder.text_projection(pooled)
        return out.hidden_states[-2].float(), pooled.float()  # SDClipModel.forward: z.float()
    return run


def _t5_run(encoder) -> Run:
    # sd3_clip.py T5XXLModel(layer="last"), no attention mask (sd3_clip(t5_attention_mask=False))
    def run(ids):
        return encoder(input_ids=ids).last_hidden_state.float(), None
    return run


def encode_windows(windows: list[Window], rules: TokenRules, run: Run, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z [1, windows*L, D] float32, pooled [1, D] of the first window or None), as
    sd1_clip.py ClipTokenWeightEncoder.encode_token_weights: the windows run as one batch, plus the
    empty prompt (gen_empty_tokens) when some weight != 1; a token of weight w != 1 becomes
    (z - z_empty) * w + z_empty, position by position."""
    weighted = any(w != 1.0 for window in windows for _, w in window)
    length = max(len(window) for window in windows)
    ids = [[token for token, _ in window] for window in windows]
    if weighted:  # sd1_clip.py gen_empty_tokens: [start,] end, pad...
        empty = ([] if rules.start is None else [rules.start]) + [rules.end]
        ids.append(empty + [rules.pad] * (length - len(empty)))
    z, pooled = run(torch.tensor(ids, device=device))
    z, pooled = z.to(device), None if pooled is None else pooled[0:1].to(device)
    if weighted:
        z_empty = z[-1]  # [L, D]
        for k, window in enumerate(windows):
            w = torch.tensor([weight for _, weight in window], dtype=torch.float32, device=device)[:, None]
            z[k] = torch.where(w != 1.0, (z[k] - z_empty) * w + z_empty, z[k])
    return z[: len(windows)].reshape(1, -1, z.shape[-1]), pooled


def _module_device(module) -> torch.device:
    # sd1_clip.py SDClipModel.forward: the tokens go where the input embeddings are
    return module.get_input_embeddings().weight.device


@torch.no_grad()
def encode_comfy(prompt: str, tokenizers: Mapping[str, object], encoders: Mapping[str, object], device,
                 dtype: torch.dtype, *, layout: TextLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's CLIPTextEncode on an SD3 CLIP (sd3_clip.py SD3ClipModel.encode_token_weights):
    context = [pad_to_width(CLIP-L penultimate | CLIP-G penultimate) ; T5], the CLIP part in windows of
    77 (one more per 75 tokens), T5 at least 77 tokens and never truncated; pooled = CLIP-L pooled |
    CLIP-G pooled, from the first window. Absent encoders (None) contribute what ComfyUI's do: zeros
    in their pooled slot, nothing in the context (no T5: the CLIP rows alone), and with no encoder
    at all a zero context [1, 77, width]. Computed in float32, returned as ``dtype`` on ``device``."""
    layout = layout or layout_of(encoders)
    return encode_comfy_tokens(comfy_tokens(prompt, tokenizers, encoders, layout), encoders, device, dtype, layout=layout)


@torch.no_grad()
def encode_comfy_tokens(tokens: Mapping[str, tuple[TokenRules, list[Window]]], encoders: Mapping[str, object], device,
                        dtype: torch.dtype, *, layout: TextLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_comfy`` from windows already tokenized (``comfy_tokens``' shape), for callers that
    tokenize each encoder's text themselves (ComfyUI's CLIPTextEncodeSD3). An encoder whose key is
    not in ``tokens`` contributes as an absent one does."""
    states = {}  # encoder key -> (z [1, T, D], pooled [1, D] or None), float32 on device
    for key, encoder in encoders.items():
        if key in tokens:
            rules, windows = tokens[key]
            run = _t5_run(encoder) if key == "text_encoder_3" else _clip_run(encoder, rules.end, key == "text_encoder_2")
            z, pooled = encode_windows(windows, rules, run, _module_device(encoder))
            states[key] = z.to(device), None if pooled is None else pooled.to(device)
    lg, pooled = _joint_clip(states.get("text_encoder"), states.get("text_encoder_2"), layout, device)
    parts = [] if lg is None else [_pad_width(lg, layout.context_width)]
    if "text_encoder_3" in states:
        parts.append(states["text_encoder_3"][0])
    if parts:
        context = torch.cat(parts, dim=-2)
    else:
        context = torch.zeros(1, layout.clip_window, layout.context_width, device=device)
    return context.to(device, dtype), pooled.to(device, dtype)


def _joint_clip(l_state, g_state, layout: TextLayout, device):
    # sd3_clip.py SD3ClipModel.encode_token_weights: CLIP-L | CLIP-G along the width (cut to the shorter
    # sequence), CLIP-G alone shifted right past CLIP-L's columns, a missing pooled vector as zeros
    lg, l_pooled = l_state if l_state is not None else (None, torch.zeros(1, layout.clip_l_width, device=device))
    if g_state is None:
        return lg, torch.cat([l_pooled, torch.zeros(1, layout.clip_g_width, device=device)], dim=-1)
    g, g_pooled = g_state
    if lg is None:
        lg = F.pad(g, (layout.clip_l_width, 0))
    else:
        cut = min(lg.shape[1], g.shape[1])
        lg = torch.cat([lg[:, :cut], g[:, :cut]], dim=-1)
    return lg, torch.cat([l_pooled, g_pooled], dim=-1)


def _pad_width(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[-1] > width:  # F.pad would crop silently
        raise ConfigError(f"CLIP states are {x.shape[-1]} wide, more than the context width {width}")
    return F.pad(x, (0, width - x.shape[-1]))


# ---- diffusers: StableDiffusion3Pipeline.encode_prompt (diffusers 0.42) ----------------------------


@torch.no_grad()
def encode_diffusers(prompt: str, tokenizers: Mapping[str, object], encoders: Mapping[str, object], device,
                     dtype: torch.dtype, *, max_sequence_length: int = 256,
                     layout: TextLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' StableDiffusion3Pipeline.encode_prompt for one prompt (the same text to all three
    encoders, one image, no guidance, clip_skip and LoRA scale unset): CLIP-L/G penultimate states
    truncated/padded at the CLIP-L tokenizer's model_max_length, pooled = both projected pooled
    vectors, T5 padded/truncated to ``max_sequence_length`` (zeros [1, max_sequence_length,
    context_width] without T5), returned as ``dtype`` on ``device``."""
    layout = layout or layout_of(encoders)
    clip_l, clip_g, t5 = (encoders.get(key) for key in ENCODER_KEYS)
    if clip_l is None or clip_g is None:
        raise ConfigError("diffusers' encoding needs both CLIP encoders (text_encoder, text_encoder_2)")
    tokenizer_l = tokenizers["tokenizer"]
    window = tokenizer_l.model_max_length  # the pipeline's tokenizer_max_length, used for both CLIPs
    # _get_clip_prompt_embeds casts both CLIPs' states to text_encoder's (CLIP-L's) dtype
    l_states, l_pooled = _diffusers_clip(prompt, tokenizer_l, clip_l, window, device, clip_l.dtype)
    g_states, g_pooled = _diffusers_clip(prompt, tokenizers["tokenizer_2"], clip_g, window, device, clip_l.dtype)
    if t5 is None:  # _get_t5_prompt_embeds: its dtype defaults to text_encoder's
        t5_states = torch.zeros(1, max_sequence_length, layout.context_width, device=device, dtype=clip_l.dtype)
    else:
        ids = tokenizers["tokenizer_3"](prompt, padding="max_length", max_length=max_sequence_length,
                                        truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        t5_states = t5(ids.to(device))[0].to(dtype=t5.dtype, device=device)
    clip_states = torch.cat([l_states, g_states], dim=-1)
    clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    context = torch.cat([clip_states, t5_states], dim=-2)
    pooled = torch.cat([l_pooled, g_pooled], dim=-1)
    return context.to(device, dtype), pooled.to(device, dtype)


def _diffusers_clip(prompt, tokenizer, encoder, window, device, states_dtype):
    # StableDiffusion3Pipeline._get_clip_prompt_embeds with clip_skip=None
    ids = tokenizer(prompt, padding="max_length", max_length=window, truncation=True, return_tensors="pt").input_ids
    out = encoder(ids.to(device), output_hidden_states=True)
    return out.hidden_states[-2].to(dtype=states_dtype, device=device), out[0]


# The seam: one signature, (prompt, tokenizers, encoders, device, dtype) -> (context, pooled).
ENCODINGS = {TextMode.COMFY: encode_comfy, TextMode.DIFFUSERS: encode_diffusers}
