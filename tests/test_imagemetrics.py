"""PSNR, SSIM and the heat map against their definitions, on small arrays (no models)."""
import math

import numpy as np
import pytest
from PIL import Image

from pipelines import imagemetrics as im


def _random_image(rng, h=24, w=20):
    return rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)


def test_identical_images_score_perfectly():
    img = _random_image(np.random.default_rng(0))
    assert im.psnr(img, img) == math.inf
    assert im.ssim(img, img) == pytest.approx(1.0)
    assert im.max_abs_difference(img, img) == 0


def test_psnr_matches_its_formula():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 10, np.uint8)  # MSE = 100
    assert im.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    # PIL images and arrays give the same figure
    assert im.psnr(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(im.psnr(a, b))


def _ssim_by_windows(x, y, size=11, sigma=1.5):
    """Direct per-window evaluation of Wang et al.'s SSIM: the slow definition the fast one must equal."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    n = size * size
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for ch in range(3):
        vals = []
        for i in range(x.shape[0] - size + 1):
            for j in range(x.shape[1] - size + 1):
                px, py = x[i:i + size, j:j + size, ch], y[i:i + size, j:j + size, ch]
                mx, my = (w * px).sum(), (w * py).sum()
                vx = n / (n - 1) * ((w * px * px).sum() - mx * mx)
                vy = n / (n - 1) * ((w * py * py).sum() - my * my)
                cxy = n / (n - 1) * ((w * px * py).sum() - mx * my)
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_equals_the_windowed_definition():
    rng = np.random.default_rng(1)
    a = _random_image(rng, 19, 23)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, size=a.shape), 0, 255).astype(np.uint8)
    assert im.ssim(a, b) == pytest.approx(_ssim_by_windows(a, b), rel=1e-9)
    assert im.ssim(a, b) == pytest.approx(im.ssim(b, a))  # symmetric


def test_ssim_falls_as_noise_grows():
    rng = np.random.default_rng(2)
    base = np.tile(np.linspace(0, 255, 32)[None, :, None], (32, 1, 3))  # a smooth ramp
    small = np.clip(base + rng.normal(0, 3, base.shape), 0, 255)
    large = np.clip(base + rng.normal(0, 30, base.shape), 0, 255)
    assert 1.0 > im.ssim(base, small) > im.ssim(base, large) > 0.0


def test_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="differ in size"):
        im.psnr(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))


def test_heatmap_scale_is_fixed_and_monotonic():
    a = np.zeros((4, 6, 3), np.uint8)
    b = a.copy()
    b[:, 1] = 16
    b[:, 2] = 32
    b[:, 3] = 64
    b[:, 4, 0] = 255  # one channel far off: the largest channel difference counts
    heat = im.difference_heatmap(a, b)
    assert heat.size == (6, 4) and heat.mode == "RGB"
    px = np.asarray(heat).astype(int)
    assert px[0, 0].tolist() == [0, 0, 0]  # no difference: black
    brightness = px[0, :5].sum(axis=1)
    assert list(brightness) == sorted(brightness) and brightness[1] > 0
    assert px[0, 3].tolist() == px[0, 4].tolist()  # at and beyond full scale: the same top colour
