"""Input images: every awkward file gets a one-line RequestError or a stated conversion, before any model work."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines.image_input import BACKGROUND, read_image
from pipelines.request import GenerationRequest, RequestError


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height, with a few bytes of pixel data: tiny on disk,
    gigabytes if anyone decoded it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_not_an_image():
    with pytest.raises(RequestError) as exc:
        read_image(b"%PDF-1.4 this is not a picture")
    assert "not an image Prism can read; use a PNG, JPEG or WebP file" in one_line(exc)


def test_truncated_file():
    data = encoded(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(RequestError) as exc:
        read_image(data[: len(data) // 2])
    assert "truncated or damaged" in one_line(exc)


@pytest.mark.parametrize("size", [(30000, 30000), (9000, 100), (7000, 7000)])
def test_decompression_bomb_and_oversized_inputs_are_refused_before_decoding(size):
    data = png_header_only(*size)
    assert len(data) < 200  # the point: tiny file, huge image
    with pytest.raises(RequestError) as exc:
        read_image(data)
    assert "too many pixels" in one_line(exc) or "too large" in one_line(exc)
    assert "use a smaller image" in str(exc.value)


def test_cmyk_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = read_image(encoded(cmyk, "JPEG", quality=100))
    assert out.image.mode == "RGB"
    r, g, b = np.asarray(out.image)[8, 8]
    assert r > 200 and g < 60 and b < 60


def test_16_bit_greyscale_is_scaled_to_8_bits():
    values = np.full((8, 8), 32896, dtype=np.uint16)  # 0x8080: mid grey in 16 bits
    out = read_image(encoded(Image.fromarray(values)))
    assert out.image.mode == "RGB" and tuple(np.asarray(out.image)[0, 0]) == (128, 128, 128)
    assert "16-bit image: scaled to 8 bits" in out.notes


def test_transparency_is_filled_with_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = read_image(encoded(rgba))
    assert tuple(np.asarray(out.image)[4, 4]) == BACKGROUND == (255, 255, 255)
    assert tuple(np.asarray(out.image)[0, 0]) == (0, 0, 255)
    assert "transparent areas were filled with white" in out.notes


def test_palette_with_a_transparent_index():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    palette.putpixel((0, 0), 0)
    out = read_image(encoded(palette, transparency=1))
    assert tuple(np.asarray(out.image)[4, 4]) == (255, 255, 255)
    assert tuple(np.asarray(out.image)[0, 0]) == (0, 255, 0)


def test_palette_without_transparency_keeps_its_colours():
    palette = Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    out = read_image(encoded(palette))
    assert tuple(np.asarray(out.image)[4, 4]) == (10, 200, 30) and out.notes == ()


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    out = read_image(data)
    r, g, b = np.asarray(out.image)[4, 4]
    assert r > 200 and b < 50
    assert "animated image: its first frame was used" in out.notes


def test_the_hash_is_of_the_bytes_given():
    import hashlib

    data = encoded(Image.new("RGB", (8, 8), (1, 2, 3)))
    assert read_image(data).sha256 == hashlib.sha256(data).hexdigest()


def test_a_missing_path_names_the_file_only(tmp_path):
    with pytest.raises(RequestError) as exc:
        read_image(tmp_path / "nowhere.png")
    assert str(exc.value) == "The input image 'nowhere.png' does not exist or is not a file."


def test_bad_inputs_fail_before_model_work_and_the_manager_keeps_serving(cpu_manager, tiny_flux):
    loaded_before = {r.key for r in cpu_manager.status().resident}
    for bad in (b"not an image", png_header_only(30000, 30000)):
        job = cpu_manager.submit(GenerationRequest(prompt="x", model=str(tiny_flux), image=bad, width=32, height=32))
        with pytest.raises(RequestError):
            job.result(timeout=60)
    assert {r.key for r in cpu_manager.status().resident} <= loaded_before  # nothing was loaded for them
    ok = cpu_manager.generate(GenerationRequest(prompt="x", model=str(tiny_flux), width=32, height=32, steps=2,
                                                image=encoded(Image.new("RGB", (40, 40), (0, 0, 255))), strength=0.5))
    assert ok.images[0].size == (32, 32)


def test_conversions_are_reported_with_the_result(cpu_manager, tiny_flux):
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    result = cpu_manager.generate(GenerationRequest(prompt="x", model=str(tiny_flux), width=32, height=32, steps=2,
                                                    image=encoded(rgba), strength=0.5))
    assert "Input image: transparent areas were filled with white." in result.warnings


@pytest.mark.parametrize("orientation, fmt", [(6, "JPEG"), (8, "PNG"), (3, "WEBP")])
def test_an_exif_rotated_photo_is_turned_upright(orientation, fmt):
    """A phone's portrait photo: stored 40 wide and 20 high, its left half red, with EXIF orientation 6
    ("rotate 90 clockwise to view"). Read as shown: 20 wide, 40 high, the red half on top."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = read_image(encoded(stored, fmt, exif=exif.tobytes()))
    pixels = np.asarray(out.image).astype(int)
    red = lambda p: p[0] > 200 and p[2] < 60  # noqa: E731
    if orientation == 6:  # 90 clockwise: the left (red) half comes to the top
        assert out.size == (20, 40) and red(pixels[5, 10]) and not red(pixels[35, 10])
    elif orientation == 8:  # 90 anticlockwise: the left half goes to the bottom
        assert out.size == (20, 40) and red(pixels[35, 10]) and not red(pixels[5, 10])
    else:  # 180: the left half goes to the right
        assert out.size == (40, 20) and red(pixels[10, 35]) and not red(pixels[10, 5])
    assert "turned upright as its EXIF orientation says" in out.notes


def test_an_upright_or_damaged_orientation_tag_changes_nothing():
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    for value in (1, 0, 9):
        exif = Image.Exif()
        exif[0x0112] = value
        out = read_image(encoded(stored, "JPEG", exif=exif.tobytes()))
        assert out.size == (40, 20) and out.notes == ()
