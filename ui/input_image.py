"""The image-to-image input widget's value as the request takes it: the picture, and the mask painted on it.

The input is a `gr.ImageEditor`: its background is the input image; whatever is painted on its layers, in any
colour, is the mask (painted = repaint). Nothing painted: plain image to image.
"""
from __future__ import annotations

from typing import Any

from PIL import Image, ImageChops


def image_and_mask(value: Any) -> tuple[Any, Image.Image | None]:
    """(the input image or None, the painted mask as "L" 0/255 or None)."""
    if value is None:
        return None, None
    if not isinstance(value, dict):  # a file path or an image: "use as input" and API callers
        return value, None
    background = value.get("background")
    if background is None:
        return None, None
    mask = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = (layer if isinstance(layer, Image.Image) else Image.open(layer)).convert("RGBA").getchannel("A")
        mask = alpha if mask is None else ImageChops.lighter(mask, alpha)
    if mask is not None:
        mask = mask.point(lambda v: 255 if v > 0 else 0)
        if mask.getbbox() is None:  # layers present but nothing painted
            mask = None
    return background, mask
