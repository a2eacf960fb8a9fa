"""Synthetic scenes for the embedded demo models: vocabulary, captions, and two renderers.

A scene is one or two flat-coloured shapes on a plain background, described by a caption such as
"a small red circle at the top left and a large blue star in the center on a white background".
The grammar is closed, so `parse_caption` inverts `caption` exactly and `scorer.py` can check any
image against any caption.

Layout: the image is a 3x3 grid and each position names one cell. A shape is centred in its cell
(plus a small jitter) and its extent (the longer side of its bounding box) is a fixed fraction of
the image side, so a shape never leaves its cell and two shapes never touch:
largest half-extent + offset = 0.1325 + 0.015 leaves 0.019 of the image side to every cell border.

Geometry has one definition, `POLYGONS` plus the circle: `render` draws those polygons with PIL,
training (`train.render_arrays`) rasterises the same outlines from signed distances (`shape_distance`)
in torch, and the scorer synthesises its templates from `shape_distance` in numpy.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star", "diamond")

# Nine colours at least 47 CIE76 units apart in CIELAB (closest pairs: red/orange 47,
# blue/purple 48, orange/yellow 49), so a blurred or noisy pixel still lands on the right name.
COLOURS = MappingProxyType({
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (250, 225, 30),
    "green": (30, 170, 50),
    "blue": (40, 110, 230),
    "purple": (160, 40, 200),
    "pink": (250, 130, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
})

# Nominal extent (longer bounding-box side) as a fraction of the image side. Jitter keeps small
# within 0.146-0.164 and large within 0.235-0.265, so the scorer's 0.2 threshold has room on both sides.
SIZES = MappingProxyType({"small": 0.155, "large": 0.25})
SIZE_JITTER = 0.06  # relative: extent = nominal * (1 + grow * SIZE_JITTER)
MAX_OFFSET = 0.015  # position jitter per axis, as a fraction of the image side

GRID = 3
# (column, row) of each position's cell, and the words the caption uses for it.
POSITIONS = MappingProxyType({
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
})
POSITION_PHRASES = MappingProxyType({
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
})
MAX_SHAPES = 2


def _star() -> tuple[tuple[float, float], ...]:
    """Five points, tip up; an inner radius 0.48 of the outer keeps the arms thick enough for 64 px."""
    radii = [1.0, 0.48] * 5
    angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    return _fit_unit_box([(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)])


def _fit_unit_box(vertices: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Scale and shift so the bounding box is centred on the origin with its longer side 1."""
    xs, ys = [x for x, _ in vertices], [y for _, y in vertices]
    scale = max(max(xs) - min(xs), max(ys) - min(ys))
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return tuple(((x - cx) / scale, (y - cy) / scale) for x, y in vertices)


# Outlines in shape-local units: x right, y down, bounding box centred on 0 with longer side 1.
# The circle (radius 0.5) is the one kind drawn from its own formula.
POLYGONS = MappingProxyType({
    "square": ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)),
    "triangle": _fit_unit_box(((0.0, -1.0), (math.cos(math.pi / 6), 0.5), (-math.cos(math.pi / 6), 0.5))),
    "star": _star(),
    "diamond": ((0.0, -0.5), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0)),
})


class Split(enum.Enum):
    """Which part of the caption space a scene belongs to; see `split_of`."""

    TRAIN = "train"
    HELD_OUT = "held_out"


HELD_OUT_PERCENT = 5
_HELD_OUT_STREAM = 0x5EED_0E7A  # keeps held_out_captions(seed=s) apart from a training rng seeded with s


@dataclass(frozen=True)
class Jitter:
    """How one drawing of a shape departs from its nominal place and size.

    Captions cannot carry jitter, so it is excluded from equality: two scenes that differ only in
    jitter have the same caption and compare equal.
    """

    dx: float = 0.0  # fraction of the image side, within +-MAX_OFFSET
    dy: float = 0.0
    grow: float = 0.0  # -1..1, scales the extent by up to +-SIZE_JITTER

    def __post_init__(self) -> None:
        if max(abs(self.dx), abs(self.dy)) > MAX_OFFSET or abs(self.grow) > 1.0:
            raise ValueError(f"jitter {self} out of range: |dx|, |dy| <= {MAX_OFFSET} and |grow| <= 1")


@dataclass(frozen=True)
class Shape:
    """One shape: the four words its caption gives it, plus how this drawing of it is jittered."""

    kind: str
    colour: str
    size: str
    position: str
    jitter: Jitter = field(default=Jitter(), compare=False)

    def __post_init__(self) -> None:
        for name, value, allowed in (("kind", self.kind, KINDS), ("colour", self.colour, COLOURS),
                                     ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(allowed)}")

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the bounding box in unit image coordinates (x right, y down)."""
        column, row = POSITIONS[self.position]
        return (column + 0.5) / GRID + self.jitter.dx, (row + 0.5) / GRID + self.jitter.dy

    @property
    def extent(self) -> float:
        """Longer side of the bounding box as a fraction of the image side."""
        return SIZES[self.size] * (1.0 + self.jitter.grow * SIZE_JITTER)


@dataclass(frozen=True)
class Scene:
    """One or two shapes at distinct positions on a plain background; checked on construction."""

    shapes: tuple[Shape, ...]
    background: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))
        if self.background not in COLOURS:
            raise ValueError(f"unknown background colour {self.background!r}; "
                             f"expected one of: {', '.join(COLOURS)}")
        if not 1 <= len(self.shapes) <= MAX_SHAPES:
            raise ValueError(f"a scene has 1 to {MAX_SHAPES} shapes, got {len(self.shapes)}")
        positions = [s.position for s in self.shapes]
        if len(set(positions)) != len(positions):
            raise ValueError(f"shapes must be at different positions, got {positions}")
        for s in self.shapes:
            if s.colour == self.background:
                raise ValueError(f"a {s.colour} {s.kind} would be invisible on a {self.background} background")


# --- captions -----------------------------------------------------------------------------------

def _shape_phrase(shape: Shape) -> str:
    return f"a {shape.size} {shape.colour} {shape.kind} {POSITION_PHRASES[shape.position]}"


def caption(scene: Scene) -> str:
    shapes = " and ".join(_shape_phrase(s) for s in scene.shapes)
    return f"{shapes} on a {scene.background} background"


_POSITION_BY_PHRASE = MappingProxyType({phrase: name for name, phrase in POSITION_PHRASES.items()})


def parse_caption(text: str) -> Scene:
    """Inverse of `caption` (case and runs of spaces are ignored); ValueError says what is wrong."""
    normal = " ".join(text.lower().split())
    body, sep, tail = normal.rpartition(" on a ")
    if not sep or not tail.endswith(" background") or len(tail.split()) != 2:
        raise ValueError(f"caption {text!r} must end with 'on a <colour> background'")
    background = tail.split()[0]
    if background not in COLOURS:
        raise ValueError(f"unknown background colour {background!r} in {text!r}; "
                         f"expected one of: {', '.join(COLOURS)}")
    parts = body.split(" and ")
    if not 1 <= len(parts) <= MAX_SHAPES:
        raise ValueError(f"caption {text!r} names {len(parts)} shapes; expected 1 to {MAX_SHAPES} joined by 'and'")
    return Scene(tuple(_parse_shape(part, text) for part in parts), background)


def _parse_shape(part: str, text: str) -> Shape:
    words = part.split()
    if len(words) < 5 or words[0] != "a":
        raise ValueError(f"shape phrase {part!r} in {text!r} must read 'a <size> <colour> <kind> <position>'")
    _, size, colour, kind, *rest = words
    for name, value, allowed in (("size", size, SIZES), ("colour", colour, COLOURS), ("kind", kind, KINDS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r} in {text!r}; expected one of: {', '.join(allowed)}")
    phrase = " ".join(rest)
    if phrase not in _POSITION_BY_PHRASE:
        raise ValueError(f"unknown position {phrase!r} in {text!r}; "
                         f"expected one of: {', '.join(_POSITION_BY_PHRASE)}")
    return Shape(kind, colour, size, _POSITION_BY_PHRASE[phrase])


_ARTICLES = ("a", "an", "the")
_DEFAULT_SIZE = "large"
_DEFAULT_POSITIONS = (("center",), ("left", "right"))  # by the number of shapes
_DEFAULT_BACKGROUNDS = ("white", "black")
_SYNONYMS = MappingProxyType({"middle": "center", "centre": "center", "big": "large"})


def complete_caption(text: str) -> str | None:
    """The caption a looser description means, with what it leaves out filled in, or None.

    The demo models learned one sentence form and draw noise for any other: "a red circle on a blue background"
    (no size, no position) came out as a green field from demo-flux on 2026-12-07, while the same words with
    "large" and "in the center" drew the circle. Missing sizes become "large", positions the centre (one shape) or
    left and right (two), the background white (black behind a white shape); "an", "the", commas between
    shapes, a final full stop and "middle", "centre", "big" are accepted. None when `text` is already a caption
    or names anything outside the grammar.
    """
    words = text.lower().replace(",", " , ").rstrip(" .").split()
    try:
        parse_caption(" ".join(words))
        return None
    except ValueError:
        pass
    words = [_SYNONYMS.get(w, w) for w in words]
    background = None
    if len(words) >= 3 and words[-1] == "background" and words[-2] in COLOURS:
        background = words[-2]
        words = words[:-2]
        while words and words[-1] in _ARTICLES:
            words.pop()
        if not words or words.pop() != "on":
            return None
    parts = [part.split() for part in re.split(r"\band\b|,", " ".join(words))]
    parts = [part for part in parts if part]
    if not 1 <= len(parts) <= MAX_SHAPES:
        return None
    loose = [_loose_shape(part) for part in parts]
    if any(shape is None for shape in loose):
        return None
    taken = {position for *_, position in loose if position}
    free = iter(p for p in _DEFAULT_POSITIONS[len(loose) - 1] + tuple(POSITIONS) if p not in taken)
    shapes = tuple(Shape(kind, colour, size or _DEFAULT_SIZE, position or next(free))
                   for size, colour, kind, position in loose)
    colours = {s.colour for s in shapes}
    background = background or next(c for c in _DEFAULT_BACKGROUNDS + tuple(COLOURS) if c not in colours)
    try:
        return caption(Scene(shapes, background))
    except ValueError:  # two shapes at one position, or a shape the colour of its background
        return None


def _loose_shape(words: list[str]) -> tuple[str | None, str, str, str | None] | None:
    """(size or None, colour, kind, position or None) of "[a] [size] colour kind [position phrase]", or None."""
    if words and words[0] in _ARTICLES:
        words = words[1:]
    size = words.pop(0) if words and words[0] in SIZES else None
    if len(words) < 2 or words[0] not in COLOURS or words[1] not in KINDS:
        return None
    if len(words) == 2:
        return size, words[0], words[1], None
    position = " ".join(w for w in words[2:] if w not in ("at", "in", "on", "the"))  # "at the top left": "top left"
    return (size, words[0], words[1], position) if position in POSITIONS else None


# --- sampling -----------------------------------------------------------------------------------

Rng = random.Random | np.random.Generator


def _index(rng: Rng, n: int) -> int:
    return rng.randrange(n) if isinstance(rng, random.Random) else int(rng.integers(n))


def _pick(rng: Rng, options: Sequence[str]) -> str:
    return options[_index(rng, len(options))]


def split_of(scene: Scene) -> Split:
    """Hash split of the caption space: a fixed 5% of scenes are held out and never sampled for training.

    The key ignores shape order, so "A and B" and "B and A" fall on the same side. sha256 rather
    than hash() because Python salts str hashes per process.
    """
    key = "|".join(sorted(_shape_phrase(s) for s in scene.shapes) + [scene.background])
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return Split.HELD_OUT if bucket < HELD_OUT_PERCENT else Split.TRAIN


def sample_scene(rng: Rng, max_shapes: int = MAX_SHAPES, split: Split = Split.TRAIN) -> Scene:
    """Draw a scene from `split`, with 1 to `max_shapes` shapes and their jitter, deterministic in `rng`."""
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise ValueError(f"max_shapes must be 1 to {MAX_SHAPES}, got {max_shapes}")
    while True:  # rejection sampling: ~1.05 draws on average for TRAIN, ~20 for HELD_OUT
        scene = _draw(rng, max_shapes)
        if split_of(scene) is split:
            return scene


def _draw(rng: Rng, max_shapes: int) -> Scene:
    background = _pick(rng, tuple(COLOURS))
    free = list(POSITIONS)
    shapes = []
    for _ in range(1 + _index(rng, max_shapes)):
        position = free.pop(_index(rng, len(free)))
        shapes.append(Shape(
            kind=_pick(rng, KINDS),
            colour=_pick(rng, tuple(c for c in COLOURS if c != background)),
            size=_pick(rng, tuple(SIZES)),
            position=position,
            jitter=Jitter(dx=float(rng.uniform(-MAX_OFFSET, MAX_OFFSET)),
                          dy=float(rng.uniform(-MAX_OFFSET, MAX_OFFSET)),
                          grow=float(rng.uniform(-1.0, 1.0))),
        ))
    return Scene(tuple(shapes), background)


def held_out_captions(n: int = 200, seed: int = 0) -> list[str]:
    """`n` distinct captions from the held-out split, fixed for a given seed, for evaluation."""
    rng = np.random.default_rng([_HELD_OUT_STREAM, seed])
    captions: dict[str, None] = {}  # insertion-ordered set
    while len(captions) < n:
        captions[caption(sample_scene(rng, split=Split.HELD_OUT))] = None
    return list(captions)


# --- rendering ----------------------------------------------------------------------------------

_SUPERSAMPLE = 8  # PIL draws hard edges; averaging 8x8 sub-pixels gives coverage within 1/64
_CIRCLE_BOX = ((-0.5, -0.5), (0.5, 0.5))  # the circle's bounding box, which is what PIL's ellipse takes


def render(scene: Scene, size: int) -> Image.Image:
    """Reference renderer: PIL polygons on a supersampled canvas, box-filtered down to `size`."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        (cx, cy), extent = shape.centre, shape.extent
        # PIL puts pixel k's centre at coordinate k; unit coordinates put it at k + 0.5.
        points = [(big * (cx + extent * x) - 0.5, big * (cy + extent * y) - 0.5)
                  for x, y in (_CIRCLE_BOX if shape.kind == "circle" else POLYGONS[shape.kind])]
        if shape.kind == "circle":
            draw.ellipse(points, fill=COLOURS[shape.colour])
        else:
            draw.polygon(points, fill=COLOURS[shape.colour])
    return canvas.resize((size, size), Image.Resampling.BOX)


Array = TypeVar("Array", np.ndarray, torch.Tensor)


def shape_distance(kind: str, x: Array, y: Array) -> Array:
    """Signed distance to a shape's outline in shape-local units (negative inside); x, y broadcast.

    Takes numpy arrays or torch tensors (the functions used exist under the same names in both), so
    the training renderer on a GPU and the numpy scorer share this one definition.
    """
    xp = torch if isinstance(x, torch.Tensor) else np
    if kind == "circle":
        return xp.sqrt(x * x + y * y) - 0.5
    vertices = POLYGONS[kind]
    nearest_sq, inside = None, False
    for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1]):
        ex, ey = bx - ax, by - ay
        wx, wy = x - ax, y - ay
        t = xp.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        squared = (wx - ex * t) ** 2 + (wy - ey * t) ** 2
        nearest_sq = squared if nearest_sq is None else xp.minimum(nearest_sq, squared)
        if ey != 0.0:  # even-odd rule: count the edges a ray towards +x crosses
            inside = inside ^ (((ay <= y) != (by <= y)) & (x < ax + (y - ay) * (ex / ey)))
    distance = xp.sqrt(nearest_sq)
    return xp.where(inside, -distance, distance)


# ---------------------------------------------------------------------- the demo LoRA's variation

STRIPE_PERIOD = 8  # pixels of one dark + one light diagonal band at the 64x64 training size
STRIPE_DARKEN = 0.5  # the dark bands keep half the background's brightness


def stripe_mask(size: int) -> np.ndarray:
    """(size, size) booleans: True on the dark diagonal bands (top-left to bottom-right stripes)."""
    y, x = np.mgrid[0:size, 0:size]
    return ((x + y) // (STRIPE_PERIOD // 2)) % 2 == 1


def striped(images: torch.Tensor) -> torch.Tensor:
    """The scenes with a striped background: (N, 3, H, W) in [-1, 1], the background darkened on diagonal
    bands, the shapes left as they are. The corner pixel is background (shapes keep off the border)."""
    background = images[:, :, :1, :1]
    on_background = ((images - background).abs().amax(1, keepdim=True) <= 0.02)
    bands = torch.from_numpy(stripe_mask(images.shape[-1])).to(images.device)[None, None]
    dark = (images + 1.0) * (1.0 - STRIPE_DARKEN) - 1.0
    return torch.where(on_background & bands, dark, images)


def stripe_strength(images: Sequence[Image.Image]) -> float:
    """How striped pictures are: mean brightness off the dark bands minus on them, as a fraction of full
    scale (0 for plain scenes; about 0.5 x the background's brightness for `striped` renders)."""
    values = []
    for image in images:
        grey = np.asarray(image.convert("L"), np.float32) / 255.0
        mask = stripe_mask(grey.shape[0])[:, :grey.shape[1]]
        values.append(float(grey[~mask].mean() - grey[mask].mean()))
    return float(np.mean(values)) if values else 0.0
