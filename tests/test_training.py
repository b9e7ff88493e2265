import hashlib
import json
import tempfile
from pathlib import Path

import pytest
import torch

from sd3fp8.engine.text import TextMode, encode_comfy, encode_diffusers
from sd3fp8.miniature.tiny import build_tiny_pipeline
from sd3fp8.miniature.training import MINI_SPEC, TrainConfig, encode_bank, train_miniature
from sd3fp8.miniature.world import WORLD_WORDS, Caption, ShapeSpec

# the smallest run that exercises every stage (two trainings per test: the determinism check)
SMOKE = TrainConfig(pool=8, vae_steps=1, vae_batch=2, dit_steps=2, dit_batch=2, warmup=1)


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_training_is_deterministic_and_writes_a_loadable_model(tmp_path):
    a = train_miniature(tmp_path / "a", SMOKE, progress=False)
    b = train_miniature(tmp_path / "b", SMOKE, progress=False)
    assert digest(a) == digest(b) and len(digest(a)) == 5  # transformer, vae, three text encoders
    recipe = json.loads((a / "sd3fp8.json").read_text())
    assert recipe["world"] == "shapes-v1" and recipe["training"]["dit_steps"] == SMOKE.dit_steps
    assert recipe["defaults"]["max_sequence_length"] == MINI_SPEC.max_tokens == 28
    assert recipe["training"]["cpu_minutes"] >= 0 and set(recipe["training"]["stages"]) == {"render", "vae", "encode", "mmdit"}
    log = (a / "training_log.csv").read_text().splitlines()
    assert log[0] == "stage,step,loss,lr,mode,seconds,cpu_seconds" and len(log) == 1 + SMOKE.vae_steps + SMOKE.dit_steps
    assert {row.split(",")[4] for row in log[1 + SMOKE.vae_steps:]} <= {"comfy", "diffusers"}

    from sd3fp8 import SD3FP8Pipeline

    result = SD3FP8Pipeline.from_pretrained(a)("a small red circle in the center on a white background", steps=2)
    assert result.images[0].size == (64, 64)


# The longest captions of the world: two shapes, every part stated, positions and background first.
LONGEST = Caption((ShapeSpec("triangle", "purple", "large", (2, 2)), ShapeSpec("triangle", "orange", "small", (0, 0))),
                  "light yellow")
CAPTIONS = ["", LONGEST.text((True, True), True) + ".", LONGEST.text(), "a red circle on a blue background",
            "A Yellow Square on a green background.", "at the top, an orange circle"]


@pytest.fixture(scope="module")
def mini_pipe():
    return build_tiny_pipeline(MINI_SPEC, Path(tempfile.mkdtemp()))


def test_every_world_word_is_one_token_and_captions_fit_both_modes(mini_pipe):
    for tokenizer in (mini_pipe.tokenizer, mini_pipe.tokenizer_2):
        assert all(len(tokenizer.tokenize(w)) == 1 for w in WORLD_WORDS)
        assert len(tokenizer(CAPTIONS[1]).input_ids) <= MINI_SPEC.max_tokens  # one CLIP window, never truncated
    assert all(mini_pipe.tokenizer_3.tokenize(w) == ["\u2581" + w] for w in WORLD_WORDS)
    assert len(mini_pipe.tokenizer_3(CAPTIONS[1]).input_ids) <= MINI_SPEC.max_tokens  # T5's max_sequence_length
    assert mini_pipe.tokenizer_3("A Red Circle").input_ids == mini_pipe.tokenizer_3("a red circle").input_ids
    assert mini_pipe.text_encoder.config.max_position_embeddings == mini_pipe.tokenizer.model_max_length == 28


@pytest.mark.parametrize("mode", list(TextMode))
def test_training_conditions_exactly_as_the_engine_encodes(mini_pipe, mode):
    bank = encode_bank(mini_pipe, CAPTIONS, mode, MINI_SPEC.max_tokens, batch=4)
    encoders = {k: getattr(mini_pipe, k) for k in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    tokenizers = {k: getattr(mini_pipe, k) for k in ("tokenizer", "tokenizer_2", "tokenizer_3")}
    for i, text in enumerate(CAPTIONS):
        if mode is TextMode.COMFY:
            context, pooled = encode_comfy(text, tokenizers, encoders, "cpu", torch.float32)
            assert context.shape == (1, 28 + 77, 64)  # one CLIP window, T5 padded to 77
        else:
            context, pooled = encode_diffusers(text, tokenizers, encoders, "cpu", torch.float32, max_sequence_length=28)
            assert context.shape == (1, 28 + 28, 64)
        torch.testing.assert_close(bank.context[i], context[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bank.pooled[i], pooled[0], atol=1e-5, rtol=1e-5)


def test_both_modes_share_the_clip_tokens(mini_pipe):
    """CLIP-G pads with "!" (id 0) as SD3.5's tokenizer_2 and ComfyUI do: the CLIP rows of both modes agree."""
    comfy = encode_bank(mini_pipe, CAPTIONS, TextMode.COMFY, 28)
    diffusers = encode_bank(mini_pipe, CAPTIONS, TextMode.DIFFUSERS, 28)
    torch.testing.assert_close(comfy.context[:, :28], diffusers.context[:, :28], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(comfy.context[:, 28:56], diffusers.context[:, 28:56], atol=1e-3)  # T5 rows differ
