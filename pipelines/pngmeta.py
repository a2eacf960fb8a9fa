"""PNG files that remember how they were made.

Two text chunks: `parameters`, the AUTOMATIC1111 infotext that A1111, Forge, ComfyUI loaders and
image browsers parse, and `prism`, a JSON object with every setting.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo



def infotext(settings: dict[str, Any], seed: int, sampler: str = "Euler") -> str:
    # LoRAs the Automatic1111 way: <lora:name:scale> in the prompt, and their short hashes in "Lora hashes".
    loras = settings.get("loras") or []
    tags = " ".join(f"<lora:{name}:{scale:g}>" for name, scale in loras)
    lines = [" ".join(t for t in (settings.get("prompt", ""), tags) if t)]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = [("Steps", settings.get("steps")), ("Sampler", sampler), ("CFG scale", settings.get("guidance")),
              ("Seed", seed), ("Size", f"{settings.get('width')}x{settings.get('height')}"),
              ("Model", settings.get("model")), ("Precision", settings.get("runs_as") or settings.get("precision")),
              ("Backend", settings.get("backend")),
              # Image to image and inpainting, under A1111's own keys (the input's hash is in the JSON chunk).
              ("Denoising strength", settings.get("strength")), ("Mask blur", settings.get("mask_blur")),
              ("Inpaint area", "Only masked" if settings.get("only_masked") else None),
              ("Refiner", settings.get("refiner_model")), ("Refiner switch at", settings.get("refiner")),
              # Step caching changes the picture, so a cached image says so (no key when it is off).
              ("Step cache", settings.get("cache") if settings.get("cache") not in (None, "off") else None)]
    hashes = settings.get("lora_hashes") or {}
    if hashes:
        fields.append(("Lora hashes", ", ".join(f"{name}: {digest}" for name, digest in hashes.items())))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields if v is not None and v != ""))
    return "\n".join(lines)


def _quote(value: Any) -> str:
    """A1111 quotes values that contain its separators, JSON-style."""
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def png_bytes(image: Image.Image, settings: dict[str, Any], seed: int, sampler: str = "Euler") -> bytes:
    info = PngInfo()
    info.add_text("parameters", infotext(settings, seed, sampler))
    info.add_text("prism", json.dumps({**settings, "seed": seed}, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(path: Path, image: Image.Image, settings: dict[str, Any], seed: int, sampler: str = "Euler") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(png_bytes(image, settings, seed, sampler))
    tmp.replace(path)  # never leave a half-written picture under the real name
    return path


def read_png_metadata(source: Path | bytes | Image.Image) -> dict[str, Any]:
    """{'parameters': infotext or None, 'settings': the JSON settings or {}}."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray)):
        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(source)
    text = getattr(image, "text", {}) or {}
    settings = json.loads(text["prism"]) if "prism" in text else {}
    return {"parameters": text.get("parameters"), "settings": settings}


def parse_infotext(text: str) -> dict[str, str]:
    """Inverse of `infotext` for the fields Prism writes: prompt, negative prompt and the key: value list."""
    lines = text.split("\n")
    out = {"prompt": lines[0] if lines else ""}
    for line in lines[1:]:
        if line.startswith("Negative prompt: "):
            out["negative_prompt"] = line[len("Negative prompt: "):]
        else:
            for match in _PARAM.finditer(line):
                key, value = match.group(1), match.group(2)
                out[key] = json.loads(value) if value.startswith('"') else value
    return out


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # the A1111 infotext grammar
