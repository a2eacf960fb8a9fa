"""An input image for image-to-image: read it safely, convert it to RGB by stated rules, fit it to the
requested size, and turn it into the tensor the VAE encoder takes.

Everything here happens before any model work, and every failure is a one-line RequestError:
- the pixel count is checked from the header, before decoding (a 30000x30000 PNG is a few kB on disk
  and 2.7 GB decoded);
- a photo whose EXIF orientation says "rotated" is turned upright first, as browsers and viewers show it
  (a phone's portrait JPEG is stored landscape with that tag);
- conversions to RGB: transparency is composited over white; 16-bit greyscale is scaled to 8 bits;
  CMYK, palette and greyscale images are converted by Pillow; an animated image gives its first frame;
- the image is fitted to the requested size by covering it and cropping the centre (aspect kept, as
  A1111's "crop and resize"); an image already at the size is used as is.
Uploaded bytes are only ever held in memory: nothing is written to disk.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .graphs import VAE_ENCODER
from .request import RequestError

MAX_INPUT_SIDE = 8192  # far beyond any model's size; larger inputs are refused before decoding
MAX_INPUT_PIXELS = 40_000_000
MAX_INPUT_BYTES = 100 * 2**20
BACKGROUND = (255, 255, 255)  # what transparent pixels become
ORIENTATION_TAG = 0x0112  # EXIF "Orientation": 1 upright, 2-8 mirrored and/or rotated


@dataclass(frozen=True, eq=False)
class InputImage:
    """A decoded RGB input image and where it came from (identity equality: images are compared by hash)."""

    image: Image.Image
    sha256: str  # of the bytes given (of the RGB pixels when given a decoded image)
    notes: tuple[str, ...] = ()  # the conversions applied, reported with the result

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def read_image(source: bytes | str | Path | Image.Image | InputImage, what: str = "input image") -> InputImage:
    """Decode `source` (file bytes, a path, or an already decoded image) into RGB. Raises RequestError."""
    if isinstance(source, InputImage):
        return source
    if isinstance(source, Image.Image):
        _check_size(source.size, what)
        rgb, notes = _to_rgb(source)
        return InputImage(rgb, _pixels_hash(rgb), notes)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise RequestError(f"The {what} {path.name!r} does not exist or is not a file.")
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise RequestError(f"The {what} is larger than {MAX_INPUT_BYTES // 2**20} MB; use a smaller file.")
        source = path.read_bytes()
    if not isinstance(source, (bytes, bytearray)):
        raise RequestError(f"The {what} must be an image file (PNG, JPEG, WebP...).")
    if len(source) > MAX_INPUT_BYTES:
        raise RequestError(f"The {what} is larger than {MAX_INPUT_BYTES // 2**20} MB; use a smaller file.")
    try:
        opened = Image.open(io.BytesIO(source))  # reads the header only
    except Image.DecompressionBombError:
        raise RequestError(f"The {what} has too many pixels (at most {MAX_INPUT_PIXELS // 1_000_000} megapixels "
                           f"and {MAX_INPUT_SIDE} pixels a side); use a smaller image.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(f"The {what} is not an image Prism can read; use a PNG, JPEG or WebP file.") from None
    _check_size(opened.size, what)
    rgb, notes = _to_rgb(opened)
    return InputImage(rgb, hashlib.sha256(source).hexdigest(), notes)


def random_image(width: int, height: int, seed: int = 0) -> InputImage:
    """An RGB image of uniformly random pixels from `seed`: the input where a measurement needs one and no picture
    is given (benchmarks and FP8/FP4 calibration of a model that edits images)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return read_image(Image.fromarray(pixels, "RGB"))


def _check_size(size: tuple[int, int], what: str) -> None:
    w, h = size
    if w < 1 or h < 1 or max(w, h) > MAX_INPUT_SIDE or w * h > MAX_INPUT_PIXELS:
        raise RequestError(f"The {what} is {w}x{h}: too large (at most {MAX_INPUT_PIXELS // 1_000_000} megapixels "
                           f"and {MAX_INPUT_SIDE} pixels a side); use a smaller image.")


def _to_rgb(image: Image.Image) -> tuple[Image.Image, tuple[str, ...]]:
    notes = []
    if getattr(image, "is_animated", False):
        image.seek(0)
        notes.append("animated image: its first frame was used")
    try:
        image.load()
    except Exception:  # Pillow raises OSError, SyntaxError, ValueError... for damaged data
        raise RequestError("The image file is truncated or damaged; save it again and retry.") from None
    image, turned = upright(image)
    if turned:
        notes.append("turned upright as its EXIF orientation says")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image.convert("I"), dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")
        notes.append("16-bit image: scaled to 8 bits")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("transparent areas were filled with white")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba)
    return image.convert("RGB"), tuple(notes)


def upright(image: Image.Image) -> tuple[Image.Image, bool]:
    """`image` as it is meant to be seen: rotated or mirrored by its EXIF orientation tag (1 = already
    upright); and whether it was changed."""
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block: show the pixels as stored
        return image, False
    if orientation not in range(2, 9):
        return image, False
    return ImageOps.exif_transpose(image), True


def _pixels_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover width x height keeping the aspect ratio, then crop the centre; an image of that size is unchanged."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image to (1, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor does."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One draw from the encoder's distribution per image, each from its own seed's stream (as diffusers'
    `retrieve_latents` with a list of generators); a seed therefore gives the same image alone or in a batch."""
    draws = [torch.randn((1, *mean.shape[1:]), generator=g, dtype=mean.dtype) for g in generators]
    return mean + std * torch.cat(draws).to(mean.device)


def encode_input(parts, image: Image.Image, generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """The (already fitted) input image encoded: one latent draw per image, not yet scaled."""
    pixels = to_tensor(image).to(device=device, dtype=parts.dtype(VAE_ENCODER))
    mean, std = parts.get(VAE_ENCODER)(image=pixels)
    return sample_latents(mean, std, generators)


# --------------------------------------------------------------------------- inpainting

ONLY_MASKED_PADDING = 32  # pixels of context around the mask in "only masked" mode (A1111's default)


@dataclass(frozen=True)
class Canvas:
    """What a family loop works on for an input image, and how its output goes back into the input.

    - image: the input at the requested size (fitted; in "only masked" mode, the region around the mask);
    - mask: None for image to image; else "L" at the requested size, white = repaint. The latents blend
      with it binarized at 0.5 (as diffusers' inpaint pipelines); the output is pasted over the input
      through it blurred by `mask_blur` pixels, so pixels outside the (blurred) mask are the input's own.
    """

    image: Image.Image
    mask: Image.Image | None = None
    original: Image.Image | None = None  # what the output is pasted into
    paste_mask: Image.Image | None = None  # the blurred mask, at the original's size
    region: tuple[int, int, int, int] | None = None  # where the output goes in the original (only masked)

    def paste_back(self, generated: Image.Image) -> Image.Image:
        if self.mask is None:
            return generated
        base = self.original.copy()
        left, top, right, bottom = self.region or (0, 0, base.width, base.height)
        patch = generated if generated.size == (right - left, bottom - top) else \
            generated.resize((right - left, bottom - top), Image.Resampling.LANCZOS)
        base.paste(patch, (left, top), self.paste_mask.crop((left, top, right, bottom)))
        return base


def prepare_canvas(image: InputImage, mask: InputImage | None, width: int, height: int, mask_blur: int = 0,
                   only_masked: bool = False) -> Canvas:
    if mask is None:
        return Canvas(fit(image.image, width, height))
    grey = mask.image.convert("L")
    blurred = grey.filter(ImageFilter.GaussianBlur(mask_blur)) if mask_blur else grey
    if not only_masked:
        return Canvas(fit(image.image, width, height), fit(grey, width, height), fit(image.image, width, height),
                      fit(blurred, width, height))
    region = mask_region(grey, width / height, ONLY_MASKED_PADDING + mask_blur)
    crop = lambda im: im.crop(region).resize((width, height), Image.Resampling.LANCZOS)  # noqa: E731
    return Canvas(crop(image.image), crop(grey), image.image, blurred, region)


def encode_request_image(parts, req, generators: list[torch.Generator], ctx) -> tuple[Canvas, torch.Tensor]:
    """Image to image and inpainting, the same in every family: the request's image (and mask) fitted to its
    size, then VAE-encoded (unscaled latents); the encoder is done with afterwards."""
    ctx.report("encode", 0, 1, "encoding the input image")
    canvas = prepare_canvas(req.image, req.mask, req.width, req.height, req.mask_blur, req.only_masked)
    with torch.inference_mode():
        encoded = encode_input(parts, canvas.image, generators, ctx.device)
    parts.done_with(VAE_ENCODER)
    return canvas, encoded


def mask_region(mask: Image.Image, aspect: float, padding: int) -> tuple[int, int, int, int]:
    """The mask's bounding box grown by `padding`, then widened or heightened towards `aspect` (width / height)
    within the image, so the region scales to the requested size with little distortion."""
    left, top, right, bottom = mask.point(lambda v: 255 if v >= 128 else 0).getbbox()
    left, top = max(left - padding, 0), max(top - padding, 0)
    right, bottom = min(right + padding, mask.width), min(bottom + padding, mask.height)
    w, h = right - left, bottom - top
    if w / h < aspect:
        grow = min(round(h * aspect), mask.width) - w
        left = min(max(left - grow // 2, 0), mask.width - (w + grow))
        right = left + w + grow
    else:
        grow = min(round(w / aspect), mask.height) - h
        top = min(max(top - grow // 2, 0), mask.height - (h + grow))
        bottom = top + h + grow
    return left, top, right, bottom


def latent_mask(mask: Image.Image, lat_h: int, lat_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, lat_h, lat_w) of 0/1: the mask binarized at 0.5 and resized by nearest neighbour (diffusers' way)."""
    values = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    binary = (values >= 0.5).to(torch.float32)
    return torch.nn.functional.interpolate(binary, size=(lat_h, lat_w)).to(device=device, dtype=dtype)
