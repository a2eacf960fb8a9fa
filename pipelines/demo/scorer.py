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

All numpy, no torch: torch hands even 64x64 element-wise ops to its thread pool, which on a busy
two-core CPU made scoring ten times slower.

Reliable from 64 px upwards (see tests/test_demo_scenes.py for measured accuracies); smaller
images make the small shapes only 7 px across.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from PIL import Image

from pipelines.demo.scenes import (
    COLOURS, GRID, KINDS, POLYGONS, POSITIONS, Scene, parse_caption, shape_distance,
)

_NAMES = tuple(COLOURS)
_PALETTE_RGB = np.array(list(COLOURS.values()), dtype=np.float32)

# Extent threshold between the size classes, halfway (in ratio) between small's largest extent
# (0.164) and large's smallest (0.235).
_LARGE_FROM = 0.2
# A blob must cover at least ~30% of a small star's area (0.0085 of the image); smaller specks are noise.
_MIN_AREA = 0.0025
# A region's colour is decided by its strongest 30% of pixels, and any label holding at least a quarter
# of them counts, so two touching shapes of different colours still give two blobs.
_STRONG_QUANTILE = 0.7
_COLOUR_SHARE = 0.25
_MAX_RESIDUAL = 0.5  # off-line distance (in units of |shape - background|) a shape pixel may have
# Shapes fit their kind's rendering with IoU >= 0.67 even under heavy blur and noise; blobs of noise
# reach ~0.36. Below this a blob is not a shape and is ignored.
_MIN_FIT = 0.5
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
    area: float  # coverage mass as a fraction of the image
    fit: float  # soft IoU with the kind's rendering; clean renders score ~0.95-1, noise ~0.3


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
    # |p - c|^2 = |c|^2 - 2 p.c + |p|^2, and |p|^2 is the same for every c: one small matmul.
    return ((_PALETTE_LAB ** 2).sum(-1) - 2 * _lab(rgb) @ _PALETTE_LAB.T).argmin(-1)


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
    areas = np.bincount(regions[regions >= 0], minlength=count)
    blobs = []
    for region in np.flatnonzero(areas >= min_area):
        # Work in a window around the region: cost follows the region, not the image.
        ys, xs = np.nonzero(regions == region)
        window = (slice(max(ys.min() - reach - 1, 0), ys.max() + reach + 2),
                  slice(max(xs.min() - reach - 1, 0), xs.max() + reach + 2))
        offset = (window[1].start, window[0].start)
        inside = regions[window] == region
        pixels, pixel_labels = rgb[window], labels[window]
        strength = np.linalg.norm(pixels[inside] - background_rgb, axis=1)
        strong = strength >= np.quantile(strength, _STRONG_QUANTILE)
        strong_rgb, strong_labels = pixels[inside][strong], pixel_labels[inside][strong]
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
            coverage = _coverage(pixels, background_rgb, shape_rgb)
            shapes, n_shapes = _components((coverage > 0.5) & _dilate(inside, 1) & ~claimed)
            for k in range(n_shapes):
                mask = shapes == k
                if mask.sum() < min_area:
                    continue
                support = _dilate(mask, reach) & (is_background[window] | inside)
                blob = _describe(np.where(support, coverage, 0.0), support, offset, (h, w), _NAMES[colour_index])
                if blob.fit >= _MIN_FIT:
                    blobs.append(blob)
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
    """Grow a mask by `radius` pixels (square neighbourhood), one axis at a time."""
    h, w = mask.shape
    span = 2 * radius + 1
    padded = np.pad(mask, radius)
    rows = np.logical_or.reduce([padded[:, dx:dx + w] for dx in range(span)])
    return np.logical_or.reduce([rows[dy:dy + h] for dy in range(span)])


def _describe(coverage: np.ndarray, support: np.ndarray, offset: tuple[int, int], image_shape: tuple[int, int],
              colour: str) -> Blob:
    """Attributes of the shape whose coverage (zero outside `support`) fills a window at `offset` (x, y)."""
    h, w = image_shape
    ys, xs = np.mgrid[0:coverage.shape[0], 0:coverage.shape[1]] + 0.5
    mass = coverage.sum()
    centroid = (coverage * xs).sum() / mass, (coverage * ys).sum() / mass
    kind, fit = _classify(coverage, support, centroid, max(h, w))
    # The extent at which the found kind has the observed mass; blur moves mass around but keeps its total.
    extent = math.sqrt(mass / _MOMENTS[kind][0]) / max(h, w)
    cx, cy = (centroid[0] + offset[0]) / w, (centroid[1] + offset[1]) / h
    cell = (min(int(cx * GRID), GRID - 1), min(int(cy * GRID), GRID - 1))
    return Blob(
        colour=colour,
        kind=kind,
        size="large" if extent >= _LARGE_FROM else "small",
        position=next(name for name, at in POSITIONS.items() if at == cell),
        centre=(float(cx), float(cy)),
        extent=extent,
        area=float(mass) / (h * w),
        fit=fit,
    )


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


def _classify(coverage: np.ndarray, support: np.ndarray, centroid: tuple[float, float],
              image_side: int) -> tuple[str, float]:
    """The kind which, placed by mass and centroid and blurred by the best of a few widths, overlaps most.

    Returns the kind and its overlap: soft IoU (sum of minima over sum of maxima) of coverage maps,
    both cut to `support`.
    """
    mass = coverage.sum()
    x = np.arange(coverage.shape[1]) + 0.5
    y = np.arange(coverage.shape[0]) + 0.5
    sharp = []
    for kind in KINDS:
        area, offset_x, offset_y = _MOMENTS[kind]
        extent = math.sqrt(mass / area)
        u = (x - centroid[0]) / extent + offset_x
        v = (y - centroid[1]) / extent + offset_y
        sharp.append(np.clip(0.5 - shape_distance(kind, u[None, :], v[:, None]) * extent, 0.0, 1.0))
    candidates = np.stack(sharp)  # (kinds, h, w)
    best = np.full(len(KINDS), -1.0)
    for sigma in _BLUR_WIDTHS:
        blurred = (_gaussian_blur(candidates, sigma * image_side) if sigma else candidates) * support
        iou = np.minimum(coverage, blurred).sum((1, 2)) / np.maximum(coverage, blurred).sum((1, 2))
        best = np.maximum(best, iou)
    return KINDS[int(best.argmax())], float(best.max())


def _gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Blur the last two axes as two small matrix products (zero padding), cheap on ~40 px windows."""
    def operator(n: int) -> np.ndarray:
        offsets = np.arange(n)
        weights = np.exp(-0.5 * ((offsets[:, None] - offsets[None, :]) / sigma) ** 2)
        return weights / (sigma * math.sqrt(2 * math.pi))

    return operator(images.shape[-2]) @ images @ operator(images.shape[-1])


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
