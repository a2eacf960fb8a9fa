"""How far one image is from another: PSNR, SSIM and a difference heat map.

Used by the Compare tab to put a number on what FP8 and FP4 change relative to the 16-bit image.
Plain numpy (scipy is not a dependency); images are compared as 8-bit RGB, the form users see.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

# SSIM constants from Wang, Bovik, Sheikh, Simoncelli 2004 ("Image quality assessment: from error
# visibility to structural similarity"): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03.
# scikit-image's `structural_similarity(gaussian_weights=True)` uses the same, so figures are comparable.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0

# The heat map's full scale, in 8-bit levels of absolute difference. Fixed rather than per image so
# that the FP8 and FP4 maps shown side by side use the same colours for the same error.
HEATMAP_FULL_SCALE = 64.0
# Black -> dark red -> orange -> pale yellow: monotonic in brightness, so it reads in greyscale too.
_HEAT_ANCHORS = np.array([[0, 0, 0], [120, 0, 0], [230, 80, 0], [255, 200, 40], [255, 255, 220]], dtype=np.float64)


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 float64 array of 0..255 values."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"Expected an RGB image (H x W x 3); got shape {array.shape}.")
    return array


def _pair(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_rgb_array(a), as_rgb_array(b)
    if x.shape != y.shape:
        raise ValueError(f"Images differ in size: {x.shape[1]}x{x.shape[0]} vs {y.shape[1]}x{y.shape[0]}.")
    return x, y


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels; inf for identical images."""
    x, y = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(DATA_RANGE**2 / mse)


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(r**2) / (2 * sigma**2))
    return k / k.sum()


def _filter_valid(channel: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 2-D filter, 'valid' region only (no padding), as a sum of shifted slices.

    Only the valid region is kept, the same as scikit-image cropping its borders before averaging,
    so edge padding never enters the score.
    """
    n = len(kernel)
    h, w = channel.shape
    rows = sum(kernel[i] * channel[i:h - n + 1 + i, :] for i in range(n))
    return sum(kernel[i] * rows[:, i:w - n + 1 + i] for i in range(n))


def ssim(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Mean structural similarity, averaged over the RGB channels; 1.0 for identical images."""
    x, y = _pair(a, b)
    h, w = x.shape[:2]
    size = min(SSIM_WINDOW, h, w)
    if size % 2 == 0:
        size -= 1  # an odd window keeps the Gaussian centred (tiny images only)
    if size < 3:
        raise ValueError(f"Images of {w}x{h} are too small for SSIM (need at least 3x3).")
    kernel = _gaussian_kernel(size, SSIM_SIGMA)
    # Sample covariances, as in the paper's reference code and scikit-image (`use_sample_covariance`).
    n = size * size
    cov_norm = n / (n - 1)
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    scores = []
    for ch in range(3):
        xc, yc = x[..., ch], y[..., ch]
        mx, my = _filter_valid(xc, kernel), _filter_valid(yc, kernel)
        vx = cov_norm * (_filter_valid(xc * xc, kernel) - mx * mx)
        vy = cov_norm * (_filter_valid(yc * yc, kernel) - my * my)
        vxy = cov_norm * (_filter_valid(xc * yc, kernel) - mx * my)
        s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        scores.append(float(s.mean()))
    return float(np.mean(scores))


def difference_heatmap(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray,
                       full_scale: float = HEATMAP_FULL_SCALE) -> Image.Image:
    """Per-pixel absolute difference (largest over the channels) coloured from black (none) to pale
    yellow (`full_scale` levels or more), as an RGB image of the inputs' size."""
    x, y = _pair(a, b)
    diff = np.abs(x - y).max(axis=2)
    t = np.clip(diff / full_scale, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    lo = np.floor(t).astype(int)
    hi = np.minimum(lo + 1, len(_HEAT_ANCHORS) - 1)
    frac = (t - lo)[..., None]
    rgb = _HEAT_ANCHORS[lo] * (1 - frac) + _HEAT_ANCHORS[hi] * frac
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def max_abs_difference(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> int:
    x, y = _pair(a, b)
    return int(np.abs(x - y).max())
