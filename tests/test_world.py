import random

import numpy as np
import pytest

from sd3fp8.evalkit.metrics import frechet_distance, psnr, ssim
from sd3fp8.miniature.judge import adherence, analyze, features
from sd3fp8.miniature.world import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    Caption,
    Scene,
    Shape,
    ShapeSpec,
    describe,
    example,
    family,
    fits,
    heldout_captions,
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
    image, captions = example(17, captions=3)
    assert np.array_equal(image, a_img) and captions[0] == a_cap and len(captions) == 3


def _states_truly(caption: Caption, scene: Scene) -> bool:
    if len(caption.shapes) != len(scene.shapes):
        return False
    for spec, shape in zip(caption.shapes, scene.shapes):
        if (spec.kind, spec.color) != (shape.kind, shape.color) or spec.size not in (None, shape.size) \
                or spec.cell not in (None, shape.cell):
            return False
    return caption.background in (None, scene.background, family(scene.background))


def test_captions_round_trip_and_state_only_the_truth():
    rng = random.Random(0)
    partial = 0
    for _ in range(400):
        scene = random_scene(rng)
        assert parse_caption(scene.caption()) == scene.statement() and scene.statement().full
        text = describe(scene, rng)
        caption = parse_caption(text)
        assert _states_truly(caption, scene), text
        assert parse_caption(caption.text()) == caption
        partial += not caption.full
    assert 200 < partial < 400  # most training captions leave something out, some state everything
    assert parse_caption("A small red circle in the top left on a white background. ") == Caption(
        (ShapeSpec("circle", "red", "small", (0, 0)),), "white"
    )


def test_word_orders_state_the_same():
    same = ["a red circle at the top", "at the top, a red circle"]
    assert parse_caption(same[0]) == parse_caption(same[1]) == Caption((ShapeSpec("circle", "red", None, (1, 0)),))
    on_white = ["a large red circle on the left on a white background", "on a white background, a large red circle on the left",
                "on a white background, on the left, a large red circle"]
    assert len({parse_caption(t) for t in on_white}) == 1
    assert parse_caption("an orange square and a blue circle in the center on a dark red background") == Caption(
        (ShapeSpec("square", "orange"), ShapeSpec("circle", "blue", None, (1, 1))), "dark red")
    assert parse_caption("a red circle on a blue background") == Caption((ShapeSpec("circle", "red"),), "blue")
    assert parse_caption("on an orange background, a blue triangle").background == "orange"
    caption = Caption((ShapeSpec("triangle", "orange", "small", (2, 2)), ShapeSpec("circle", "blue", cell=(0, 0))), "light orange")
    for first in ((False, False), (True, False), (False, True), (True, True)):
        for bg_first in (False, True):
            assert parse_caption(caption.text(first, bg_first)) == caption


@pytest.mark.parametrize("text", ["a cat on a mat", "a small red hexagon in the top left on a white background",
                                  "a small red circle in the top left on a pink background", "",
                                  "a red circle and a blue square and a green triangle", "a red circle on a light background",
                                  "red circle", "at the top a red circle"])
def test_parse_rejects_other_text(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_backgrounds_are_coloured_and_never_a_shapes_colour():
    assert len(BACKGROUNDS) == 15 and {"white", "black", "gray"} <= set(BACKGROUNDS)
    assert all(f"{tone} {c}" in BACKGROUNDS for c in COLORS for tone in ("light", "dark"))
    rng = random.Random(4)
    seen = set()
    for _ in range(2000):
        scene = random_scene(rng)
        assert all(fits(s.color, scene.background) for s in scene.shapes)
        seen.add(scene.background)
    assert seen == set(BACKGROUNDS)
    # far enough apart for the judge: a shape from every background it may lie on, backgrounds from each other
    for color, rgb in COLORS.items():
        for name, bg in BACKGROUNDS.items():
            if fits(color, name):
                assert np.linalg.norm(np.subtract(rgb, bg)) > 80, (color, name)
    names = list(BACKGROUNDS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.linalg.norm(np.subtract(BACKGROUNDS[a], BACKGROUNDS[b])) > 50, (a, b)


def test_training_never_sees_heldout_captions():
    full, partial = heldout_captions("full"), heldout_captions("partial")
    assert 300 < len(full) < 550 and 450 < len(partial) < 800  # ~10 % of 4212 full, 6048 partial
    assert all(c.full for c in full) and not any(c.full for c in partial)
    assert {s.caption() for s in heldout_scenes()} == {c.text() for c in full}
    held = {c.key() for c in full + partial}
    seen_scenes, seen_captions = set(), set()
    for i in range(1500):
        image, captions = example(i, base_seed=1, captions=2)
        seen_captions |= {parse_caption(t).key() for t in captions}
    rng = random.Random(1)
    seen_scenes = {training_scene(rng).caption() for _ in range(3000)}
    assert not seen_captions & held and not seen_scenes & {c.key() for c in full}
    for kind in ("full", "partial"):
        prompts = heldout_prompts(8, kind=kind)
        assert prompts == heldout_prompts(8, kind=kind) and len(set(prompts)) == 8
        assert all(is_heldout(parse_caption(p)) and parse_caption(p).full == (kind == "full") for p in prompts)
    # every word order of a held-out caption is held out
    caption = full[0]
    assert all(is_heldout(parse_caption(caption.text(first, bg))) for first in (False, True) for bg in (False, True))
    # held-out prompts come in several word orders
    assert any(p.startswith("on a") for p in heldout_prompts(kind="full")) and any(", a" in p for p in heldout_prompts(kind="full"))


def test_judge_scores_world_images_high_and_mismatches_low():
    rng = random.Random(2)
    own, full, mismatched, mismatched_partial = [], [], [], []
    for i in range(150):
        image, caption = sample(i, base_seed=3)
        own.append(adherence(image, caption))
        mismatched.append(adherence(image, random_scene(rng).caption()))
        mismatched_partial.append(adherence(image, describe(random_scene(rng), rng)))
    for i in range(60):
        scene = random_scene(rng)
        full.append(adherence(np.asarray(render(scene, seed=i)), scene.caption()))
    assert np.mean(own) >= 0.95 and min(own) >= 0.8
    assert np.mean(full) >= 0.95 and min(full) >= 0.8
    assert np.mean(mismatched) < 0.45 and np.mean(mismatched_partial) < 0.5


def test_partial_captions_render_and_judge_right():
    scores = []
    for i, caption in enumerate(heldout_captions("partial")[:80]):
        scores.append(adherence(np.asarray(render(caption, seed=i)), caption.text()))
    assert np.mean(scores) >= 0.95


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("size", ["small", "large"])
def test_judge_reads_every_shape_and_size(kind, size):
    scene = Scene((Shape(kind, "blue", size, (2, 1)),), "gray")
    blob = analyze(np.asarray(render(scene, seed=5))).blobs[0]
    assert (blob.kind, blob.size, blob.cell, blob.color) == (kind, size, (2, 1), "blue")


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_judge_reads_every_background_and_the_shapes_on_it(background):
    for i, color in enumerate(c for c in COLORS if fits(c, background)):
        scene = Scene((Shape(SHAPES[i % 3], color, "small" if i % 2 else "large", (i % 3, 2 - i % 3)),), background)
        analysis = analyze(np.asarray(render(scene, seed=i)))
        assert analysis.background == background
        blob, = analysis.blobs
        assert (blob.kind, blob.color, blob.size, blob.cell) == (scene.shapes[0].kind, color, scene.shapes[0].size,
                                                                  scene.shapes[0].cell), (background, color)


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


def test_judge_checks_only_what_a_partial_caption_states():
    scene = Scene((Shape("circle", "red", "large", (0, 0)),), "light blue")
    image = np.asarray(render(scene))
    for right in ["a red circle", "a red circle on a blue background", "on a light blue background, a large red circle",
                  "in the top left, a red circle", "a large red circle"]:
        assert adherence(image, right) == 1.0, right
    assert adherence(image, "a small red circle") == pytest.approx(3 / 4)  # kind, colour, count; not the size
    assert adherence(image, "a red circle on a dark blue background") == pytest.approx(3 / 4)  # the tone is stated: wrong
    assert adherence(image, "a red circle on a green background") == pytest.approx(3 / 4)
    assert adherence(image, "a green square at the bottom") == pytest.approx(1 / 4)  # only the count
    blank = np.full((64, 64, 3), BACKGROUNDS["dark green"], dtype=np.uint8)
    assert adherence(blank, "a red circle on a green background") == pytest.approx(1 / 4)  # only the background


def test_judge_counts_two_shapes():
    scene = Scene((Shape("square", "yellow", "small", (0, 0)), Shape("triangle", "purple", "large", (2, 2))), "black")
    image = np.asarray(render(scene))
    assert adherence(image, scene.caption()) == 1.0
    one = "a small yellow square in the top left on a black background"
    assert adherence(image, one) == pytest.approx(5 / 6)  # the count is wrong
    assert adherence(image, "a yellow square and a purple triangle") == 1.0
    assert adherence(image, "in the bottom right, a purple triangle and a yellow square on a black background") == 1.0


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
