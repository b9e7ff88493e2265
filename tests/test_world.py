import random

import numpy as np
import pytest

from sd3fp8.evalkit.metrics import frechet_distance, psnr, ssim
from sd3fp8.miniature.judge import adherence, analyze, features
from sd3fp8.miniature.world import (
    BACKGROUNDS,
    COLORS,
    Scene,
    Shape,
    heldout_prompts,
    heldout_scenes,
    is_heldout,
    parse_caption,
    random_scene,
    render,
    sample,
    training_scene,
)


def test_world_is_deterministic():
    a_img, a_cap = sample(17)
    b_img, b_cap = sample(17)
    assert a_cap == b_cap and np.array_equal(a_img, b_img)
    c_img, _ = sample(18)
    assert a_img.shape == (64, 64, 3) and a_img.dtype == np.uint8
    assert not np.array_equal(a_img, c_img)


def test_captions_round_trip():
    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng)
        assert parse_caption(scene.caption()) == scene
    assert parse_caption("A small red circle in the top left on a white background ") == Scene(
        (Shape("circle", "red", "small", (0, 0)),), "white"
    )


@pytest.mark.parametrize("text", ["a cat on a mat", "a small red hexagon in the top left on a white background",
                                  "a small red circle in the top left on a pink background", ""])
def test_parse_rejects_other_text(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_training_never_sees_heldout_scenes():
    held = {s.caption() for s in heldout_scenes()}
    assert 50 < len(held) < 150  # ~10 % of the 972 single-shape captions
    rng = random.Random(1)
    seen = {training_scene(rng).caption() for _ in range(3000)}
    assert not seen & held
    assert heldout_prompts(5) == heldout_prompts(5) and len(set(heldout_prompts(5))) == 5
    assert all(is_heldout(parse_caption(p)) for p in heldout_prompts(10))


def test_judge_scores_world_images_high_and_mismatches_low():
    rng = random.Random(2)
    own, mismatched = [], []
    for i in range(150):
        image, caption = sample(i, base_seed=3)
        own.append(adherence(image, caption))
        mismatched.append(adherence(image, random_scene(rng).caption()))
    assert np.mean(own) >= 0.95 and min(own) >= 0.8
    assert np.mean(mismatched) < 0.5


@pytest.mark.parametrize("kind", ["circle", "square", "triangle"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_judge_reads_every_shape_and_size(kind, size):
    scene = Scene((Shape(kind, "blue", size, (2, 1)),), "gray")
    blob = analyze(np.asarray(render(scene, seed=5))).blobs[0]
    assert (blob.kind, blob.size, blob.cell, blob.color) == (kind, size, (2, 1), "blue")


def test_judge_attribute_errors_lower_the_score():
    scene = Scene((Shape("circle", "red", "large", (0, 0)),), "white")
    image = np.asarray(render(scene))
    assert adherence(image, scene.caption()) == 1.0
    wrong_colour = "a large green circle in the top left on a white background"
    wrong_place = "a large red circle in the bottom right on a white background"
    assert adherence(image, wrong_colour) == pytest.approx(5 / 6)
    assert adherence(image, wrong_place) == pytest.approx(5 / 6)
    blank = np.full((64, 64, 3), BACKGROUNDS["white"], dtype=np.uint8)
    assert adherence(blank, scene.caption()) == pytest.approx(1 / 6)  # only the background is right


def test_judge_counts_two_shapes():
    scene = Scene((Shape("square", "yellow", "small", (0, 0)), Shape("triangle", "purple", "large", (2, 2))), "black")
    image = np.asarray(render(scene))
    assert adherence(image, scene.caption()) == 1.0
    one = "a small yellow square in the top left on a black background"
    assert adherence(image, one) == pytest.approx(5 / 6)  # the count is wrong


def test_features_and_frechet_distance():
    world = np.stack([features(sample(i)[0]) for i in range(60)])
    other = np.stack([features(sample(i)[0]) for i in range(60, 120)])
    blank = np.stack([features(np.full((64, 64, 3), c, np.uint8)) for c in list(COLORS.values()) * 10])
    assert world.shape == (60, 15)
    assert frechet_distance(world, world) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(world, other) < frechet_distance(world, blank) / 5


def test_frechet_distance_matches_the_closed_form_in_1d():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (200_000, 1))
    b = rng.normal(1, 2, (200_000, 1))
    # (mu_a - mu_b)^2 + s_a^2 + s_b^2 - 2 s_a s_b = 1 + 1 + 4 - 4 = 2
    assert frechet_distance(a, b) == pytest.approx(2.0, rel=0.02)


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    b = a.astype(np.float64) + 5  # MSE 25 -> 10 log10(255^2 / 25) = 34.15 dB
    assert psnr(a, b) == pytest.approx(34.151, abs=1e-3)
    noisy = np.clip(a + rng.normal(0, 40, a.shape), 0, 255)
    assert ssim(a, noisy) < ssim(a, np.clip(a + rng.normal(0, 5, a.shape), 0, 255)) < 1.0
