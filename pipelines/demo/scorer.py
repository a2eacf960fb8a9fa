"""Prompt adherence for demo scenes: does an image show what its caption says? Classic image analysis only.

1. Label every pixel with its nearest named colour in CIELAB; the most common label is the background.
2. Split the other pixels into 8-connected regions. A region's colour is the label of its strongest
   pixels (farthest from the background), because the rim that anti-aliasing or blur leaves around a
   red shape on blue is purple, and must not count as a purple shape.
3. Within a region, a shape's mask is its coverage: how far each pixel has moved from the background
   colour towards the shape colour. From the mask come the centroid (grid cell), the extent (size
   class) and the kind: every kind is rendered at the measured box with `scenes.shape_distance`, and
   the best-overlapping one wins.
4. Each caption shape is matched to a detected blob, and attributes are compared one by one.

Reliable from 64 px upwards (see tests/test_demo_scenes.py for measured accuracies); smaller
images make the small shapes only 7 px across.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image

from pipelines.demo.scenes import (
    COLOURS, GRID, KINDS, POLYGONS, POSITIONS, SIZES, Scene, parse_caption, shape_distance,
)

_NAMES = tuple(COLOURS)
_PALETTE_RGB = np.array(list(COLOURS.values()), dtype=np.float32)

# Extent threshold between the size classes: geometric mean of small's largest (0.164) and large's
# smallest (0.235) extent, so blur that trims a star's tips still leaves large above it.
_LARGE_FROM = (SIZES["small"] * SIZES["large"]) ** 0.5 * 1.02
# A blob must cover at least ~30% of a small star's area (0.0085 of the image); smaller specks are noise.
_MIN_AREA = 0.0025
# A region's colour is decided by its strongest 30% of pixels, and any label holding at least a quarter
# of them counts, so two touching shapes of different colours still give two blobs.
_STRONG_QUANTILE = 0.7
_COLOUR_SHARE = 0.25
_MAX_RESIDUAL = 0.5  # off-line distance (in units of |shape - background|) a shape pixel may have
_TAIL_REACH = 0.05  # how far past a shape's outline its blurred coverage is kept, as a fraction of the image
# Blur widths tried when matching kinds, as a fraction of the image side (0 to 2.5 px at 64 px).
_BLUR_WIDTHS = (0.0, 0.008, 0.016, 0.024, 0.04)

ATTRIBUTES = ("background", "count", "colour", "kind", "size", "position")


@dataclass(frozen=True)
class Blob:
    """One shape the scorer found: its named attributes and where it is, in unit image coordinates."""

    colour: str
    kind: str
    size: str
    position: str
    centre: tuple[float, float]
    extent: float
    area: float  # fraction of the image


@dataclass(frozen=True)
class SceneScore:
    """Attribute checks for one image against one scene, keyed "background", "count", "shape1.colour", ..."""

    checks: Mapping[str, bool]
    blobs: tuple[Blob, ...]  # what was found, for reading failures
    background: str

    @property
    def fraction(self) -> float:
        return sum(self.checks.values()) / len(self.checks)

    @property
    def all_correct(self) -> bool:
        return all(self.checks.values())


def score(image: Image.Image | np.ndarray, target: str | Scene) -> SceneScore:
    """Check `image` (PIL or HxWx3 uint8) against a caption or a Scene."""
    scene = parse_caption(target) if isinstance(target, str) else target
    rgb = _as_rgb(image)
    labels = _nearest_colour(rgb)
    background_index = int(np.bincount(labels.ravel(), minlength=len(_NAMES)).argmax())
    blobs = _find_blobs(rgb, labels, background_index)
    checks = {"background": _NAMES[background_index] == scene.background, "count": len(blobs) == len(scene.shapes)}
    checks.update(_match_shapes(scene, blobs))
    return SceneScore(MappingProxyType(checks), tuple(blobs), _NAMES[background_index])


def adherence(images: Sequence[Image.Image | np.ndarray], captions: Sequence[str | Scene]) -> dict:
    """Mean fraction, all-correct rate and per-attribute accuracy (shape attributes pooled over shapes)."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"need as many images as captions, and at least one; got {len(images)} and {len(captions)}")
    scores = [score(image, text) for image, text in zip(images, captions)]
    per_attribute = {}
    for attribute in ATTRIBUTES:
        results = [ok for s in scores for key, ok in s.checks.items() if key.rpartition(".")[2] == attribute]
        per_attribute[attribute] = sum(results) / len(results)
    return {
        "n": len(scores),
        "mean_fraction": sum(s.fraction for s in scores) / len(scores),
        "all_correct_rate": sum(s.all_correct for s in scores) / len(scores),
        "per_attribute": per_attribute,
    }


# --- pixels ---------------------------------------------------------------------------------------

def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image must be a PIL image or an HxWx3 uint8 array, got "
                         f"{getattr(image, 'dtype', type(image))} of shape {getattr(image, 'shape', '?')}")
    if min(image.shape[:2]) < 2 * GRID:
        raise ValueError(f"image of {image.shape[1]}x{image.shape[0]} px is too small to score")
    return image.astype(np.float32)


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255) to CIELAB under D65."""
    c = rgb / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_PALETTE_LAB = _lab(_PALETTE_RGB)


def _nearest_colour(rgb: np.ndarray) -> np.ndarray:
    distances = ((_lab(rgb)[..., None, :] - _PALETTE_LAB) ** 2).sum(-1)
    return distances.argmin(-1)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components: (labels with -1 outside the mask and 0..n-1 inside, n).

    Label propagation (min over the 3x3 neighbourhood) with pointer jumping, so it needs about
    log(diameter) numpy passes instead of a Python loop over pixels.
    """
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        lowest = labels
        for dy in range(3):
            for dx in range(3):
                lowest = np.minimum(lowest, padded[dy:dy + h, dx:dx + w])
        lowest = np.where(mask, lowest, none).ravel()
        inside = lowest < none
        lowest[inside] = lowest[lowest[inside]]  # jump: adopt the label that my label's pixel holds
        lowest = lowest.reshape(h, w)
        if np.array_equal(lowest, labels):
            break
        labels = lowest
    roots, dense = np.unique(labels[mask], return_inverse=True)
    components = np.full((h, w), -1)
    components[mask] = dense
    return components, len(roots)


# --- blobs ----------------------------------------------------------------------------------------

def _find_blobs(rgb: np.ndarray, labels: np.ndarray, background_index: int) -> list[Blob]:
    h, w = labels.shape
    min_area = _MIN_AREA * h * w
    # Blur spreads a shape's coverage a few pixels past its half-coverage outline; the kind fit needs those tails.
    reach = max(2, round(_TAIL_REACH * max(h, w)))
    is_background = labels == background_index
    background_rgb = np.median(rgb[is_background], axis=0)
    regions, count = _components(~is_background)
    blobs = []
    for region in range(count):
        inside = regions == region
        if inside.sum() < min_area:
            continue
        strength = np.linalg.norm(rgb[inside] - background_rgb, axis=1)
        strong = strength >= np.quantile(strength, _STRONG_QUANTILE)
        strong_rgb, strong_labels = rgb[inside][strong], labels[inside][strong]
        candidates = []
        for colour_index in np.unique(strong_labels):
            members = strong_labels == colour_index
            if colour_index != background_index and members.mean() >= _COLOUR_SHARE:
                # The shape's own colour as drawn, which a model may render a little off the palette.
                candidates.append((colour_index, np.median(strong_rgb[members], axis=0)))
        # Heavy blur can leave a blend colour (pink between purple and yellow) among the strong pixels.
        # The true colour lies farther from the background, so it goes first and claims its pixels.
        candidates.sort(key=lambda c: -np.linalg.norm(c[1] - background_rgb))
        claimed = np.zeros_like(inside)
        for colour_index, shape_rgb in candidates:
            coverage = _coverage(rgb, background_rgb, shape_rgb)
            shapes, n_shapes = _components((coverage > 0.5) & _dilate(inside, 1) & ~claimed)
            for k in range(n_shapes):
                mask = shapes == k
                if mask.sum() >= min_area:
                    near = _dilate(mask, reach) & (is_background | inside)
                    blobs.append(_describe(np.where(near, coverage, 0.0), mask, _NAMES[colour_index]))
                    claimed |= _dilate(mask, 1)
    return blobs


def _coverage(rgb: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Fraction of the way from background to colour, 0 where the pixel is off that line (another colour)."""
    direction = colour - background
    length_sq = float(direction @ direction)
    if length_sq < 1.0:
        return np.zeros(rgb.shape[:2], dtype=np.float32)
    offset = rgb - background
    along = offset @ direction / length_sq
    residual = np.linalg.norm(offset - along[..., None] * direction, axis=-1) / np.sqrt(length_sq)
    return np.where(residual < _MAX_RESIDUAL, np.clip(along, 0.0, 1.0), 0.0).astype(np.float32)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a mask by `radius` pixels (square neighbourhood)."""
    h, w = mask.shape
    for _ in range(radius):
        padded = np.pad(mask, 1)
        mask = np.logical_or.reduce([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
    return mask


def _describe(coverage: np.ndarray, mask: np.ndarray, colour: str) -> Blob:
    h, w = coverage.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    total = coverage.sum()
    cx, cy = (coverage * xs).sum() / total, (coverage * ys).sum() / total
    kind = _classify(coverage, (cx, cy), max(h, w))
    extent = math.sqrt(total / _MOMENTS[kind][0]) / max(h, w)
    column, row = min(int(cx / w * GRID), GRID - 1), min(int(cy / h * GRID), GRID - 1)
    return Blob(
        colour=colour,
        kind=kind,
        size="large" if extent >= _LARGE_FROM else "small",
        position=next(name for name, cell in POSITIONS.items() if cell == (column, row)),
        centre=(cx / w, cy / h),
        extent=extent,
        area=float(mask.sum()) / (h * w),
    )


def _half_crossings(profile: np.ndarray) -> tuple[float, float]:
    """Sub-pixel positions where a coverage profile first and last reaches 0.5 (pixel k spans [k, k+1])."""
    above = np.flatnonzero(profile >= 0.5)
    first, last = int(above[0]), int(above[-1])

    def crossing(inner: int, outer: int) -> float:
        if not 0 <= outer < len(profile):
            return inner + (0.0 if outer < inner else 1.0)
        a, b = profile[inner], profile[outer]
        return inner + 0.5 + (outer - inner) * (a - 0.5) / max(a - b, 1e-6)

    return crossing(first, first - 1), crossing(last, last + 1)


def _polygon_moments(vertices: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """Area and centroid of a simple polygon (shoelace formula)."""
    area = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
        cross = x0 * y1 - x1 * y0
        area += cross / 2
        cx += (x0 + x1) * cross / 6
        cy += (y0 + y1) * cross / 6
    return abs(area), cx / area, cy / area


# Area and centroid of each kind at unit extent: with them a kind is placed from the blob's mass and
# centroid, which blur leaves unchanged, instead of from its outline, which blur erodes.
_MOMENTS = MappingProxyType({
    kind: (math.pi / 4, 0.0, 0.0) if kind == "circle" else _polygon_moments(POLYGONS[kind]) for kind in KINDS
})


def _classify(coverage: np.ndarray, centroid: tuple[float, float], image_side: int) -> str:
    """The kind which, placed by mass and centroid and blurred by the best of a few widths, overlaps most.

    Overlap is soft IoU (sum of minima over sum of maxima) of coverage maps.
    """
    ys, xs = np.nonzero(coverage > 0)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    observed = torch.from_numpy(coverage[y0:y1, x0:x1])
    mass = float(observed.sum())
    x = torch.arange(x0, x1, dtype=torch.float32) + 0.5
    y = torch.arange(y0, y1, dtype=torch.float32) + 0.5
    sharp = []
    for kind in KINDS:
        area, offset_x, offset_y = _MOMENTS[kind]
        extent = math.sqrt(mass / area)
        u = (x - centroid[0]) / extent + offset_x
        v = (y - centroid[1]) / extent + offset_y
        sharp.append((0.5 - shape_distance(kind, u[None, :], v[:, None]) * extent).clamp(0.0, 1.0))
    candidates = torch.stack(sharp)[:, None]  # (kinds, 1, h, w)
    best = torch.full((len(KINDS),), math.inf)
    for sigma in _BLUR_WIDTHS:
        blurred = _gaussian_blur(candidates, sigma * image_side)[:, 0] if sigma else candidates[:, 0]
        best = torch.minimum(best, ((observed - blurred) ** 2).sum((1, 2)))
    return KINDS[int(best.argmin())]


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    images = torch.nn.functional.conv2d(images, taps.view(1, 1, 1, -1), padding=(0, radius))
    return torch.nn.functional.conv2d(images, taps.view(1, 1, -1, 1), padding=(radius, 0))


# --- matching -------------------------------------------------------------------------------------

def _match_shapes(scene: Scene, blobs: list[Blob]) -> dict[str, bool]:
    """Pair caption shapes with blobs, most specific evidence first.

    1. a blob of the named colour in the named cell; 2. any blob in the named cell (colour wrong);
    3. an unclaimed blob of the named colour elsewhere (position wrong, nearest to the cell);
    otherwise nothing was drawn for this shape and all its checks fail.
    """
    chosen: dict[int, tuple[Blob, bool, bool]] = {}  # shape index -> (blob, colour ok, position ok)
    for i, shape in enumerate(scene.shapes):
        here = [b for b in blobs if b.position == shape.position]
        right_colour = [b for b in here if b.colour == shape.colour]
        if right_colour:
            chosen[i] = (max(right_colour, key=lambda b: b.area), True, True)
        elif here:
            chosen[i] = (max(here, key=lambda b: b.area), False, True)
    claimed = {id(blob) for blob, _, _ in chosen.values()}
    for i, shape in enumerate(scene.shapes):
        if i in chosen:
            continue
        elsewhere = [b for b in blobs if b.colour == shape.colour and id(b) not in claimed]
        if elsewhere:
            column, row = POSITIONS[shape.position]
            target = ((column + 0.5) / GRID, (row + 0.5) / GRID)
            blob = min(elsewhere, key=lambda b: (b.centre[0] - target[0]) ** 2 + (b.centre[1] - target[1]) ** 2)
            chosen[i] = (blob, True, False)
            claimed.add(id(blob))
    checks = {}
    for i, shape in enumerate(scene.shapes, start=1):
        blob, colour_ok, position_ok = chosen.get(i - 1, (None, False, False))
        checks[f"shape{i}.colour"] = colour_ok
        checks[f"shape{i}.kind"] = blob is not None and blob.kind == shape.kind
        checks[f"shape{i}.size"] = blob is not None and blob.size == shape.size
        checks[f"shape{i}.position"] = position_ok
    return checks
