"""FLUX.1 Kontext editing on a tiny Kontext model (CPU): diffusers' FluxKontextPipeline pixel for pixel, the
resize rule, every precision, the registry entries, and bad input."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.image_input import read_image
from pipelines.request import GenerationRequest, RequestError


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def circle_on_blue(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (20, 40, 200))
    r = min(width, height) // 3
    ImageDraw.Draw(image).ellipse((width // 2 - r, height // 2 - r, width // 2 + r, height // 2 + r), fill=(220, 20, 20))
    return image


@pytest.fixture(scope="module")
def tiny_kontext_sizes(tiny_kontext, tmp_path_factory):
    """The tiny Kontext model with three preferred sizes (its prism.json), for the auto-resize rule."""
    folder = tmp_path_factory.mktemp("models") / "tiny-kontext-sizes"
    shutil.copytree(tiny_kontext, folder)
    limits = json.loads((folder / "prism.json").read_text())
    (folder / "prism.json").write_text(json.dumps({**limits, "preferred_sizes": [[32, 48], [32, 32], [48, 32]]}))
    return folder


def _diffusers_edit(folder, source, seed, steps, guidance, width, height, auto_resize, n=1):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    return pipe(image=source, prompt="a red circle", num_inference_steps=steps, guidance_scale=guidance,
                width=width, height=height, max_area=width * height, _auto_resize=auto_resize,
                generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], num_images_per_prompt=n,
                max_sequence_length=32).images


def test_matches_diffusers_kontext_without_resizing(tiny_kontext, cpu_manager, diffusers_encoder_on_contiguous_input):
    """An input already at the model's preferred size is used as is: diffusers with _auto_resize=False, batch of 2."""
    source = circle_on_blue(32, 32)
    ours = cpu_manager.generate(GenerationRequest(prompt="a red circle", model=str(tiny_kontext), precision="bf16",
                                                  seed=7, steps=4, guidance=3.5, num_images=2, image=read_image(source)))
    theirs = _diffusers_edit(tiny_kontext, source, 7, 4, 3.5, 32, 32, auto_resize=False, n=2)
    for mine, reference in zip(ours.images, theirs):
        # diffusers rounds its [0, 1] conversion in bf16, we in fp32: at most one level apart.
        assert np.abs(_pixels(mine) - _pixels(reference)).max() <= 1
    assert np.abs(_pixels(ours.images[0]) - _pixels(ours.images[1])).mean() > 0.5  # two seeds, two edits
    assert len(ours.timings.steps_ms) == 4 and ours.timings.vae_encoder_ms > 0  # every step runs: no strength
    assert ours.request.strength is None and "strength" not in ours.settings()
    assert ours.settings()["input_image_sha256"] == read_image(source).sha256


def test_matches_diffusers_kontext_auto_resize(tiny_kontext_sizes, cpu_manager, monkeypatch,
                                               diffusers_encoder_on_contiguous_input):
    """A 40x56 input goes to the preferred size nearest its aspect (32x48), as diffusers' _auto_resize does with the
    same list; the output takes that size when the request names none."""
    import diffusers.pipelines.flux.pipeline_flux_kontext as kontext_module

    monkeypatch.setattr(kontext_module, "PREFERRED_KONTEXT_RESOLUTIONS", [(32, 48), (32, 32), (48, 32)])
    source = circle_on_blue(40, 56)
    ours = cpu_manager.generate(GenerationRequest(prompt="a red circle", model=str(tiny_kontext_sizes),
                                                  precision="bf16", seed=3, steps=3, guidance=2.5,
                                                  image=read_image(source)))
    assert ours.images[0].size == (32, 48) and (ours.request.width, ours.request.height) == (32, 48)
    theirs = _diffusers_edit(tiny_kontext_sizes, source, 3, 3, 2.5, 32, 48, auto_resize=True)
    assert np.abs(_pixels(ours.images[0]) - _pixels(theirs[0])).max() <= 1


def test_output_size_may_differ_from_the_input(tiny_kontext, cpu_manager):
    result = cpu_manager.generate(GenerationRequest(prompt="a red circle", model=str(tiny_kontext), seed=1, steps=2,
                                                    width=48, height=32, image=circle_on_blue(32, 32)))
    assert result.images[0].size == (48, 32)


def test_an_input_stretched_to_the_context_size_is_noted(tiny_kontext, cpu_manager):
    """The tiny model edits at 32x32 only: a 64x32 input is squeezed (as diffusers does) and the result says so;
    a square one is resized without a note."""
    base = dict(prompt="a red circle", model=str(tiny_kontext), seed=1, steps=2)
    wide = cpu_manager.generate(GenerationRequest(**base, image=circle_on_blue(64, 32)))
    assert wide.images[0].size == (32, 32)
    assert any("resized from 64x32 to 32x32" in w and "crop it to the proportions of 32x32" in w
               for w in wide.warnings), wide.warnings
    square = cpu_manager.generate(GenerationRequest(**base, image=circle_on_blue(48, 48)))
    assert not any("resized from" in w for w in square.warnings), square.warnings


def test_the_input_image_steers_the_edit(tiny_kontext, cpu_manager):
    """Same seed and instruction, two different inputs: two different results (the context tokens are used)."""
    base = dict(prompt="a red circle", model=str(tiny_kontext), seed=5, steps=3)
    one = cpu_manager.generate(GenerationRequest(**base, image=circle_on_blue(32, 32)))
    other = cpu_manager.generate(GenerationRequest(**base, image=Image.new("RGB", (32, 32), (250, 250, 20))))
    diff = np.abs(_pixels(one.images[0]) - _pixels(other.images[0]))
    # A tiny random transformer attends little to the context, but everywhere: a third of the values move.
    assert (diff > 0).mean() > 0.2, (diff > 0).mean()


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp8", "fp4"])
def test_every_precision_edits(tiny_kontext, cpu_manager, precision):
    result = cpu_manager.generate(GenerationRequest(prompt="a red circle", model=str(tiny_kontext),
                                                    precision=precision, seed=3, steps=3, image=circle_on_blue(64, 64)))
    assert result.images[0].size == (32, 32)  # the tiny model's one preferred size
    assert _pixels(result.images[0]).std() > 1.0  # not a flat (black) picture
    assert result.runs_as


def test_preferred_sizes_are_diffusers():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    from pipelines.registry import PREFERRED_KONTEXT_RESOLUTIONS as ours

    assert list(ours) == [tuple(s) for s in PREFERRED_KONTEXT_RESOLUTIONS]


def test_registry_entry_has_the_dev_architecture():
    from pipelines.families import family_of
    from pipelines.families.family import ImageUse
    from pipelines.registry import Family, resolve_spec

    kontext, dev = resolve_spec("flux.1-kontext-dev"), resolve_spec("flux.1-dev")
    assert kontext.family is Family.KONTEXT and kontext.gated and kontext.repo == "black-forest-labs/FLUX.1-Kontext-dev"
    assert (kontext.default_steps, kontext.default_guidance) == (28, 2.5)
    assert {n: (c.class_name, dict(c.config)) for n, c in kontext.components.items()} == \
        {n: (c.class_name, dict(c.config)) for n, c in dev.components.items()}
    family = family_of(kontext)
    assert family.image_use is ImageUse.CONTEXT
    # The real model's rule: the trained resolution nearest the input's aspect ratio.
    assert family.context_size(kontext, (1000, 700)) == (1248, 832)
    assert family.context_size(kontext, (3000, 3000)) == (1024, 1024)
    assert family.context_size(kontext, (500, 1200)) == (672, 1568)


def test_transformer_profile_covers_the_doubled_token_count():
    from pipelines.backends.tensorrt.export import ShapeRanges, component_io, profile
    from pipelines.registry import resolve_spec

    spec = resolve_spec("flux.1-kontext-dev")
    io = component_io(spec, "transformer")
    shapes = profile(spec, io, ShapeRanges.for_spec(spec, 1024, 1024))
    assert shapes["hidden_states"] == ((1, 4096, 64),) * 3
    assert shapes["image_latents"] == ((1, 4096, 64),) * 3  # the input's 4096 tokens beside the noise's 4096
    assert shapes["img_ids"] == ((4096, 3),) * 3 and shapes["image_ids"] == ((4096, 3),) * 3
    dynamic = profile(spec, io, ShapeRanges.for_spec(spec))
    assert dynamic["image_latents"][0][1] == 256 and dynamic["image_latents"][2][1] == 16384  # 256 px .. 2048 px


def test_demo_rule_for_a_small_kontext_folder(tiny_kontext):
    """A Kontext folder not at 1024x1024 (the embedded demo) takes its inputs at its own default size."""
    from pipelines.families import family_of
    from pipelines.registry import read_local_spec

    spec = read_local_spec(tiny_kontext)
    assert spec.preferred_sizes == ((32, 32),)
    assert family_of(spec).context_size(spec, (200, 90)) == (32, 32)


def test_demo_kontext_is_offered_only_when_present(tmp_path, tiny_kontext):
    from pipelines.registry import demo_specs

    assert "demo-kontext" not in [s.id for s in demo_specs(tmp_path)]
    shutil.copytree(tiny_kontext, tmp_path / "demo-kontext")
    assert [s.id for s in demo_specs(tmp_path)] == ["demo-kontext"]


def test_default_model_falls_back_to_the_demo_when_it_is_there(monkeypatch, tmp_path, tiny_kontext):
    from pipelines import loading, registry
    from pipelines.loading import HubOptions, default_model
    from pipelines.registry import Family

    shutil.copytree(tiny_kontext, tmp_path / "demo-kontext")
    monkeypatch.setattr(registry, "DEMO_MODELS_DIR", tmp_path)
    monkeypatch.setattr(registry.demo_specs, "__defaults__", (tmp_path,))
    monkeypatch.setattr(loading, "is_available_locally", lambda spec, hub: False)
    model, note = default_model(Family.KONTEXT, HubOptions())
    assert model == "demo-kontext" and "flux.1-kontext-dev" in note


def test_no_family_named_never_defaults_to_an_editing_model(monkeypatch):
    """`generate "a prompt"` with no --model: even with only Kontext's weights cached, a model that needs no image."""
    from pipelines import loading
    from pipelines.loading import HubOptions, default_model
    from pipelines.registry import Family

    monkeypatch.setattr(loading, "is_available_locally", lambda spec, hub: spec.id == "flux.1-kontext-dev")
    model, _ = default_model(hub=HubOptions())
    assert model != "flux.1-kontext-dev"
    assert default_model(Family.KONTEXT, HubOptions())[0] == "flux.1-kontext-dev"


# --------------------------------------------------------------------------- bad input

def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _edit(tiny_kontext, **fields):
    return GenerationRequest(**{"prompt": "make the circle blue", "model": str(tiny_kontext), "steps": 2, "seed": 1,
                                **fields})


@pytest.mark.parametrize("fields,message", [
    ({}, "edits an image: give it an input image"),
    ({"prompt": "   ", "image": Image.new("RGB", (32, 32))}, "The instruction is empty"),
    ({"image": Image.new("RGB", (32, 32)), "strength": 0.5}, "takes no strength"),
    ({"image": Image.new("RGB", (32, 32)), "mask": Image.new("L", (32, 32), 255)}, "takes no mask"),
    ({"image": b"not an image at all"}, "not an image Prism can read"),
    ({"image": _png(Image.new("RGB", (32, 32)))[:60]}, "truncated or damaged|not an image"),
    ({"image": "/nonexistent/edit.png"}, "does not exist"),
    ({"image": Image.new("RGB", (32, 32)), "width": 40}, "not a multiple of 16"),
])
def test_bad_edit_requests_get_one_line(tiny_kontext, cpu_manager, fields, message):
    with pytest.raises(RequestError, match=message) as caught:
        cpu_manager.generate(_edit(tiny_kontext, **fields))
    assert "\n" not in str(caught.value) and "/nonexistent" not in str(caught.value)


def test_huge_input_is_refused_before_decoding(tiny_kontext, cpu_manager):
    bomb = _png(Image.new("1", (30000, 30000)))  # a few kB on disk, 900 megapixels decoded
    with pytest.raises(RequestError, match="too large|too many pixels"):
        cpu_manager.generate(_edit(tiny_kontext, image=bomb))


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


@pytest.mark.parametrize("data,note", [
    (_png(Image.new("RGBA", (32, 32), (255, 0, 0, 0))), "transparent areas were filled with white"),
    (_png(Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16))), "16-bit image"),
    (_png(Image.new("P", (32, 32), 3)), None),
    (_animated_gif(), "animated image: its first frame was used"),
])
def test_unusual_inputs_are_converted_and_noted(tiny_kontext, cpu_manager, data, note):
    result = cpu_manager.generate(_edit(tiny_kontext, image=data))
    assert result.images[0].size == (32, 32)
    if note:
        assert any(note in w for w in result.warnings), result.warnings


def test_cmyk_input_is_converted(tiny_kontext, cpu_manager):
    buffer = io.BytesIO()
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(buffer, format="JPEG")
    result = cpu_manager.generate(_edit(tiny_kontext, image=buffer.getvalue()))
    assert result.images[0].size == (32, 32)


def test_loras_are_refused_with_a_pointer(tiny_kontext, cpu_manager):
    with pytest.raises(RequestError, match="takes no LoRAs yet"):
        cpu_manager.generate(_edit(tiny_kontext, image=Image.new("RGB", (32, 32)), loras=(("style", 1.0),)))


def test_the_app_keeps_serving_after_bad_edits(tiny_kontext, cpu_manager):
    with pytest.raises(RequestError):
        cpu_manager.generate(_edit(tiny_kontext, image=b"junk"))
    assert cpu_manager.generate(_edit(tiny_kontext, image=circle_on_blue(32, 32))).images


# --------------------------------------------------------------------------- CLI

def test_cli_edits_an_image(tiny_kontext, tmp_path):
    from test_core_cli import run_cli

    from pipelines.pngmeta import read_png_metadata

    source = tmp_path / "in.png"
    circle_on_blue(40, 56).save(source)
    out = tmp_path / "edit.png"
    proc = run_cli("generate", "make the circle blue", "--model", str(tiny_kontext), "--image", str(source),
                   "--steps", "2", "--seed", "4", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (32, 32)  # the tiny model's preferred size
    settings = read_png_metadata(out)["settings"]
    assert settings["prompt"] == "make the circle blue" and "strength" not in settings
    assert settings["input_image_sha256"] == read_image(source).sha256

    refused = run_cli("generate", "make the circle blue", "--model", str(tiny_kontext), "--device", "cpu",
                      "--out", str(tmp_path / "none.png"))
    assert refused.returncode == 2 and "give it an input image" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_bench_makes_a_random_input_for_an_edit_model(tiny_kontext):
    from test_core_cli import run_cli

    proc = run_cli("bench", "make the circle blue", "--model", str(tiny_kontext), "--steps", "2", "--runs", "1",
                   "--warmup", "1", "--no-baseline", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "an edit of a random-pixel input" in proc.stdout
    assert f"{tiny_kontext.name} 2 steps, 32x32, batch 1" in proc.stdout  # the size it ran at, not "defaultxdefault"
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| prism bf16"))
    assert row.split("|")[4].strip() != "-"  # the VAE encoder's time is reported
