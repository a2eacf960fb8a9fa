"""Demo scenes and the prompt-adherence scorer: grammar, sampling, the two renderers, and scorer accuracy.

Accuracy bounds sit a little under what was measured (numbers in the comments), so a regression in
the scorer or a change of geometry that hurts it fails here.
"""

import dataclasses
import functools
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from pipelines.demo.scenes import (
    COLOURS, GRID, KINDS, MAX_OFFSET, POSITIONS, SIZE_JITTER, SIZES, Scene, Shape, Split, caption,
    held_out_captions, parse_caption, render, sample_scene, split_of,
)
from pipelines.demo.scorer import ATTRIBUTES, adherence, score


def _scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


@functools.cache
def _rendered(size: int) -> tuple[list[Scene], list[Image.Image]]:
    """300 scenes and their reference renders, shared by the scorer tests (rendering is a third of their cost)."""
    scenes = _scenes(300, seed=4)
    return scenes, [render(s, size) for s in scenes]


def _degrade(image: Image.Image, blur_px: float, noise: float, seed: int) -> np.ndarray:
    """Gaussian blur then Gaussian pixel noise (std in 0-255 units): a stand-in for a small model's output."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur_px)), dtype=np.float32)
    noisy = blurred + np.random.default_rng(seed).normal(0.0, noise, blurred.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _shade(image: Image.Image, seed: int) -> np.ndarray:
    """Add smooth lighting, up to +-32 levels, that varies across the picture as a model's background might."""
    size = image.size[0]
    coarse = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    light = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32) - 128
    return np.clip(np.asarray(image, np.float32) + light / 4, 0, 255).astype(np.uint8)


# --- captions -------------------------------------------------------------------------------------

def test_caption_reads_as_english():
    scene = Scene((Shape("circle", "red", "small", "top left"), Shape("star", "yellow", "large", "bottom right")),
                  "blue")
    assert caption(scene) == ("a small red circle at the top left and a large yellow star at the bottom right"
                              " on a blue background")
    assert caption(Scene((Shape("square", "black", "large", "center"),), "white")) == \
        "a large black square in the center on a white background"


@pytest.mark.parametrize("rng", [random.Random(0), np.random.default_rng(0)], ids=["random", "numpy"])
def test_parse_inverts_caption_for_sampled_scenes(rng):
    for _ in range(2000):
        scene = sample_scene(rng)
        text = caption(scene)
        parsed = parse_caption(text)
        assert parsed == scene
        assert parse_caption("  " + text.upper().replace(" ", "   ") + " ") == scene


@pytest.mark.parametrize("text, message", [
    ("a small red circle at the top left", "must end with 'on a <colour> background'"),
    ("a small red circle at the top left on a teal background", "unknown background colour 'teal'"),
    ("a huge red circle at the top left on a blue background", "unknown size 'huge'"),
    ("a small magenta circle at the top left on a blue background", "unknown colour 'magenta'"),
    ("a small red hexagon at the top left on a blue background", "unknown kind 'hexagon'"),
    ("a small red circle in the middle on a blue background", "unknown position 'in the middle'"),
    ("red circle at the top left on a blue background", "must read 'a <size> <colour> <kind> <position>'"),
    ("a small red circle at the top and a small red star at the bottom and a large red square on the left"
     " on a blue background", "names 3 shapes"),
    ("a small red circle at the top and a large blue star at the top on a white background", "different positions"),
    ("a small red circle at the top on a red background", "invisible"),
])
def test_parse_rejects_text_outside_the_grammar_and_says_why(text, message):
    with pytest.raises(ValueError) as error:
        parse_caption(text)
    assert message in str(error.value)


def test_parse_errors_list_the_valid_words():
    with pytest.raises(ValueError) as error:
        parse_caption("a medium red circle at the top on a blue background")
    assert "expected one of: small, large" in str(error.value)


# --- sampling -------------------------------------------------------------------------------------

def _fingerprint(scenes: list[Scene]) -> list:
    """Caption plus jitter: Scene equality ignores jitter, determinism must not."""
    return [(caption(scene), [shape.jitter for shape in scene.shapes]) for scene in scenes]


@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng], ids=["random", "numpy"])
def test_sampling_is_deterministic_by_seed(make_rng):
    def draw(seed: int) -> list:
        rng = make_rng(seed)
        return _fingerprint([sample_scene(rng) for _ in range(50)])

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_sampler_covers_the_vocabulary_and_keeps_shapes_inside_their_cells():
    scenes = _scenes(3000, seed=1)
    shapes = [s for scene in scenes for s in scene.shapes]
    assert {s.kind for s in shapes} == set(KINDS)
    assert {s.colour for s in shapes} == set(COLOURS) == {scene.background for scene in scenes}
    assert {s.size for s in shapes} == set(SIZES)
    assert {s.position for s in shapes} == set(POSITIONS)
    assert {len(scene.shapes) for scene in scenes} == {1, 2}
    assert {len(s.shapes) for s in [sample_scene(random.Random(i), max_shapes=1) for i in range(50)]} == {1}
    for s in shapes:
        column, row = POSITIONS[s.position]
        (cx, cy), half = s.centre, s.extent / 2
        assert column / GRID < cx - half and cx + half < (column + 1) / GRID, s
        assert row / GRID < cy - half and cy + half < (row + 1) / GRID, s
    # Jitter is used, and small and large never meet.
    extents = {size: [s.extent for s in shapes if s.size == size] for size in SIZES}
    assert max(extents["small"]) < min(extents["large"])
    assert max(abs(s.jitter.dx) for s in shapes) > MAX_OFFSET / 2
    assert max(abs(s.extent / SIZES[s.size] - 1) for s in shapes) > SIZE_JITTER / 2


def test_held_out_captions_are_fixed_distinct_and_never_sampled_for_training():
    held_out = held_out_captions(200, seed=0)
    assert held_out == held_out_captions(200, seed=0)
    assert held_out[:20] != held_out_captions(20, seed=1)
    assert len(set(held_out)) == 200
    assert all(split_of(parse_caption(text)) is Split.HELD_OUT for text in held_out)
    assert {len(parse_caption(text).shapes) for text in held_out} == {1, 2}
    # The split is by a hash of the scene's content, so training with the same seed (or any) cannot hit it.
    for rng in (random.Random(0), np.random.default_rng(0)):
        training = {caption(sample_scene(rng)) for _ in range(2000)}
        assert not training & set(held_out)
        assert all(split_of(parse_caption(text)) is Split.TRAIN for text in training)


def test_split_holds_out_about_five_percent_and_ignores_shape_order():
    one_shape_scenes = [Scene((Shape(k, c, z, p),), b) for k in KINDS for c in COLOURS for z in SIZES
                        for p in POSITIONS for b in COLOURS if b != c]
    share = np.mean([split_of(s) is Split.HELD_OUT for s in one_shape_scenes])
    assert 0.03 < share < 0.07, share  # measured 0.05 over all 6480 one-shape scenes
    rng = random.Random(2)
    held_out = [sample_scene(rng, max_shapes=2, split=Split.HELD_OUT) for _ in range(100)]
    assert all(split_of(s) is Split.HELD_OUT for s in held_out)
    pairs = [s for s in held_out if len(s.shapes) == 2]
    assert pairs and all(split_of(Scene(s.shapes[::-1], s.background)) is Split.HELD_OUT for s in pairs)


# --- rendering ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [64, 128])
def test_render_and_the_training_renderer_draw_the_same_picture(size):
    from pipelines.demo.train import render_arrays, scene_arrays

    scenes = _scenes(30, seed=3)
    batch = render_arrays({k: torch.from_numpy(v) for k, v in scene_arrays(scenes).items()}, size)
    assert batch.shape == (30, 3, size, size) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    reference = torch.stack([torch.from_numpy(np.array(render(s, size))).permute(2, 0, 1) for s in scenes])
    difference = (batch - (reference.float() / 127.5 - 1.0)).abs() / 2  # in units of the 0-1 range
    # Measured: mean 0.0005 (64 px) / 0.0003 (128 px); 0.26% / 0.15% of pixels differ by more than 0.1
    # and none by more than 0.24, all on edges and tips, where PIL's 8x8 supersampling and the
    # one-pixel distance ramp estimate coverage differently.
    assert difference.mean() < 0.002
    assert (difference.amax(1) > 0.1).float().mean() < 0.01
    assert difference.max() < 0.5


def test_render_puts_shape_colour_at_the_centre_and_background_elsewhere():
    scene = Scene((Shape("square", "red", "large", "top left"), Shape("circle", "white", "small", "bottom")), "blue")
    pixels = np.asarray(render(scene, 96)).astype(int)
    assert tuple(pixels[16, 16]) == COLOURS["red"]  # centre of the top-left cell
    assert tuple(pixels[80, 48]) == COLOURS["white"]  # centre of the bottom cell
    assert tuple(pixels[48, 48]) == COLOURS["blue"]  # empty centre cell
    assert tuple(pixels[0, 95]) == COLOURS["blue"]


# --- scorer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [64, 128])
def test_scorer_accepts_every_clean_render(size):
    scenes, images = _rendered(size)
    report = adherence(images, [caption(s) for s in scenes])
    # Measured 1.0 for all-correct and every attribute over these 300 scenes (and over other scenes at
    # every size from 32 to 256 px).
    assert report["n"] == 300
    assert report["all_correct_rate"] >= 0.99
    assert set(report["per_attribute"]) == set(ATTRIBUTES)
    assert min(report["per_attribute"].values()) >= 0.99


@pytest.mark.parametrize("size", [64, 128])
def test_scorer_survives_blur_and_noise(size):
    scenes, images = _rendered(size)
    mild = [_degrade(image, size / 80, 12, i) for i, image in enumerate(images[:100])]
    # Measured all-correct 1.0 at 64 and 128 px over 300 scenes (0.997 at 48 px) with blur sigma
    # size/80 px and noise std 12.
    assert adherence(mild, scenes[:100])["all_correct_rate"] >= 0.97
    heavy = [_degrade(image, size / 50, 20, i) for i, image in enumerate(images[:150])]
    report = adherence(heavy, scenes[:150])
    # Measured with sigma size/50 px and noise std 20: all-correct 0.89 (64 px) and 0.93 (128 px), as
    # small stars blur into circles (kind 0.93 / 0.95); count 1.0 and every other attribute >= 0.995.
    # Letting a blended rim colour keep its own blob drops count to 0.98.
    assert report["all_correct_rate"] >= 0.85
    assert report["per_attribute"]["kind"] >= 0.9
    assert report["per_attribute"]["count"] >= 0.99
    assert min(v for k, v in report["per_attribute"].items() if k != "kind") >= 0.98


def test_scorer_survives_half_resolution():
    scenes, images = _rendered(64)
    soft = [image.resize((32, 32), Image.Resampling.BILINEAR).resize((64, 64), Image.Resampling.BILINEAR)
            for image in images[:100]]
    # Measured 1.0 over 150 scenes. If every pixel of a region voted on its colour, not only the
    # strongest 30%, the blended rim would outvote small shapes: 0.91.
    assert adherence(soft, scenes[:100])["all_correct_rate"] >= 0.97


def test_shaded_background_makes_no_phantom_shapes():
    scenes, images = _rendered(64)
    shaded = [_shade(image, i) for i, image in enumerate(images[:80])]
    # Measured 1.0 here and over 200 other scenes at 64 and 128 px. Without the edge-contrast test it was
    # 0.95 here (0.92 over the 200), failing "count" where the shading carries a background patch across
    # into another colour's name.
    assert adherence(shaded, scenes[:80])["all_correct_rate"] >= 0.97


def _other(options, *excluded):
    return next(o for o in options if o not in excluded)


def _change(scene: Scene, attribute: str) -> Scene:
    """The same scene with one attribute of its first shape (or its background) changed."""
    first, rest = scene.shapes[0], scene.shapes[1:]
    used_colours = {s.colour for s in scene.shapes}
    if attribute == "background":
        return Scene(scene.shapes, _other(COLOURS, scene.background, *used_colours))
    if attribute == "colour":
        changed = dataclasses.replace(first, colour=_other(COLOURS, first.colour, scene.background))
    elif attribute == "kind":
        changed = dataclasses.replace(first, kind=_other(KINDS, first.kind))
    elif attribute == "size":
        changed = dataclasses.replace(first, size=_other(SIZES, first.size))
    else:  # position: move to a cell where nothing is drawn
        changed = dataclasses.replace(first, position=_other(POSITIONS, *(s.position for s in scene.shapes)))
    return Scene((changed, *rest), scene.background)


@pytest.mark.parametrize("attribute", ["background", "colour", "kind", "size", "position"])
def test_scorer_rejects_a_caption_with_one_attribute_wrong(attribute):
    scenes, images = _rendered(64)
    key = "background" if attribute == "background" else f"shape1.{attribute}"
    failed_target, failed_others, accepted = 0, 0, 0
    for scene, image in zip(scenes[:60], images):
        result = score(image, _change(scene, attribute))
        failed_target += not result.checks[key]
        failed_others += not all(ok for k, ok in result.checks.items() if k != key)
        accepted += result.all_correct
    # Measured: the changed attribute fails in 60/60 and every other check still passes in 60/60,
    # so a failure points at the attribute that is actually wrong.
    assert accepted == 0
    assert failed_target >= 59
    assert failed_others <= 1


def test_scorer_rejects_captions_of_other_scenes():
    scenes, images = _rendered(64)
    report = adherence(images[:60], scenes[1:61])
    assert report["all_correct_rate"] == 0.0
    assert report["mean_fraction"] < 0.4  # measured 0.16


def test_uniform_noise_scores_low():
    rng = np.random.default_rng(8)
    scenes = _scenes(10, seed=8)
    results = [score(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), s) for s in scenes]
    # Measured mean 0.03, worst 0.17 (a background guess that happened to match): blobs of noise fit
    # no kind well (soft IoU ~0.3) and are dropped, so no shape is found.
    assert not any(r.all_correct for r in results)
    assert np.mean([r.fraction for r in results]) < 0.1
    assert max(r.fraction for r in results) <= 1 / 3


def test_blank_background_finds_no_shapes():
    scene = _scenes(1, seed=9)[0]
    blank = Image.new("RGB", (64, 64), COLOURS[scene.background])
    result = score(blank, scene)
    assert result.blobs == ()
    assert result.checks["background"] and not result.checks["count"]
    assert result.fraction == 1 / len(result.checks)


def test_score_reports_what_it_found_and_accepts_any_image_form():
    scene = Scene((Shape("triangle", "green", "large", "right"), Shape("diamond", "pink", "small", "top left")),
                  "black")
    image = render(scene, 100)  # not a multiple of the grid
    from_pil, from_array = score(image, caption(scene)), score(np.asarray(image), scene)
    assert from_pil == from_array and from_pil.all_correct and from_pil.fraction == 1.0
    found = {(b.kind, b.colour, b.size, b.position) for b in from_pil.blobs}
    assert found == {("triangle", "green", "large", "right"), ("diamond", "pink", "small", "top left")}
    with pytest.raises(ValueError, match="uint8"):
        score(np.asarray(image).astype(np.float32), scene)
    with pytest.raises(ValueError, match="unknown kind"):
        score(image, "a small green hexagon on the right on a black background")


def test_adherence_checks_its_inputs():
    with pytest.raises(ValueError, match="as many images as captions"):
        adherence([np.zeros((64, 64, 3), np.uint8)], [])
