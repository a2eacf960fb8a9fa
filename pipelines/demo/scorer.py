"""Prompt adherence for demo scenes: does an image show what its caption says? Classic image analysis only.

1. Label every pixel with its nearest named colour in CIELAB; the most common label is the background.
2. Split the other pixels into 8-connected regions. A region's colour is the label of its strongest
   pixels (farthest from the background), because the rim that anti-aliasing or blur leaves around a
   red shape on blue is purple, and must not count as a purple shape.
3. In a region, a shape's coverage is how far each pixel has moved from the background colour towards
   the shape colour; more than half marks the shape. Blur moves coverage around but keeps its total
   and centroid, so each kind is placed by those two, rendered with `scenes.shape_distance`, blurred
   by a few widths, and the best overlap names the kind. The centroid gives the grid cell, and the
   extent at which that kind has the observed total gives the size class. Blobs that fit no kind
   (noise) or have no edge against their surroundings (a shaded background) are not shapes.
4. Each caption shape is matched to a found shape (`_match_shapes`), and attributes compared one by one.

All numpy, no torch: torch hands even 64x64 element-wise ops to its thread pool, which on a busy
two-core CPU made scoring ten times slower.

Measured over 200-300 sampled scenes per size (tests/test_demo_scenes.py asserts the 64 and 128 px
numbers): clean renders score all correct at every size from 32 to 256 px. With blur sigma size/80 px
and noise std 12: 1.0 from 64 px up, 0.997 at 48 px, 0.975 at 32 px. With sigma size/50 and std 20:
0.89-0.94 from 48 px up, as small stars blur into circles. JPEG's halved chroma resolution hurts at
64 px (0.85 at quality 40).
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
# A blob must cover at least 30% of the smallest shape's area (a small star, 0.0083 of the image);
# smaller specks are noise.
_MIN_AREA = 0.0025
# A region's colour is decided by its strongest 30% of pixels, and any label holding at least a quarter
# of them counts, so two touching shapes of different colours still give two blobs.
_STRONG_QUANTILE = 0.7
_COLOUR_SHARE = 0.25
_MAX_RESIDUAL = 0.5  # off-line distance (in units of |shape - background|) a shape pixel may have
# Shapes fit their kind's rendering with IoU >= 0.67 even under heavy blur and noise; blobs of noise
# reach ~0.36. Below this a blob is not a shape and is ignored.
_MIN_FIT = 0.5
# A shape has an edge: its colour differs from the background just outside it by >= 36 CIELAB units,
# blurred or shaded (>= 29 after JPEG at quality 40). A patch where a shaded background drifts across to another colour
# name differs from its surroundings by <= 12.
_MIN_CONTRAST = 20.0
_TAIL_REACH = 0.05  # how far past a shape's outline its blurred coverage is kept, as a fraction of the image
# Blur widths tried when matching kinds, as a fraction of the image side (0 to 2.5 px at 64 px).
_BLUR_WIDTHS = (0.0, 0.008, 0.016, 0.024, 0.04)

ATTRIBUTES = ("background", "count", "colour", "kind", "size", "position")


@dataclass(frozen=True)
class Blob:
    """One shape the scorer found, in the caption's words plus measurements in unit image coordinates."""

    colour: str
    kind: str
    size: str
    position: str
    centre: tuple[float, float]  # coverage centroid (x, y)
    extent: float  # longer bounding-box side of `kind` at the observed area, as in `Shape.extent`
    area: float  # coverage total as a fraction of the image
    fit: float  # soft IoU with the kind's rendering: ~0.95-1 clean, >= 0.67 heavily blurred, ~0.3 for noise


@dataclass(frozen=True)
class SceneScore:
    """Attribute checks for one image against one scene.

    `checks` holds "background" (the most common colour is the named one), "count" (as many shapes
    found as named), and per caption shape "shapeN.colour", "shapeN.kind", "shapeN.size" and
    "shapeN.position" for N = 1, 2, judged on the found shape matched to it (see `_match_shapes`).
    """

    checks: Mapping[str, bool]
    blobs: tuple[Blob, ...]  # every shape found, matched or not, for reading failures
    background: str  # the colour name taken for the background

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
        raise ValueError("need as many images as captions, and at least one; "
                         f"got {len(images)} and {len(captions)}")
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
    padded = np.full((h + 2, w + 2), none)  # np.pad costs more than the pass itself on small windows
    while True:
        padded[1:-1, 1:-1] = labels
        across = np.minimum(np.minimum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])  # 3x3 min, separably
        lowest = np.minimum(np.minimum(across[:-2], across[1:-1]), across[2:])
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
        pixels, inside, outside = rgb[window], regions[window] == region, is_background[window]
        claimed = np.zeros_like(inside)
        colours = _region_colours(pixels, labels[window], inside, background_index, background_rgb)
        for colour_index, shape_rgb in colours:
            coverage = _coverage(pixels, background_rgb, shape_rgb)
            shapes, n_shapes = _components((coverage > 0.5) & _dilate(inside, 1) & ~claimed)
            for k in range(n_shapes):
                mask = shapes == k
                if mask.sum() < min_area:
                    continue
                support = _dilate(mask, reach) & (outside | inside)
                ring = support & ~_dilate(mask, 1) & outside
                surround = np.median(pixels[ring], axis=0) if ring.any() else background_rgb
                shape_lab, surround_lab = _lab(np.stack([shape_rgb, surround]))
                if np.linalg.norm(shape_lab - surround_lab) < _MIN_CONTRAST:
                    continue
                blob = _describe(np.where(support, coverage, 0.0), support, offset, (h, w), _NAMES[colour_index])
                if blob.fit >= _MIN_FIT:
                    blobs.append(blob)
                    claimed |= _dilate(mask, 1)
    return blobs


def _region_colours(pixels: np.ndarray, labels: np.ndarray, inside: np.ndarray, background_index: int,
                    background_rgb: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Colours of the shapes in a region, as (palette index, RGB as drawn), strongest first.

    Only the strongest pixels vote, so a blended rim never does; the RGB is theirs rather than the
    palette's, since a model may draw a colour a little off.
    """
    strength = np.linalg.norm(pixels[inside] - background_rgb, axis=1)
    strong = strength >= np.quantile(strength, _STRONG_QUANTILE)
    strong_rgb, strong_labels = pixels[inside][strong], labels[inside][strong]
    colours = []
    for colour_index in np.unique(strong_labels):
        members = strong_labels == colour_index
        if colour_index != background_index and members.mean() >= _COLOUR_SHARE:
            colours.append((int(colour_index), np.median(strong_rgb[members], axis=0)))
    # Heavy blur can leave a blend colour (pink between purple and yellow) among the strong pixels.
    # The true colour lies farther from the background, so it goes first and claims its pixels.
    return sorted(colours, key=lambda c: -np.linalg.norm(c[1] - background_rgb))


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
    padded = np.zeros((h + 2 * radius, w + 2 * radius), dtype=bool)
    padded[radius:radius + h, radius:radius + w] = mask
    rows = np.logical_or.reduce([padded[:, dx:dx + w] for dx in range(span)])
    return np.logical_or.reduce([rows[dy:dy + h] for dy in range(span)])


def _describe(coverage: np.ndarray, support: np.ndarray, offset: tuple[int, int], image_shape: tuple[int, int],
              colour: str) -> Blob:
    """Attributes of the shape whose coverage (zero outside `support`) fills a window at `offset` (x, y)."""
    h, w = image_shape
    rows, columns = np.flatnonzero(support.any(1)), np.flatnonzero(support.any(0))
    crop = slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)
    coverage, support, offset = coverage[crop], support[crop], (offset[0] + columns[0], offset[1] + rows[0])
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
    """Pair caption shapes with found shapes, most specific evidence first, and compare attributes.

    1. a blob of the named colour in the named cell; 2. any blob in the named cell (colour wrong);
    3. an unclaimed blob of the named colour elsewhere, the nearest (position wrong);
    otherwise nothing was drawn for this shape and all its checks fail. So one wrong word in a
    caption fails that word's check and, on a faithful image, only that one.
    """
    chosen: dict[int, tuple[int, bool, bool]] = {}  # caption shape -> (blob index, colour ok, position ok)
    for i, shape in enumerate(scene.shapes):
        here = [j for j, b in enumerate(blobs) if b.position == shape.position]
        right_colour = [j for j in here if blobs[j].colour == shape.colour]
        if right_colour or here:
            chosen[i] = (max(right_colour or here, key=lambda j: blobs[j].area), bool(right_colour), True)
    claimed = {j for j, _, _ in chosen.values()}
    for i, shape in enumerate(scene.shapes):
        elsewhere = [j for j, b in enumerate(blobs) if b.colour == shape.colour and j not in claimed]
        if i not in chosen and elsewhere:
            column, row = POSITIONS[shape.position]
            target = np.array([(column + 0.5) / GRID, (row + 0.5) / GRID])
            nearest = min(elsewhere, key=lambda j: np.linalg.norm(np.array(blobs[j].centre) - target))
            chosen[i] = (nearest, True, False)
            claimed.add(nearest)
    checks = {}
    for i, shape in enumerate(scene.shapes):
        if i in chosen:
            j, colour_ok, position_ok = chosen[i]
            kind_ok, size_ok = blobs[j].kind == shape.kind, blobs[j].size == shape.size
        else:
            colour_ok = position_ok = kind_ok = size_ok = False
        checks |= {f"shape{i + 1}.colour": colour_ok, f"shape{i + 1}.kind": kind_ok,
                   f"shape{i + 1}.size": size_ok, f"shape{i + 1}.position": position_ok}
    return checks
