"""SD3 text conditioning (engine/text.py): ComfyUI's prompt weights and token layout on tiny CLIP/T5 models."""

import pytest
import torch

from sd3fp8.engine.text import comfy_tokens, layout_of, prompt_weights
from sd3fp8.errors import ConfigError

L_WIDTH, G_WIDTH, T5_WIDTH = 32, 48, 96  # distinct, so a misplaced block shows
RED = ("red " * 100).strip()  # "red" is one token in the tiny vocabularies


def _models(tmp, clip_l, clip_g, t5, clip_layers=2, t5_layers=1):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd3fp8.miniature.tiny import BASIC_WORDS, build_clip_tokenizer, build_t5_tokenizer

    words = tuple(BASIC_WORDS)
    tokenizers = {"tokenizer": build_clip_tokenizer(words, tmp / "tokenizer"),
                  "tokenizer_2": build_clip_tokenizer(words, tmp / "tokenizer_2"),
                  "tokenizer_3": build_t5_tokenizer(words, tmp / "tokenizer_3")}
    eos = tokenizers["tokenizer"].convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)

    def clip(width):
        config = CLIPTextConfig(vocab_size=eos + 1, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=clip_layers,
                                num_attention_heads=2, max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
                                bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos)
        return CLIPTextModelWithProjection(config).eval()

    t5_config = T5Config(vocab_size=len(tokenizers["tokenizer_3"]), d_model=t5, d_kv=8, d_ff=32, num_layers=t5_layers,
                         num_heads=2, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    encoders = {"text_encoder": clip(clip_l), "text_encoder_2": clip(clip_g), "text_encoder_3": T5EncoderModel(t5_config).eval()}
    return tokenizers, encoders


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sd3fp8._env import quiet_libraries

    quiet_libraries()
    return _models(tmp_path_factory.mktemp("text"), L_WIDTH, G_WIDTH, T5_WIDTH)


def ids(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


# ---- prompt weights: expected values are what ComfyUI's sd1_clip.token_weights (with
# escape_important / unescape_important) returns for these prompts --------------------------------

WEIGHT_TABLE = [
    ("a red circle", [("a red circle", 1.0)]),
    ("(a red circle:1.3)", [("a red circle", 1.3)]),
    ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
    ("((nested))", [("nested", 1.2100000000000002)]),
    ("(((x)))", [("x", 1.3310000000000004)]),
    ("((a:1.5))", [("a", 1.5)]),
    ("((a):2)", [("a", 2.2)]),
    ("(a (b) c:1.5)", [("a ", 1.5), ("b", 1.6500000000000001), (" c", 1.5)]),
    ("(a (b:0.5):1.5)", [("a ", 1.5), ("b", 0.5)]),
    ("((a)b)", [("a", 1.2100000000000002), ("b", 1.1)]),
    ("a (b:0.5) (c:1.5)", [("a ", 1.0), ("b", 0.5), (" ", 1.0), ("c", 1.5)]),
    ("\\(not weighted\\)", [("(not weighted)", 1.0)]),
    ("(a:1.2) \\(b:1.3\\)", [("a", 1.2), (" (b:1.3)", 1.0)]),
    ("(a\\):1.2)", [("a)", 1.2)]),
    ("\\\\(a\\\\)", [("\\(a\\)", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(:1.2)", [(":1.2", 1.1)]),
    ("(a:1.2:1.3)", [("a:1.2", 1.3)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:1e1)", [("a", 10.0)]),
    ("(x:-1)", [("x", -1.0)]),
    ("x (a\nb:0.8) y", [("x ", 1.0), ("a\nb", 0.8), (" y", 1.0)]),
    ("()", []),
    ("a () b", [("a ", 1.0), (" b", 1.0)]),
    ("", []),
    ("(a", [("(a", 1.0)]),
    ("a) (b)", [("a) (b)", 1.0)]),
    ("a)) b (c", [("a)) b (c", 1.0)]),
    (")(", [(")(", 1.0)]),
]


@pytest.mark.parametrize("prompt,expected", WEIGHT_TABLE)
def test_prompt_weights_as_comfyui(prompt, expected):
    assert prompt_weights(prompt) == expected


# ---- token layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("key,tok_key,pad_is_end", [("text_encoder", "tokenizer", True), ("text_encoder_2", "tokenizer_2", False)])
def test_clip_windows_of_77_with_start_end_pad(tiny, key, tok_key, pad_is_end):
    tokenizers, encoders = tiny
    tok = tokenizers[tok_key]
    start, end, red = ids(tok, "<|startoftext|>", "<|endoftext|>", "red</w>")
    pad = end if pad_is_end else 0  # CLIP-L pads with its end token, CLIP-G with 0
    (rules, windows) = comfy_tokens("a red circle", *tiny, layout_of(encoders))[key]
    assert (rules.start, rules.end, rules.pad) == (start, end, pad)
    assert windows == [[(start, 1.0)] + [(t, 1.0) for t in ids(tok, "a</w>", "red</w>", "circle</w>")] + [(end, 1.0)]
                       + [(pad, 1.0)] * 72]
    # 100 tokens: 75 in the first window, the rest in a second one, both 77 long
    _, windows = comfy_tokens(RED, *tiny, layout_of(encoders))[key]
    assert [[t for t, _ in w] for w in windows] == [[start] + [red] * 75 + [end], [start] + [red] * 25 + [end] + [pad] * 50]


def test_short_weighted_group_moves_to_the_next_window_long_one_splits(tiny):
    tokenizers, encoders = tiny
    tok = tokenizers["tokenizer"]
    start, end, red = ids(tok, "<|startoftext|>", "<|endoftext|>", "red</w>")
    four = ids(tok, "a</w>", "big</w>", "blue</w>", "circle</w>")
    _, windows = comfy_tokens("red " * 73 + "(a big blue circle:1.2)", *tiny, layout_of(encoders))["text_encoder"]
    assert windows[0] == [(start, 1.0)] + [(red, 1.0)] * 73 + [(end, 1.0)] * 3  # ended, padded (pad = end)
    assert windows[1][:6] == [(start, 1.0)] + [(t, 1.2) for t in four] + [(end, 1.0)]
    eight = ids(tok, "a</w>", "big</w>", "blue</w>", "circle</w>", "on</w>", "the</w>", "green</w>", "sea</w>")
    _, windows = comfy_tokens("red " * 73 + "(a big blue circle on the green sea:1.2)", *tiny, layout_of(encoders))["text_encoder"]
    assert windows[0] == [(start, 1.0)] + [(red, 1.0)] * 73 + [(t, 1.2) for t in eight[:2]] + [(end, 1.0)]
    assert windows[1][:8] == [(start, 1.0)] + [(t, 1.2) for t in eight[2:]] + [(end, 1.0)]


def test_t5_padded_to_77_and_never_truncated(tiny):
    tokenizers, encoders = tiny
    tok = tokenizers["tokenizer_3"]
    (rules, windows) = comfy_tokens("a red circle", *tiny, layout_of(encoders))["text_encoder_3"]
    body = tok("a red circle")["input_ids"]  # ends with </s> = 1
    assert (rules.start, rules.end, rules.pad) == (None, 1, 0)
    assert [t for t, _ in windows[0]] == body + [0] * (77 - len(body))
    long = ("red " * 320).strip()
    _, windows = comfy_tokens(long, *tiny, layout_of(encoders))["text_encoder_3"]
    assert len(windows) == 1 and [t for t, _ in windows[0]] == tok(long)["input_ids"] and len(windows[0]) == 321


def test_empty_prompt_layout(tiny):
    tokenizers, encoders = tiny
    tokens = comfy_tokens("", *tiny, layout_of(encoders))
    start, end = ids(tokenizers["tokenizer"], "<|startoftext|>", "<|endoftext|>")
    assert [t for t, _ in tokens["text_encoder"][1][0]] == [start, end] + [end] * 75
    assert [t for t, _ in tokens["text_encoder_2"][1][0]] == [start, end] + [0] * 75
    assert [t for t, _ in tokens["text_encoder_3"][1][0]] == [1] + [0] * 76


def test_textual_inversion_syntax_is_refused(tiny):
    with pytest.raises(ConfigError, match="embedding"):
        comfy_tokens("a photo embedding:my_style", *tiny, layout_of(tiny[1]))
