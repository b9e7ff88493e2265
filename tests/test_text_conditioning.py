"""SD3 text conditioning (engine/text.py): ComfyUI's token layout, prompt weights and weighted encoding,
absent encoders, and diffusers' encode_prompt reproduced bit for bit, on tiny CLIP/T5 models."""

import pytest
import torch

from sd3fp8.engine.text import (
    ENCODINGS,
    TextLayout,
    TextMode,
    comfy_tokens,
    encode_comfy,
    encode_diffusers,
    layout_of,
    prompt_weights,
)
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


def comfy(prompt, tiny, **kw):
    return encode_comfy(prompt, *tiny, "cpu", torch.float32, **kw)


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


def test_textual_inversion_syntax_is_refused(tiny):
    with pytest.raises(ConfigError, match="embedding"):
        comfy("a photo embedding:my_style", tiny)


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
    context, pooled = comfy("", tiny)
    assert context.shape == (1, 154, T5_WIDTH) and pooled.shape == (1, L_WIDTH + G_WIDTH)


@pytest.mark.parametrize("prompt,clip_windows", [("a red circle", 1), (RED, 2), ("red " * 160, 3), ("red " * 320, 5)])
def test_sequence_length_and_widths(tiny, prompt, clip_windows):
    n_t5 = len(tiny[0]["tokenizer_3"](prompt)["input_ids"])
    context, pooled = comfy(prompt, tiny)
    assert context.shape == (1, 77 * clip_windows + max(77, n_t5), T5_WIDTH) and pooled.shape == (1, L_WIDTH + G_WIDTH)
    assert context.dtype == pooled.dtype == torch.float32
    assert torch.all(context[:, : 77 * clip_windows, L_WIDTH + G_WIDTH:] == 0)  # CLIP part zero-padded to the T5 width


# ---- what is encoded -----------------------------------------------------------------------------


def _windows_ids(prompt, tiny, key):
    _, windows = comfy_tokens(prompt, *tiny, layout_of(tiny[1]))[key]
    return torch.tensor([[t for t, _ in w] for w in windows])


@pytest.mark.parametrize("prompt", ["a red circle", RED])
def test_penultimate_states_and_first_window_pooled(tiny, prompt):
    tokenizers, encoders = tiny
    context, pooled = comfy(prompt, tiny)
    n = 77 * len(_windows_ids(prompt, tiny, "text_encoder"))
    with torch.no_grad():
        l_out = encoders["text_encoder"](_windows_ids(prompt, tiny, "text_encoder"), output_hidden_states=True)
        l_text = encoders["text_encoder"].text_model(_windows_ids(prompt, tiny, "text_encoder"))
        g_out = encoders["text_encoder_2"](_windows_ids(prompt, tiny, "text_encoder_2"), output_hidden_states=True)
        t5_out = encoders["text_encoder_3"](_windows_ids(prompt, tiny, "text_encoder_3")).last_hidden_state
    assert torch.equal(context[0, :n, :L_WIDTH], l_out.hidden_states[-2].reshape(n, L_WIDTH))
    assert torch.equal(context[0, :n, L_WIDTH:L_WIDTH + G_WIDTH], g_out.hidden_states[-2].reshape(n, G_WIDTH))
    assert torch.equal(context[0, n:], t5_out[0])
    # CLIP-L's pooled vector before text_projection, CLIP-G's after it; both from the first window
    assert torch.equal(pooled[:, :L_WIDTH], l_text.pooler_output[0:1])
    assert not torch.allclose(pooled[:, :L_WIDTH], l_out.text_embeds[0:1])
    assert torch.equal(pooled[:, L_WIDTH:], g_out.text_embeds[0:1])


def _comfy_weighting(z, z_empty, weights):
    # ComfyUI's loop, position by position: z = (z - z_empty) * w + z_empty where w != 1
    z = z.clone()
    for j, w in enumerate(weights):
        if w != 1.0:
            z[j] = (z[j] - z_empty[j]) * w + z_empty[j]
    return z


def test_weighted_encoding_interpolates_from_the_empty_prompt(tiny):
    tokenizers, encoders = tiny
    prompt = "a (red:1.5) ((circle)) (on the sea:0.5)"
    context, pooled = comfy(prompt, tiny)
    layout = layout_of(encoders)
    for key, cols, rows in [("text_encoder", slice(0, L_WIDTH), slice(0, 77)),
                            ("text_encoder_2", slice(L_WIDTH, L_WIDTH + G_WIDTH), slice(0, 77)),
                            ("text_encoder_3", slice(0, T5_WIDTH), slice(77, None))]:
        rules, windows = comfy_tokens(prompt, *tiny, layout)[key]
        weights = [w for _, w in windows[0]]
        assert {round(w, 4) for w in weights} == {1.0, 1.5, 1.21, 0.5}
        empty = ([] if rules.start is None else [rules.start]) + [rules.end]
        batch = torch.tensor([[t for t, _ in windows[0]], empty + [rules.pad] * (len(weights) - len(empty))])
        with torch.no_grad():
            if key == "text_encoder_3":
                z = encoders[key](batch).last_hidden_state
            else:
                z = encoders[key](batch, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(context[0, rows, cols], _comfy_weighting(z[0], z[1], weights))
    # the pooled vectors ignore weights: the same tokens unweighted give them to float rounding (the
    # batch differs: ComfyUI runs the empty prompt along with the windows)
    plain_context, plain_pooled = comfy("a red circle on the sea", tiny)
    assert torch.allclose(pooled, plain_pooled, rtol=0, atol=1e-5) and not torch.allclose(context, plain_context, atol=1e-3)


def test_all_weights_one_is_the_plain_encoding(tiny):
    a = comfy("a red circle", tiny)
    b = comfy("(a red circle:1.0)", tiny)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- absent encoders, as SD3ClipModel.encode_token_weights ----------------------------------------


def test_t5_off_leaves_the_clip_rows_alone(tiny):
    tokenizers, encoders = tiny
    full, full_pooled = comfy(RED, tiny)
    context, pooled = encode_comfy(RED, {**tokenizers, "tokenizer_3": None}, {**encoders, "text_encoder_3": None}, "cpu",
                                   torch.float32, layout=layout_of(encoders))
    assert context.shape == (1, 154, T5_WIDTH)
    assert torch.equal(context, full[:, :154]) and torch.equal(pooled, full_pooled)


def test_absent_clips_are_zeros_in_their_place(tiny):
    tokenizers, encoders = tiny
    layout = layout_of(encoders)
    full, full_pooled = comfy("a red circle", tiny)
    context, pooled = encode_comfy("a red circle", tokenizers, {**encoders, "text_encoder": None}, "cpu", torch.float32, layout=layout)
    assert torch.all(context[:, :77, :L_WIDTH] == 0) and torch.all(pooled[:, :L_WIDTH] == 0)
    assert torch.equal(context[:, :, L_WIDTH:], full[:, :, L_WIDTH:]) and torch.equal(pooled[:, L_WIDTH:], full_pooled[:, L_WIDTH:])
    context, pooled = encode_comfy("a red circle", tokenizers, {**encoders, "text_encoder_2": None}, "cpu", torch.float32, layout=layout)
    assert torch.all(context[:, :77, L_WIDTH:] == 0) and torch.all(pooled[:, L_WIDTH:] == 0)
    assert torch.equal(context[:, :, :L_WIDTH], full[:, :, :L_WIDTH])
    context, pooled = encode_comfy("a red circle", tokenizers, {"text_encoder_3": encoders["text_encoder_3"]}, "cpu", torch.float32,
                                   layout=layout)
    assert torch.equal(context, full[:, 77:]) and torch.equal(pooled, torch.zeros(1, L_WIDTH + G_WIDTH))
    context, pooled = encode_comfy("a red circle", {}, {}, "cpu", torch.float32)  # SD3's sizes
    assert torch.equal(context, torch.zeros(1, 77, 4096)) and torch.equal(pooled, torch.zeros(1, 2048))


def test_real_sd3_widths(tmp_path):
    tiny = _models(tmp_path, 768, 1280, 4096, clip_layers=2, t5_layers=1)
    context, pooled = comfy(RED, tiny)
    assert layout_of(tiny[1]) == TextLayout()
    assert context.shape == (1, 154 + 101, 4096) and pooled.shape == (1, 2048)
    assert torch.all(context[:, :154, 2048:] == 0) and not torch.all(context[:, :154, 1280:2048] == 0)


# ---- diffusers' encode_prompt ----------------------------------------------------------------------


def _diffusers_pipe(tiny, with_t5=True):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizers, encoders = tiny
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
                                        pooled_projection_dim=L_WIDTH + G_WIDTH, out_channels=16, pos_embed_max_size=8)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=encoders["text_encoder"], tokenizer=tokenizers["tokenizer"],
        text_encoder_2=encoders["text_encoder_2"], tokenizer_2=tokenizers["tokenizer_2"],
        text_encoder_3=encoders["text_encoder_3"] if with_t5 else None, tokenizer_3=tokenizers["tokenizer_3"] if with_t5 else None)


@pytest.mark.parametrize("prompt,max_sequence_length,with_t5", [
    ("", 256, True), ("a (red:1.5) circle", 256, True), ("red " * 300, 256, True), ("red " * 300, 77, True),
    ("a red circle", 128, False)])
def test_encode_diffusers_equals_diffusers_encode_prompt(tiny, prompt, max_sequence_length, with_t5):
    pipe = _diffusers_pipe(tiny, with_t5)
    tokenizers, encoders = tiny
    if not with_t5:
        encoders = {**encoders, "text_encoder_3": None}
    with torch.no_grad():  # as StableDiffusion3Pipeline.__call__ runs it
        want = pipe.encode_prompt(prompt, None, None, device="cpu", do_classifier_free_guidance=False,
                                  max_sequence_length=max_sequence_length)
    context, pooled = encode_diffusers(prompt, tokenizers, encoders, "cpu", torch.float32, max_sequence_length=max_sequence_length,
                                       layout=layout_of(tiny[1]))
    assert context.shape == (1, 77 + max_sequence_length, T5_WIDTH)
    assert torch.equal(context, want[0]) and torch.equal(pooled, want[2])


# ---- the seam --------------------------------------------------------------------------------------


def test_modes_deterministic_and_dtype(tiny):
    assert set(ENCODINGS) == set(TextMode) and TextMode("comfy") is TextMode.COMFY
    for mode, encode in ENCODINGS.items():
        a = encode("a (red:1.2) circle", *tiny, "cpu", torch.float32)
        b = encode("a (red:1.2) circle", *tiny, "cpu", torch.bfloat16)
        c = encode("a (red:1.2) circle", *tiny, "cpu", torch.float32)
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]), mode
        assert b[0].dtype == b[1].dtype == torch.bfloat16 and torch.equal(b[0], a[0].to(torch.bfloat16)), mode


def test_layout_checks():
    with pytest.raises(ConfigError):
        TextLayout(clip_window=0)
    with pytest.raises(ConfigError):
        TextLayout(clip_l_width=768, clip_g_width=1280, context_width=2000)
    with pytest.raises(ConfigError, match="tokenizer_2"):
        encode_comfy("a", {"tokenizer": None}, {"text_encoder_2": object()}, "cpu", torch.float32, layout=TextLayout())
